"""Round to nearest: every weight to the nearest point of its group's grid.

The data-free baseline of every quantization paper (e.g. Frantar et al., GPTQ, ICLR 2023,
Table 1 "RTN"): the scale and zero point of each group from its range
(:mod:`~prunella.methods.bits.grid`), then ``w_hat = (clamp(round(w / s) + z) - z) s``.
Exact zeros (pruned weights) stay zero.
"""

from __future__ import annotations

import torch

from ...engine.stats import LayerStats
from .grid import OBSERVER, Grid, fake_quantize, qparams

PAPER = "Round to nearest, the baseline of Frantar et al., GPTQ, ICLR 2023"
NEEDS: frozenset[str] = frozenset()
OPTIONS = (OBSERVER,)
FALLBACK = True  # what the quantizers fall back to where calibration data is too thin


def quantize(
    weight: torch.Tensor, grid: Grid, stats: LayerStats | None = None, *, observer: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """The quantized weight (float32), its scales and zero points, and facts."""
    scale, zero = qparams(weight, grid, observer)
    return fake_quantize(weight, scale, zero, grid), scale, zero, {}
