"""Uniform allocation: every layer at the target sparsity (the papers' baseline).

The budget is fitted like every other method's (:func:`prunella.allocation.plan.fit_budget`),
so the model as a whole loses exactly ``round(target * prunable weights)``.
"""

from __future__ import annotations

import torch

PAPER = "the uniform baseline of every layer-wise pruning paper"
NEEDS: frozenset[str] = frozenset()
OPTIONS = ()
METRIC = None


def unit_metric(layers, **_) -> float:
    return 0.0


def sparsities(metric: torch.Tensor, target: float, **_) -> torch.Tensor:
    return torch.full_like(metric, target)
