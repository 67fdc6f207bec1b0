"""Wanda: pruning by weights and activations.

Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for Large
Language Models", ICLR 2024. The score of weight ``W_ij`` is

    S_ij = |W_ij| * ||X_j||_2

where ``X_j`` is input feature ``j`` over all calibration tokens. Weights are
compared per output row (the paper's key finding); for ``N:M`` within each group
of ``M`` of a row. No weight update.

Where we differ: the paper prunes ``floor(s * in_features)`` per row, which can
miss the layer's budget by up to one weight per row. Here every row loses
``k // rows`` weights and the ``k % rows`` remaining ones go to the rows whose
next-lowest score is smallest, so the layer loses exactly ``k = round(s * numel)``.
Under per-row budgets (``--rows trim``) row ``r`` loses its ``counts[r]`` lowest scores.
"""

from __future__ import annotations

import torch

from ...engine.stats import COL_NORMS, LayerStats
from .patterns import Pattern, pattern_mask

PAPER = "Sun et al., A Simple and Effective Pruning Approach for Large Language Models, ICLR 2024"
NEEDS = frozenset({COL_NORMS})
OPTIONS = ()


def wanda_scores(weight: torch.Tensor, col_norms: torch.Tensor) -> torch.Tensor:
    """``S_ij = |W_ij| * ||X_j||_2``."""
    return weight.abs() * col_norms.to(weight.dtype).unsqueeze(0)


def prune(weight: torch.Tensor, pattern: Pattern, stats: LayerStats) -> tuple[torch.Tensor, dict]:
    scores = wanda_scores(weight, stats.col_norms)
    mask = pattern_mask(scores, pattern, per_row=True)
    return weight.masked_fill(mask, 0), {}
