"""Random pruning: remove weights chosen uniformly at random.

Liu et al., "The Unreasonable Effectiveness of Random Pruning: Return of the
Most Naive Baseline for Sparse Training", ICLR 2022. Score ``S_ij ~ U(0, 1)``,
independently per weight; the lowest ``round(s * numel)`` scores are pruned
(unstructured, over the whole matrix), or the ``M - N`` lowest of every group of
``M`` (``N:M``). Surviving weights are unchanged. The paper pairs it with
Erdos-Renyi-Kernel layer ratios (the ``erk`` allocation).

The generator is seeded with a CRC-32 of ``seed`` and of the layer's weight, so each
layer draws its own mask and the same inputs give the same masks on any machine.
"""

from __future__ import annotations

import zlib

import torch

from ...engine.stats import LayerStats
from ...registry import Option
from .patterns import Pattern, pattern_mask

PAPER = (
    "Liu et al., The Unreasonable Effectiveness of Random Pruning: "
    "Return of the Most Naive Baseline for Sparse Training, ICLR 2022"
)
NEEDS: frozenset[str] = frozenset()
OPTIONS = (
    Option("seed", int, 0, "seed of the random scores (mixed with each layer's CRC)", low=0),
)


def random_scores(weight: torch.Tensor, seed: int) -> torch.Tensor:
    """``S_ij ~ U(0, 1)`` from a generator seeded by ``seed`` and the weight's bytes."""
    data = weight.detach().float().contiguous().cpu().numpy().tobytes()
    generator = torch.Generator().manual_seed(zlib.crc32(data, zlib.crc32(str(seed).encode())))
    return torch.rand(weight.shape, generator=generator).to(weight.device)


def prune(
    weight: torch.Tensor, pattern: Pattern, stats: LayerStats | None, *, seed: int
) -> tuple[torch.Tensor, dict]:
    scores = random_scores(weight, seed)
    mask = pattern_mask(scores, pattern)
    return weight.masked_fill(mask, 0), {}
