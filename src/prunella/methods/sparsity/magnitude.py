"""Magnitude pruning: remove the weights of smallest absolute value.

The classic baseline (Han et al., "Learning both Weights and Connections for
Efficient Neural Networks", NeurIPS 2015), used as the layer-wise baseline in
SparseGPT and Wanda: score ``S_ij = |W_ij|``, compared across the whole matrix
for unstructured sparsity (as in both papers' code) and within each group of
``M`` for ``N:M``. Needs no calibration data; surviving weights are unchanged.
"""

from __future__ import annotations

import torch

from ...engine.stats import LayerStats
from .patterns import Pattern, pattern_mask

PAPER = (
    "Han et al., Learning both Weights and Connections for Efficient Neural Networks, NeurIPS 2015"
)
NEEDS: frozenset[str] = frozenset()
OPTIONS = ()
FALLBACK = True  # what the solvers fall back to where calibration data is too thin


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """``S = |W|``."""
    return weight.abs()


def prune(
    weight: torch.Tensor, pattern: Pattern, stats: LayerStats | None = None
) -> tuple[torch.Tensor, dict]:
    scores = magnitude_scores(weight)
    mask = pattern_mask(scores, pattern)
    return weight.masked_fill(mask, 0), {}
