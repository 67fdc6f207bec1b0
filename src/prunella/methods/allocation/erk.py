"""ERK: Erdos-Renyi-Kernel layer ratios, the data-free allocation of random pruning.

Liu et al., "The Unreasonable Effectiveness of Random Pruning: Return of the Most
Naive Baseline for Sparse Training", ICLR 2022, after Evci et al. (RigL, ICML
2020) and Mocanu et al. (SET, 2018). A linear layer with ``n_in`` inputs and
``n_out`` outputs keeps a density proportional to its "perimeter over area":

    d_l = eps * (n_in + n_out) / (n_in * n_out)

with one ``eps`` for the model, chosen so the kept weights total ``(1 - target)``
of all prunable weights. A layer whose ``d_l`` would exceed 1 is kept dense and
``eps`` is solved again over the rest (the reference's loop). Small layers thus
stay denser; the largest lose most. Needs neither data nor weight values, only
shapes.

With ``granularity="block"`` (Prunella's default) a unit is a block and its
perimeter and area are the sums over its layers; ``--granularity layer`` is the
paper's per-layer ERK. The allocation layer then makes the budget exact to the
weight (the ERK densities already meet it up to rounding).
"""

from __future__ import annotations

import torch

from .run import AllocationRun, Scores

PAPER = (
    "Liu et al., The Unreasonable Effectiveness of Random Pruning: "
    "Return of the Most Naive Baseline for Sparse Training, ICLR 2022"
)
NEEDS: frozenset[str] = frozenset()
OPTIONS = ()
METRIC = "erk_perimeter"


def allocate(run: AllocationRun) -> Scores:
    """``sum_l (n_in + n_out)`` over each unit's weight matrices (shapes only)."""
    return Scores(
        run.per_unit(lambda layers: float(sum(w.shape[0] + w.shape[1] for w, _ in layers)))
    )


def erk_densities(perimeter: torch.Tensor, sizes: torch.Tensor, target: float) -> torch.Tensor:
    """``d = min(1, eps * perimeter / size)`` with ``sum d * size = (1 - target) sum size``."""
    raw = perimeter.double() / sizes.double()
    dense = torch.zeros_like(raw, dtype=torch.bool)
    keep = (1 - target) * sizes.sum()
    while True:
        free = ~dense
        eps = (keep - sizes[dense].sum()) / (raw[free] * sizes[free]).sum()
        density = torch.where(dense, torch.ones_like(raw), eps * raw)
        over = free & (density > 1)
        if not over.any():
            return density
        dense |= over


def ratios(metric: torch.Tensor, target: float, sizes: torch.Tensor, **_) -> torch.Tensor:
    return 1 - erk_densities(metric, sizes, target)
