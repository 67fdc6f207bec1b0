"""ShortGPT's block influence: how much a block changes the hidden state it is given.

Men et al., "ShortGPT: Layers in Large Language Models are More Redundant Than You
Expect" (2024), eq. 1: for block ``i`` with input ``x_t`` and output ``y_t`` at token
``t``,

    BI_i = 1 - E_t [ x_t . y_t / (||x_t|| ||y_t||) ]

averaged over the calibration tokens; the blocks of lowest influence are removed
first. As in the paper, the scores are taken once on the dense model (removing one
block does not re-score the others).
"""

from __future__ import annotations

import torch

PAPER = (
    "Men et al., ShortGPT: Layers in Large Language Models are More Redundant Than You Expect, 2024"
)


def block_influence(cosine_sums: torch.Tensor, tokens: int) -> torch.Tensor:
    """``BI`` per block from the summed per-token cosines of its input and output."""
    return 1.0 - cosine_sums / tokens


def token_cosines(inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of ``cos(x_t, y_t)`` (float32; ``[..., hidden]`` each)."""
    x, y = inputs.float().flatten(0, -2), outputs.float().flatten(0, -2)
    return torch.nn.functional.cosine_similarity(x, y, dim=-1, eps=1e-8).sum()


def lowest_influence(influence: torch.Tensor, count: int) -> list[int]:
    """The ``count`` blocks of lowest influence (ties: the later block), in model order."""
    order = sorted(range(len(influence)), key=lambda i: (float(influence[i]), -i))
    return sorted(order[:count])
