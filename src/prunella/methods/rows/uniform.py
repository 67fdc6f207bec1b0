"""Uniform rows: no per-row budgets; the solver spreads the layer's sparsity as its paper does.

Wanda gives every row the same share (its per-output comparison group),
SparseGPT lets the OBS saliency choose within each block of columns, magnitude
compares the whole matrix; ``N:M`` fixes every row's count by itself.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..sparsity.patterns import Pattern

PAPER = "the solver's own mask selection (no per-row budgets)"
NEEDS: frozenset[str] = frozenset()
OPTIONS = ()
FALLBACK = True  # the row method used where calibration data is too thin


def prune(
    weight: torch.Tensor, pattern: Pattern, stats, solve: Callable
) -> tuple[torch.Tensor, dict]:
    return solve(weight, pattern)
