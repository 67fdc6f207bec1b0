"""Activation-weighted magnitude of a structural unit, with no reconstruction: the
baseline of structured pruning (Wanda's score, Sun et al., ICLR 2024, summed over the
consumer's input columns that a unit owns, as LLM-Pruner's and FLAP's comparisons use
it):

    S_G = sum_{c in G} ||W_:,c||_2 * ||X_c||_2

where ``||X_c||_2 = sqrt(H_cc)``. Units are removed lowest score first and the kept
weights are left as they are.
"""

from __future__ import annotations

import torch

PAPER = "Sun et al., A Simple and Effective Pruning Approach for LLMs (Wanda, ICLR 2024)"


def removal_order(weight: torch.Tensor, hessian: torch.Tensor, group: int, stop: int) -> list[int]:
    """Units (groups of ``group`` input columns) lowest score first, all but ``stop``."""
    columns = weight.double().norm(dim=0) * torch.diagonal(hessian).double().clamp(min=0).sqrt()
    scores = columns.reshape(-1, group).sum(1)
    return torch.argsort(scores, stable=True)[: len(scores) - stop].tolist()
