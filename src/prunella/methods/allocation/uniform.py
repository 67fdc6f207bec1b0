"""Uniform allocation: every layer at the target (the papers' baseline).

Every unit gets the target ratio; the axis's budget fitter then makes it exact, as for
every other method (sparsity: the model loses exactly ``round(target * prunable weights)``).
"""

from __future__ import annotations

import torch

from .run import AllocationRun, Scores

PAPER = "the uniform baseline of every layer-wise pruning paper"
NEEDS: frozenset[str] = frozenset()
OPTIONS = ()
METRIC = None


def allocate(run: AllocationRun) -> Scores:
    return Scores(dict.fromkeys(run.units, 0.0))


def ratios(metric: torch.Tensor, target: float, **_) -> torch.Tensor:
    return torch.full_like(metric, target)
