"""AlphaPruning: layer-wise sparsity from the heavy tails of weight eigenspectra.

Lu et al., "AlphaPruning: Using Heavy-Tailed Self Regularization Theory for
Improved Layer-wise Pruning of Large Language Models", NeurIPS 2024.

Metric: ``PL_Alpha_Hill``. The empirical spectral density (ESD) of a weight
matrix ``W`` is the set of eigenvalues ``lambda_i`` of ``W^T W`` (squared singular
values). Its tail is fitted by a power law ``p(lambda) ~ lambda^-alpha`` with the
Hill estimator above ``x_min = lambda_k`` (eigenvalues sorted ascending):

    alpha = 1 + n / sum_{i >= k} ln(lambda_i / lambda_k),    n = N - k

``x_min`` is chosen as in the reference code (``alpha_peak``): among the
eigenvalues up to 1.5x the peak of the histogram of ``log10 lambda``, the one
whose fit has the smallest Kolmogorov-Smirnov distance ``D``. (The reference's
lower bound compares ``log10(0.95 peak)`` with linear eigenvalues; we keep that
quirk so the alphas match the published code.) ``xmin="mid"`` takes ``k = N/2``.

A block's metric is the mean alpha of its linear layers. Mapping: lower alpha
(heavier tail, better trained) gets less sparsity. Alphas are mapped linearly
to factors in ``[1 - eps, 1 + eps]``, multiplied by the target and rescaled so
the parameter-weighted mean is the target (the reference's ``s1 = 1 - eps,
s2 = 1 + eps``); ``eps = 0.3``, the reference default.

FARMS (Hu et al., "Eigenspectrum Analysis of Neural Networks without Aspect
Ratio Bias", ICML 2025): instead of the ESD of the whole matrix, pool the ESDs
of a grid of sub-matrices of a fixed aspect ratio ``q`` (``r x q r`` with
``r = min(2000, rows, cols)``, ``ops`` windows per dimension), which removes the
bias of tall or wide matrices. Defaults are the paper's LLM settings:
``q = 1``, ``r <= 2000``, 15 windows per dimension.
"""

from __future__ import annotations

import math

import torch

from ...engine.stats import WEIGHTS
from ...registry import Option
from .run import AllocationRun, Scores

PAPER = (
    "Lu et al., AlphaPruning: Using Heavy-Tailed Self Regularization Theory for Improved "
    "Layer-wise Pruning of Large Language Models, NeurIPS 2024"
)
NEEDS = frozenset({WEIGHTS})
OPTIONS = (
    Option(
        "epsilon",
        float,
        0.3,
        "unit ratios span target x [1 - epsilon, 1 + epsilon]",
        low=0.0,
        high=1.0,
        high_open=True,
    ),
    Option("farms", bool, False, "estimate alpha with FARMS sub-matrix sampling (Hu et al. 2025)"),
    Option("xmin", str, "peak", "where the power-law tail starts", choices=("peak", "mid")),
)
METRIC = "alpha_hill"


def esd(weight: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of ``W^T W``, ascending (float32)."""
    return torch.linalg.svdvals(weight.float()).square().sort().values


def farms_esd(
    weight: torch.Tensor, max_rows: int = 2000, q: float = 1.0, ops: int = 15
) -> torch.Tensor:
    """Pooled eigenvalues of ``ops x ops`` evenly spaced ``r x q r`` sub-matrices, ascending."""
    w = weight.float()
    rows, cols = w.shape
    r = min(max_rows, rows, cols)
    c = min(cols, max(1, int(r * q)))
    starts = []
    for size, length in ((r, rows), (c, cols)):
        step = max(1, (length - size) // max(ops - 1, 1))
        count = min(ops, max(1, (length - size) // step + 1))
        starts.append([min(i * step, length - size) for i in range(count)])
    subs = torch.stack([w[i : i + r, j : j + c] for i in starts[0] for j in starts[1]])
    eigs = torch.cat([torch.linalg.svdvals(batch).square().flatten() for batch in subs.split(16)])
    return eigs.sort().values


def alpha_hill(eigs: torch.Tensor, xmin: str, bins: int = 100) -> float:
    """Power-law exponent of the ESD tail by the Hill estimator (``PL_Alpha_Hill``)."""
    lam = eigs.double().sort().values
    n_total = lam.numel()
    log_lam = lam.clamp_min(1e-300).log()
    suffix = log_lam.flip(0).cumsum(0).flip(0)  # sum_{j >= i} log lambda_j
    if xmin == "mid":
        i = n_total // 2
        n = n_total - i
        return (1 + n / (suffix[i] - n * log_lam[i])).item()
    if xmin != "peak":
        raise ValueError(f"xmin must be 'peak' or 'mid', got {xmin!r}")
    log10 = lam.clamp_min(1e-300).log10()
    counts = torch.histc(log10, bins, min=log10.min().item(), max=log10.max().item())
    edges = torch.linspace(log10.min().item(), log10.max().item(), bins + 1, dtype=lam.dtype)
    peak = 10 ** edges[counts.argmax()].item()
    low, high = math.log10(0.95 * peak), 1.5 * peak  # the reference's bounds (see docstring)
    cand = torch.nonzero((lam[:-1] >= low) & (lam[:-1] <= high)).flatten()
    if cand.numel() == 0:
        return 0.0
    n = (n_total - cand).double()
    alphas = 1 + n / (suffix[cand] - n * log_lam[cand])
    best_d, best_alpha = math.inf, 0.0
    j = torch.arange(n_total, dtype=lam.dtype)
    for chunk in torch.arange(cand.numel()).split(max(1, 2**22 // n_total)):
        i, a, cnt = cand[chunk, None], alphas[chunk, None], n[chunk, None]
        fit = 1 - torch.exp((1 - a) * (log_lam[None] - log_lam[i]))
        ecdf = (j[None] - i) / cnt
        dist = (fit - ecdf).abs().masked_fill(j[None] < i, 0).amax(1)
        dist = dist.masked_fill(a.squeeze(1) <= 1, 1.0)  # the reference keeps D = 1 there
        k = int(dist.argmin())
        if dist[k].item() < best_d:
            best_d, best_alpha = dist[k].item(), alphas[chunk][k].item()
    return best_alpha


def layer_alpha(weight: torch.Tensor, farms: bool, xmin: str) -> float:
    return alpha_hill(farms_esd(weight) if farms else esd(weight), xmin=xmin)


def allocate(run: AllocationRun, *, farms: bool, xmin: str, **_) -> Scores:
    """Mean ``PL_Alpha_Hill`` over each unit's weight matrices."""
    return Scores(run.per_unit(
        lambda layers: sum(layer_alpha(w, farms, xmin) for w, _ in layers) / len(layers)
    ))  # fmt: skip


def alphapruning_ratios(
    metric: torch.Tensor, target: float, sizes: torch.Tensor, *, epsilon: float, **_
) -> torch.Tensor:
    """Factors in ``[1 - eps, 1 + eps]`` (linear in alpha) times the target, budget-scaled."""
    span = metric.max() - metric.min()
    if span <= 0:
        return torch.full_like(metric, target)
    factors = (metric - metric.min()) / span * (2 * epsilon) + (1 - epsilon)
    return factors * target * (sizes.sum() / (sizes * factors).sum())


ratios = alphapruning_ratios  # the registry's hook
