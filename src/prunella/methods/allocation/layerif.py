"""LayerIF: layer quality from influence functions, mapped to sparsity.

Askari et al., "LayerIF: Estimating Layer Quality for Large Language Models using
Influence Functions", NeurIPS 2025 (arXiv 2505.23811; pruning code
HadiAskari/LayerIF_Pruning_New, influence computation after DataInf, Kwon et al.,
ICLR 2024).

Metric. The calibration windows are cut into pieces of ``length = 128`` tokens
(the paper's ``max_length``); the last ``validation = 0.25`` of them are the
validation set ``V`` (the paper: 300 training and 96 validation examples), the
rest the training set ``T``, disjoint. For a unit (a block) with weight matrices
``w`` and per-example loss gradients ``g_t = dL_t/dw``, DataInf's influence of
training example ``t`` on validation example ``v``:

    I_w(t, v) = -(1 / (n lam_w)) sum_{t'} ( <g_v, g_t> - c_vt' <g_t', g_t> ),
    c_vt' = <g_v, g_t'> / (lam_w + ||g_t'||^2),   lam_w = mean_t' mean(g_t'^2) / damping

(``damping = 10``, ``n = |T|``): the Sherman-Morrison inverse of each
``g gᵀ + lam I`` averaged over ``T``, DataInf's approximation of the inverse
Hessian. Then ``I(t) = sum_w sum_v I_w(t, v)`` and the unit's score is the sum of
the positive influences, ``S = sum_t max(I(t), 0)``: "layers with lower cumulative
positive influence [are] more stable and better trained". ``aggregate=helpful``
sums the helpful ones instead, ``S = -sum_t min(I(t), 0)`` (the authors' influence
code has both; see below), mapped the same way: more influence, more sparsity.
At most ``examples = 396`` pieces (the paper's 300 + 96).

Mapping (the authors' ``ww_sparsity``, AlphaPruning's): along the blocks the scores
are smoothed by a Savitzky-Golay filter (window 7, cubic, scipy's ``interp`` edges,
as their ``IF-...-smoothed`` files), then mapped linearly to factors in
``[1 - eps, 1 + eps]`` (higher score, more sparsity), times the target, rescaled
to the budget; ``epsilon = 0.1``, their setting for Wanda and SparseGPT.

Where we differ: the influence is over every prunable matrix of the unit (their
script keeps the attention projections only); the examples are pieces of the
calibration text, not task examples. Per-example gradients come from a block-by-
block backward (:func:`~prunella.engine.gradients.block_gradients`), and only their
inner products are kept: the memory of one block's gradients for all pieces
(``pieces x block parameters x 4`` bytes) plus the hidden states entering every
block (``blocks x pieces x length x hidden x 4``); lower ``examples`` for a large
model. The smoothing applies along blocks; with ``--granularity layer`` or
``expert`` the scores are used unsmoothed, and so are models with fewer blocks than
the window. On calibration text cut into pieces, nearly every training piece
*helps* the validation pieces (``I(t) < 0`` in every block of SmolLM2-135M for all
but a few of them), so the paper's positive sum is zero in most blocks;
``aggregate=helpful`` keeps a score in every block.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ...engine.gradients import block_gradients
from ...engine.stats import LOSS
from ...errors import PrunellaError
from ...registry import Option
from ..plan import check_finite
from .alphapruning import alphapruning_ratios
from .run import AllocationRun, Scores

PAPER = (
    "Askari et al., LayerIF: Estimating Layer Quality for Large Language Models using "
    "Influence Functions, NeurIPS 2025"
)
NEEDS = frozenset({LOSS})
OPTIONS = (
    Option(
        "length",
        int,
        128,
        "tokens per example (calibration windows are cut into pieces)",
        low=2,
        old=("seqlen",),
    ),
    Option(
        "validation",
        float,
        0.25,
        "share of the examples held out for validation",
        low=0.0,
        high=1.0,
        low_open=True,
        high_open=True,
    ),
    Option(
        "damping", float, 10.0, "lambda = mean squared gradient / damping", low=0.0, low_open=True
    ),
    Option(
        "epsilon",
        float,
        0.1,
        "unit ratios span target x [1 - epsilon, 1 + epsilon]",
        low=0.0,
        high=1.0,
        high_open=True,
    ),
    Option("smooth", int, 7, "Savitzky-Golay window along the blocks (0: none; odd, >= 5)", low=0),
    Option(
        "examples",
        int,
        396,
        "at most this many examples (the paper: 300 + 96)",
        low=3,
        old=("samples",),
    ),
    Option(
        "aggregate",
        str,
        "positive",
        "sum the positive (harmful) influences, as the paper, or the helpful ones",
        choices=("positive", "helpful"),
    ),
)
METRIC = "influence"


def pieces(windows: torch.Tensor, length: int) -> torch.Tensor:
    """Every window cut into ``length``-token pieces (a shorter tail is dropped)."""
    count = windows.shape[1] // length
    if count == 0:
        raise PrunellaError(
            f"layerif option length={length} is longer than the calibration windows "
            f"({windows.shape[1]} tokens)"
        )
    return windows[:, : count * length].reshape(-1, length)


def datainf_influence(train: torch.Tensor, val: torch.Tensor, damping: float) -> torch.Tensor:
    """``I[t, v]`` for one weight matrix from per-example gradients ``train [n, ...]`` and
    ``val [m, ...]`` (see the module docstring), by inner products only."""
    gt, gv = train.flatten(1), val.flatten(1)
    n, d = gt.shape
    gram = (gt @ gt.T).double()  # <g_t', g_t>
    cross = (gv @ gt.T).double()  # <g_v, g_t>
    norms = gram.diagonal()
    lam = (norms / d).mean() / damping
    if lam <= 0:  # no gradient at all (an expert no token reached): no influence
        return torch.zeros(n, len(gv), dtype=torch.float64)
    c = cross / (lam + norms)  # c[v, t']
    inner = (n * cross - c @ gram) / (n * lam)  # <hvp_v, g_t>
    return -inner.T


def positive_influence(influence: torch.Tensor, aggregate: str) -> float:
    """``S = sum_t max(sum_v I[t, v], 0)``; ``aggregate="helpful"``: ``-sum_t min(., 0)``."""
    per_example = influence.sum(1)
    if aggregate == "helpful":
        return -per_example.clamp_max(0).sum().item()
    return per_example.clamp_min(0).sum().item()


def savgol(values: torch.Tensor, window: int, order: int = 3) -> torch.Tensor:
    """Savitzky-Golay smoothing with scipy's ``mode="interp"``: each point of the middle
    is the value at its centre of the least-squares polynomial of degree ``order`` over
    the ``window`` points around it; the first and last ``window // 2`` points take
    the polynomial fitted to the first (last) ``window`` points."""
    y = values.double()
    if window <= order or len(y) < window:
        return y.clone()
    half = window // 2
    x = torch.arange(window, dtype=torch.float64)
    basis = torch.stack([x**p for p in range(order + 1)], 1)  # [window, order + 1]
    fit = basis @ torch.linalg.pinv(basis)  # projects window values onto the polynomials
    out = y.clone()
    for i in range(half, len(y) - half):
        out[i] = fit[half] @ y[i - half : i + half + 1]
    out[:half] = fit[:half] @ y[:window]
    out[len(y) - half :] = fit[window - half :] @ y[len(y) - window :]
    return out


def influence_scores(
    run: AllocationRun, *, length: int, validation: float, damping: float, aggregate: str,
    examples: int,
) -> dict[str, float]:  # fmt: skip
    """Each allocation unit's ``S`` (positive influence of the training pieces)."""
    cut = pieces(run.windows, length)[:examples]
    m = round(validation * len(cut))
    if m < 1 or len(cut) - m < 2:
        raise PrunellaError(
            f"layerif needs at least 2 training and 1 validation example of {length} tokens; "
            f"the calibration text gives {len(cut)}"
        )
    n = len(cut) - m
    unit_of = {name: unit for unit, names in run.units.items() for name in names}
    influence: dict[str, torch.Tensor] = {}
    bar = tqdm(total=len(run.store.blocks()), desc="layerif (gradients)", unit="block",
               disable=not run.progress)  # fmt: skip
    for _, grads in block_gradients(run.store, cut, device=run.device):
        for name, g in grads.items():
            part = datainf_influence(g[:n], g[n:], damping)
            unit = unit_of[name]
            influence[unit] = influence[unit] + part if unit in influence else part
        del grads, g  # one block's gradients at a time: freed before the next is made
        bar.update()
    bar.close()
    scores = {unit: positive_influence(influence[unit], aggregate) for unit in run.units}
    check_finite(scores.values(), "layerif: the influence")
    return scores


def allocate(
    run: AllocationRun, *, length: int, validation: float, damping: float, smooth: int,
    aggregate: str, examples: int, **_,
) -> Scores:  # fmt: skip
    if smooth and (smooth % 2 == 0 or smooth < 5):
        raise PrunellaError(f"layerif option smooth must be 0 or odd and at least 5, got {smooth}")
    scores = influence_scores(
        run, length=length, validation=validation, damping=damping, aggregate=aggregate,
        examples=examples,
    )  # fmt: skip
    if smooth and run.granularity == "block":
        units = list(scores)
        smoothed = savgol(torch.tensor([scores[u] for u in units]), smooth)
        scores = dict(zip(units, smoothed.tolist(), strict=True))
    return Scores(scores)


def ratios(metric: torch.Tensor, target: float, sizes: torch.Tensor, *, epsilon: float, **_):
    """AlphaPruning's mapping: a higher score (less mature) prunes more."""
    return alphapruning_ratios(metric, target, sizes, epsilon=epsilon)
