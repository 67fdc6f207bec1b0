"""OWL: Outlier Weighed Layerwise sparsity.

Yin et al., "Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret Sauce
for Pruning LLMs to High Sparsity", ICML 2024.

Metric: the *layerwise outlier distribution* (LOD). For a unit (a block, or one
layer) with Wanda scores ``A_ij = |W_ij| * ||X_j||_2`` on the dense model's
calibration activations, ``D = #{A_ij > M * mean(A)} / #A``: the fraction of
scores more than ``M`` times the unit's mean (pooled over all linear layers of
a block, as in the paper's code).

Mapping: more outliers, less sparsity. The ratios are normalised to
``[0, 2 lambda]``, ``r = 2 lambda (D - min D) / (max D - min D)``, and shifted so
the mean keep ratio is ``1 - target``: ``s = 1 - (r - mean(r) + 1 - target)``.
Ratios thus stay within ``target +- lambda`` (option ``spread``). Defaults are the
paper's for LLaMA: ``M = 5``, ``lambda = 0.08``. The ratios are fractions removed on
whatever axis is allocated (sparsity: the fraction pruned).

Where we differ: the paper centres the unweighted mean, which is exact only
when all units have the same size; the allocation layer then shifts the result
so the parameter-weighted sparsity is exactly the target.
"""

from __future__ import annotations

import torch

from ...engine.stats import COL_NORMS, WEIGHTS
from ...registry import Option
from ..sparsity.wanda import wanda_scores
from .run import AllocationRun, Scores

PAPER = (
    "Yin et al., Outlier Weighed Layerwise Sparsity (OWL): "
    "A Missing Secret Sauce for Pruning LLMs to High Sparsity, ICML 2024"
)
NEEDS = frozenset({WEIGHTS, COL_NORMS})
OPTIONS = (
    Option(
        "outlier_m",
        float,
        5.0,
        "a score is an outlier above M times the mean",
        low=0.0,
        low_open=True,
    ),
    Option(
        "spread",
        float,
        0.08,
        "unit ratios stay within target +- spread (the paper's lambda)",
        low=0.0,
        high=1.0,
        high_open=True,
        old=("lam",),
    ),
)
METRIC = "outlier_ratio"


def owl_outlier_ratio(scores: list[torch.Tensor], outlier_m: float) -> float:
    """Fraction of the pooled scores larger than ``outlier_m`` times their mean."""
    flat = torch.cat([s.flatten() for s in scores])
    return (flat > outlier_m * flat.mean()).float().mean().item()


def allocate(run: AllocationRun, *, outlier_m: float, **_) -> Scores:
    """LOD of every unit from its layers' weights and input norms."""
    return Scores(run.per_unit(
        lambda layers: owl_outlier_ratio(
            [wanda_scores(w.float(), s.col_norms) for w, s in layers], outlier_m
        )
    ))  # fmt: skip


def owl_ratios(metric: torch.Tensor, target: float, *, spread: float, **_) -> torch.Tensor:
    """Ratio per unit: ``1 - (r - mean(r) + 1 - target)``, ``r`` in ``[0, 2 lambda]``."""
    span = metric.max() - metric.min()
    if span <= 0:
        return torch.full_like(metric, target)
    r = (metric - metric.min()) / span * (2 * spread)
    keep = r - r.mean() + (1 - target)
    return 1 - keep


ratios = owl_ratios  # the registry's hook
