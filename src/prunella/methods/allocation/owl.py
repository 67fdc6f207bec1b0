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
Sparsities thus stay within ``target +- lambda``. Defaults are the paper's for
LLaMA: ``M = 5``, ``lambda = 0.08``.

Where we differ: the paper centres the unweighted mean, which is exact only
when all units have the same size; the allocation layer then shifts the result
so the parameter-weighted sparsity is exactly the target.
"""

from __future__ import annotations

import torch

from ...engine.stats import COL_NORMS, WEIGHTS
from ...registry import Option
from ..sparsity.wanda import wanda_scores

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
        "lam",
        float,
        0.08,
        "sparsities stay within target +- lambda",
        low=0.0,
        high=1.0,
        high_open=True,
    ),
)
METRIC = "outlier_ratio"


def owl_outlier_ratio(scores: list[torch.Tensor], outlier_m: float = 5.0) -> float:
    """Fraction of the pooled scores larger than ``outlier_m`` times their mean."""
    flat = torch.cat([s.flatten() for s in scores])
    return (flat > outlier_m * flat.mean()).float().mean().item()


def unit_metric(layers: list[tuple[torch.Tensor, object]], outlier_m: float = 5.0, **_) -> float:
    """LOD of one unit from its layers' ``(weight, stats)`` pairs."""
    return owl_outlier_ratio([wanda_scores(w.float(), s.col_norms) for w, s in layers], outlier_m)


def owl_sparsities(metric: torch.Tensor, target: float, lam: float = 0.08, **_) -> torch.Tensor:
    """Sparsity per unit: ``1 - (r - mean(r) + 1 - target)``, ``r`` in ``[0, 2 lambda]``."""
    spread = metric.max() - metric.min()
    if spread <= 0:
        return torch.full_like(metric, target)
    ratios = (metric - metric.min()) / spread * (2 * lam)
    keep = ratios - ratios.mean() + (1 - target)
    return 1 - keep


sparsities = owl_sparsities  # the registry's hook
