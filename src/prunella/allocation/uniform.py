"""Uniform allocation: every layer at the target sparsity (the papers' baseline)."""

from __future__ import annotations

import torch

NEEDS: frozenset[str] = frozenset()
DEFAULTS: dict = {}
METRIC = None


def unit_metric(layers, **_) -> float:
    return 0.0


def uniform_sparsities(metric: torch.Tensor, target: float, **_) -> torch.Tensor:
    return torch.full_like(metric, target)
