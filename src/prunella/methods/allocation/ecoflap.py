"""ECoFLaP: block budgets from a zeroth-order estimate of the loss gradient.

Sung et al., "ECoFLaP: Efficient Coarse-to-Fine Layer-Wise Pruning for
Vision-Language Models", ICLR 2024 (ylsung/ECoFLaP,
``lavis/compression/pruners/layer_single_base_pruner.py``, ``LayerSparsity``).

Metric (the coarse, global step). For each weight matrix ``W`` and each batch ``k``
of ``batch`` calibration windows, one Gaussian direction ``z ~ N(0, I)`` and the
two-point estimate of the directional derivative of the next-token loss

    g_k = (L_k(W + mu z) - L_k(W - mu z)) / (2 mu),        mu = 1e-3 (the paper's eps),

with the rest of the model dense: forward passes only. A matrix scores
``sum_k |g_k|`` (``E|z^T grad L| = sqrt(2/pi) ||grad L||``: a gradient-norm
importance), and a unit (a block, a layer, an expert) the sum over its matrices
(the reference's ``GradOnly``/``_sum`` defaults). ``windows = 32`` windows in
batches of ``batch = 8``: four directions per matrix.

Mapping: keep budgets proportional to the score, with the paper's cap. Every unit
first keeps ``n_u (1 - s_max)`` weights, ``s_max = target + gap`` (``gap = 0.1``,
the scripts' ``max_sparsity_per_layer``); the rest of the keep budget
``(1 - target) sum n_u`` is handed out in proportion to the scores, a unit at most
dense, the overflow handed out again until it is placed.

How it runs. The loss of a perturbed matrix in block ``b`` needs blocks ``b..N``
again, so the cost is about ``2 x matrices x N / 2`` block forwards per batch.
One sweep over the blocks (each loaded once, so a streamed model works) carries
every perturbed hidden state ("stream") started so far alongside the dense one;
when the streams would exceed ``STREAM_BYTES``, the source blocks are split into
groups, one sweep each. Forwards run in float32 (a difference of two losses
``2 mu`` apart is lost in bfloat16 rounding).

Where we differ: ``perturb=block`` (one direction for all a block's matrices
together, ``sum_k |g_k|`` per block) cuts the cost by the number of matrices per
block (7 for LLaMA), for a block allocation only; ``crop`` crops the windows
to their first tokens (0: whole windows). Both exist because the paper's
settings take hours on a CPU; the defaults are the paper's. The reference's
rebalancing has a sign slip when the proportional shares overshoot; here the
overflow is redistributed, so the budget is met whatever the scores.
"""

from __future__ import annotations

from functools import partial

import torch
from tqdm.auto import tqdm

from ...engine.adapters import get_weight
from ...engine.forward import capture, head_only, loaded, next_token_loss, predicted_tokens
from ...engine.stats import LOSS
from ...errors import PrunellaError
from ...registry import Option
from ..plan import check_finite
from .run import AllocationRun, Scores

PAPER = (
    "Sung et al., ECoFLaP: Efficient Coarse-to-Fine Layer-Wise Pruning for "
    "Vision-Language Models, ICLR 2024"
)
NEEDS = frozenset({LOSS})
OPTIONS = (
    Option(
        "mu",
        float,
        1e-3,
        "perturbation size of the two-point estimate (the paper's eps)",
        low=0.0,
        low_open=True,
        old=("eps",),
    ),
    Option(
        "windows",
        int,
        32,
        "calibration windows scored (at most those given)",
        low=1,
        old=("samples",),
    ),
    Option("batch", int, 8, "windows per random direction", low=1),
    Option("gap", float, 0.1, "a unit's sparsity is at most target + gap", low=0.0, high=1.0),
    Option(
        "perturb",
        str,
        "matrix",
        "one direction per weight matrix, or per block",
        choices=("matrix", "block"),
    ),
    Option(
        "crop",
        int,
        0,
        "score the first tokens of each window only (0: all)",
        low=0,
        old=("seqlen",),
    ),
    Option("seed", int, 0, "seed of the random directions"),
)
METRIC = "zo_grad"
STREAM_BYTES = 2 * 2**30  # perturbed hidden states one sweep may carry, at most


def direction(shape: torch.Size, seed: int, batch: int, index: int) -> torch.Tensor:
    """The Gaussian direction of perturbation unit ``index`` (model order) on ``batch``."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + batch) * 100_000_007 + index)
    return torch.randn(shape, generator=gen, dtype=torch.float32)


def zo_directional(
    store,
    windows: torch.Tensor,
    *,
    mu: float,
    batch: int,
    perturb: str,
    seed: int,
    device: torch.device,
    progress: bool = True,
) -> dict[str, list[float]]:
    """``g_k`` for every perturbation unit (a layer name, or with ``perturb="block"`` a
    block prefix such as ``model.layers.3``) and every batch ``k`` of ``windows``."""
    blocks = store.blocks()
    prefix = f"{store.adapter.blocks_path}."
    by_block: dict[int, list[str]] = {}
    for name in store.layers():
        by_block.setdefault(int(name[len(prefix) :].split(".")[0]), []).append(name)
    units = {
        i: [[n] for n in names] if perturb == "matrix" else [names] for i, names in by_block.items()
    }
    keys = [_key(u, perturb, prefix) for i in sorted(units) for u in units[i]]
    index_of = {k: j for j, k in enumerate(keys)}
    hidden_size = store.model.config.get_text_config().hidden_size
    stream = min(batch, len(windows)) * windows.shape[1] * hidden_size * 4
    per_block = 2 * max(len(u) for u in units.values())
    group = max(1, STREAM_BYTES // (per_block * stream))
    starts = list(range(0, len(blocks), group))
    batches = list(range(0, len(windows), batch))
    g: dict[str, list[float]] = {k: [] for k in keys}
    store.load_head()
    bar = tqdm(
        total=len(batches) * len(starts) * len(blocks),
        desc="ecoflap (zeroth order)", unit="block", disable=not progress,
    )  # fmt: skip
    with torch.no_grad():
        for k, first in enumerate(batches):
            ids = windows[first : first + batch]
            for g0 in starts:
                g1 = min(len(blocks), g0 + group)
                acts = capture(store.model, blocks, ids, len(ids), device, torch.float32)
                dense, streams = acts.hidden[0], {}
                for i in range(len(blocks)):
                    with loaded(store, i, device, torch.float32) as (block, linears):
                        step = partial(acts.run, block, i, 0)
                        for key, h in streams.items():
                            streams[key] = step(h)
                        if g0 <= i < g1:
                            layers = {f"{prefix}{i}.{n}": m for n, m in linears.items()}
                            for unit in units[i]:
                                key = _key(unit, perturb, prefix)
                                for sign in (1, -1):
                                    delta = mu * sign
                                    with _perturbed(layers, unit, delta, seed, k, index_of[key]):
                                        streams[key, sign] = step(dense)
                        if i < g1 - 1:  # the dense input of the next source block
                            dense = step(dense)
                    bar.update()
                with head_only(
                    store.model, blocks, device, torch.float32, acts.as_tuple
                ) as log_probs:
                    for key in dict.fromkeys(key for key, _ in streams):
                        plus = next_token_loss(log_probs, ids, streams[key, 1])
                        minus = next_token_loss(log_probs, ids, streams[key, -1])
                        g[key].append(((plus - minus) / predicted_tokens(ids) / (2 * mu)).item())
    bar.close()
    return g


def _key(unit: list[str], perturb: str, prefix: str) -> str:
    if perturb == "matrix":
        return unit[0]
    return unit[0][: unit[0].index(".", len(prefix))]


class _perturbed:
    """``W += delta * z`` for every matrix of ``unit`` (each its own ``z``), put back
    exactly on exit."""

    def __init__(self, layers: dict, unit: list[str], delta: float, seed: int, k: int, index: int):
        self.weights = [get_weight(layers[n]) for n in unit]
        self.delta, self.seed, self.k, self.index = delta, seed, k, index

    def __enter__(self) -> None:
        self.saved = [w.detach().clone() for w in self.weights]
        for j, w in enumerate(self.weights):
            seed = self.seed + j * 7_919  # another direction per matrix of a block unit
            z = direction(w.shape, seed, self.k, self.index).to(w.device)
            w.data.add_(z.to(w.dtype), alpha=self.delta)

    def __exit__(self, *exc) -> None:
        for w, saved in zip(self.weights, self.saved, strict=True):
            w.data.copy_(saved)


def allocate(
    run: AllocationRun, *, mu: float, windows: int, batch: int, perturb: str, crop: int,
    seed: int, **_,
) -> Scores:  # fmt: skip
    """Each allocation unit's score ``sum_k |g_k|``, summed over its matrices."""
    if perturb == "block" and run.granularity != "block":
        raise PrunellaError("ecoflap option perturb=block needs --granularity block")
    scored = run.windows[:windows]
    if crop:
        if crop < 2:
            raise PrunellaError("ecoflap option crop must be 0 or at least 2")
        scored = scored[:, :crop]
    g = zo_directional(
        run.store, scored, mu=mu, batch=batch, perturb=perturb, seed=seed,
        device=run.device, progress=run.progress,
    )  # fmt: skip
    check_finite([v for values in g.values() for v in values], "ecoflap: the loss")
    score = {key: sum(abs(v) for v in values) for key, values in g.items()}
    if perturb == "block":
        return Scores({unit: score[unit] for unit in run.units})
    return Scores({unit: sum(score[n] for n in names) for unit, names in run.units.items()})


def ecoflap_ratios(
    metric: torch.Tensor, target: float, sizes: torch.Tensor, *, gap: float, **_
) -> torch.Tensor:
    """Keep ``n_u (1 - target - gap)`` per unit, the rest of the keep budget in proportion
    to the scores (at most dense, overflow handed out again)."""
    sizes = sizes.double()
    score = metric.double().clamp_min(0)
    lowest_keep = 1 - min(target + gap, 1.0)
    keep = sizes * lowest_keep
    left = (1 - target) * sizes.sum() - keep.sum()
    free = keep < sizes
    while left > 1e-9 * sizes.sum() and free.any():
        weights = torch.where(free, score, torch.zeros_like(score))
        if weights.sum() <= 0:  # no score left: share by size
            weights = torch.where(free, sizes, torch.zeros_like(sizes))
        share = left * weights / weights.sum()
        added = torch.minimum(share, sizes - keep)
        keep += added
        left -= added.sum()
        free = keep < sizes * (1 - 1e-12)
    return 1 - keep / sizes


ratios = ecoflap_ratios  # the registry's hook
