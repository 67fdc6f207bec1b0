"""TRIM: per-row sparsities, adjusted so that every output row keeps its quality.

Beck, Rudman, Eickhoff, "TRIM: Achieving Extreme Sparsity with Targeted Row-wise
Iterative Metric-driven Pruning", 2025 (flobk/TRIM). For a layer of target
sparsity ``T`` with row sparsities ``x`` (mean ``T``), the pruned output
``Y_hat = W_hat X`` is compared with the dense ``Y = W X`` row by row with the cosine
similarity ``q_r = <y_r, y_hat_r> / (||y_r|| ||y_hat_r||)``, and rows that kept their
output well give up more weights:

    d = 2 lr (q - min q) / (max q - min q + 1e-6);   x <- x + d - mean(d)
    x <- clip(x, 0, 0.95);   x <- x - mean(x) + T

The layer is re-pruned with the new budgets after every step (10 steps), and the
iterate with the highest cosine of the whole output (``cosim_flat``: both outputs
flattened) is kept. The step ``lr`` is swept over 0.01, 0.02, 0.04, 0.08, 0.12, 0.16,
each from the start, stopping at the first that does no better than the one before;
only if none beats the start are -0.01, -0.02, -0.04 tried. If nothing beats the
start the layer keeps the solver's own rows. These are the reference's defaults.

Where we differ:

* the cosines come from the layer's Hessian over all calibration tokens,
  ``<y_r, y_hat_r> = (W H W_hat^T)_rr``, instead of outputs recomputed on the last token
  of each window: no extra activations, and every token counts;
* the start is the row counts the solver picks by itself (Wanda's are the uniform
  rows of the paper; SparseGPT's come from its adaptive mask selection), so TRIM is
  never worse than ``--rows uniform`` by its own metric;
* the float sparsities become exact integer counts summing to the layer's budget
  (largest remainders), where the reference floors each row and can fall short;
* ``proxy`` may name a cheaper solver to run inside the iterations (the chosen solver
  then prunes once with the budgets found, and is kept only if it beats its own rows):
  for ALPS, whose every call is an ADMM run, ``proxy=sparsegpt`` is the practical choice
  (the proxy runs with its default options).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ...engine.stats import HESSIAN, LayerStats
from ...registry import Option
from ..sparsity.patterns import NM, Pattern, RowBudget, pruned_count

PAPER = (
    "Beck, Rudman, Eickhoff, TRIM: Achieving Extreme Sparsity with Targeted Row-wise "
    "Iterative Metric-driven Pruning, 2025"
)
NEEDS = frozenset({HESSIAN})
RATES, NEGATIVE_RATES = "0.01,0.02,0.04,0.08,0.12,0.16", "-0.01,-0.02,-0.04"


def step_sizes(text: str) -> list[float]:
    """``"0.01,0.02"`` -> ``[0.01, 0.02]``; ``ValueError`` names a bad entry."""
    sizes = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            sizes.append(float(part))
        except ValueError:
            raise ValueError(f"{part!r} is not a number (give comma-separated numbers)") from None
    return sizes


OPTIONS = (
    Option("iterations", int, 10, "budget updates per step size", low=0),
    Option("rates", str, RATES, "step sizes tried, in order", parse=step_sizes),
    Option("negative_rates", str, NEGATIVE_RATES, "tried if no rate helps", parse=step_sizes),
    Option(
        "max_row_sparsity",
        float,
        0.95,
        "clip of row sparsities before re-centring",
        low=0.0,
        high=1.0,
    ),
    Option(
        "proxy",
        str,
        "solver",
        "solver run inside the iterations: the chosen one, or any registered solver",
        parse=lambda name: name == "solver" or _solvers().get(name),
    ),
)


def row_cosines(WH: torch.Tensor, W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor):
    """Per-row cosines ``q_r`` of the outputs and the flat cosine of all of them, from
    ``H`` (``WH = W H`` precomputed)."""
    cross = (WH * W_hat).sum(1)
    ref = (WH * W).sum(1).clamp_min(0)  # quadratic forms: >= 0 but for rounding
    own = ((W_hat @ H) * W_hat).sum(1).clamp_min(0)
    rows = cross / (ref.sqrt() * own.sqrt()).clamp_min(1e-12)
    rows = torch.where(ref > 0, rows, 1.0)  # a row whose output is zero keeps it exactly
    flat = cross.sum() / (ref.sum().sqrt() * own.sum().sqrt()).clamp_min(1e-12)
    return rows.nan_to_num(1.0).clamp(-1, 1), flat.nan_to_num(0.0).clamp(-1, 1).item()


def exact_counts(x: torch.Tensor, cols: int, k: int) -> torch.Tensor:
    """Integer counts in ``[0, cols]`` closest to ``x * cols`` that sum exactly to ``k``
    (largest remainders first)."""
    want = (x * cols).clamp(0, cols)
    counts = want.floor().long()
    frac = want - counts
    while (short := k - int(counts.sum())) != 0:
        room = counts < cols if short > 0 else counts > 0
        last = float("-inf") if short > 0 else float("inf")  # rows with no room sort last
        order = torch.argsort(torch.where(room, frac, last), descending=short > 0, stable=True)
        take = order[: min(abs(short), int(room.sum()))]
        counts[take] += 1 if short > 0 else -1
        frac[take] = 0.0 if short > 0 else 1.0
    return counts


@dataclass
class Best:
    """The best iterate so far: its flat cosine, row counts, step size, weight and facts."""

    score: float
    counts: torch.Tensor | None = None
    rate: float = 0.0
    weight: torch.Tensor | None = None
    info: dict = field(default_factory=dict)


def prune(
    weight: torch.Tensor,
    pattern: Pattern,
    stats: LayerStats,
    solve: Callable,
    *,
    iterations: int,
    rates: str,
    negative_rates: str,
    max_row_sparsity: float,
    proxy: str,
) -> tuple[torch.Tensor, dict]:
    own, info = solve(weight.clone(), pattern)
    if isinstance(pattern, NM | RowBudget):
        return own, {**info, "rows": "fixed by the pattern"}
    if pattern.sparsity == 0:
        return own, info
    search = solve if proxy == "solver" else proxy_solver(proxy, stats)
    W, H = weight.float(), stats.hessian
    WH = W @ H
    cols = W.shape[1]
    k = pruned_count(W.numel(), pattern.sparsity)

    def quality(W_hat: torch.Tensor) -> tuple[torch.Tensor, float]:
        return row_cosines(WH, W, W_hat, H)

    start_hat = own if proxy == "solver" else search(weight.clone(), pattern)[0]
    start = (start_hat == 0).sum(1).float() / cols  # the solver's own row sparsities
    start_q, start_score = quality(start_hat)
    best = Best(start_score)

    def iterate(lr: float) -> float:
        """TRIM's steps of size ``lr`` from the start; the best flat cosine met, start included."""
        nonlocal best
        x, q, top = start.clone(), start_q, start_score
        for _ in range(iterations):
            d = (q - q.min()) / (q.max() - q.min() + 1e-6) * (2 * lr)
            x = (x + d - d.mean()).clamp(0, max_row_sparsity)
            x = x - x.mean() + k / W.numel()
            counts = exact_counts(x, cols, k)
            W_hat, hat_info = search(weight.clone(), RowBudget(counts, cols))
            q, score = quality(W_hat)
            top = max(top, score)
            if score > best.score:
                best = Best(score, counts, lr, W_hat, hat_info)
        return top

    for sizes in (step_sizes(rates), step_sizes(negative_rates)):
        previous = -float("inf")
        for lr in sizes:  # larger steps while they keep helping
            top = iterate(lr)
            if top <= previous:
                break
            previous = top
        if best.counts is not None:  # the negative sizes only when no positive one helped
            break

    facts = {"rows_cos_start": start_score, "rows_cos": best.score, "rows_rate": best.rate}
    if best.counts is None:
        return own, {**info, **facts}
    new, new_info = best.weight, best.info
    if proxy != "solver":  # the budgets were found with another solver: check they help this one
        new, new_info = solve(weight.clone(), RowBudget(best.counts, cols))
        facts.update(rows_cos_start=quality(own)[1], rows_cos=quality(new)[1])
        if facts["rows_cos"] <= facts["rows_cos_start"]:
            return own, {**info, **facts, "rows_cos": facts["rows_cos_start"], "rows_rate": 0.0}
    share = best.counts.float() / cols
    facts.update(rows_min=share.min().item(), rows_max=share.max().item())
    return new, {**new_info, **facts}


def _solvers():
    from ..sparsity.solvers import SOLVERS  # the registry of the axis this row method serves

    return SOLVERS


def proxy_solver(name: str, stats: LayerStats) -> Callable:
    """``solve(weight, pattern)`` with the solver ``name`` at its default options."""
    method = _solvers().get(name)
    return lambda w, p: method.prune(w, p, stats, **method.defaults())
