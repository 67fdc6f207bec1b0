"""Integer quantization grids, in the conventions of compressed-tensors (what vLLM and
transformers read), so that a weight quantized here is written and served unchanged.

A layer ``W`` (``[rows, cols]``) is cut into groups of ``g`` consecutive input columns;
each row of each group has its own scale ``s`` and zero point ``z``. With ``b`` bits the
codes are ``q`` in ``[qmin, qmax] = [-2^(b-1), 2^(b-1) - 1]``, and the group's range is
widened to hold zero, ``lo = min(min w, 0)``, ``hi = max(max w, 0)``:

* symmetric: ``s = max(|lo|, hi) / ((qmax - qmin) / 2)``, ``z = 0``;
* asymmetric: ``s = (hi - lo) / (qmax - qmin)``, ``z = clamp(round(qmin - lo / s), qmin, qmax)``;
* ``q = clamp(round(w / s) + z, qmin, qmax)`` (round half to even), ``w_hat = (q - z) s``.

Scales are rounded to bfloat16, which float16 (within its normal range) and float32 hold
exactly, so ``w_hat`` rounded once to the checkpoint's dtype is what an engine's
``(q - z) s`` gives; a zero scale (an all-zero group) becomes bfloat16's smallest
normal, and exact zeros stay exact zeros (``q = z``).

GGML's grids (what a GGUF file holds, for llama.cpp) are in blocks of 32 weights of a
row, with a float16 scale ``d`` per block (``ggml-quants.c``'s reference quantizers).
Symmetric:

* ``q8_0``: ``d = max|w| / 127``, int8 codes;
* ``q4_0``: ``d = m / -8`` with ``m`` the block's weight of largest magnitude, sign
  kept, so that ``m`` itself is the code ``-8``; codes in ``[-8, 7]``;
* ``q5_0``: the same with 5 bits, ``d = m / -16``, codes in ``[-16, 15]``.

With a float16 minimum ``m`` per block too (``--symmetric false``), ``w_hat = q d + m``:

* ``q4_1``: ``m = min w``, ``d = (max w - min w) / 15``, codes in ``[0, 15]``;
* ``q5_1``: the same with 5 bits, ``d = (max w - min w) / 31``, codes in ``[0, 31]``.

The codes are ``round((w - m) / d)`` with ``d`` and ``m`` already rounded to float16
(llama.cpp rounds them after choosing the codes; choosing against the stored values
is what the dequantized weight then is). A weight quantized on one of them is written
to GGUF as its codes, ``d`` (and ``m``) unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...errors import PrunellaError
from ...registry import Option

WIDTHS = (2, 3, 4, 8)  # the widths that compressed-tensors packs and engines read
GROUPS = (128, 64, 32)  # a layer whose width the asked group does not divide takes the next


@dataclass(frozen=True)
class Grid:
    """``bits`` per weight, one scale (and zero point) per ``group`` columns of a row."""

    bits: int
    group: int
    symmetric: bool = True
    ggml: str | None = None  # a GGML type (q8_0, q4_0): its block of 32 and float16 scales

    @property
    def has_min(self) -> bool:
        """A GGML grid with a float16 minimum per block (``q4_1``, ``q5_1``)."""
        return self.ggml in GGML_MIN.values()

    @property
    def qmin(self) -> int:
        return 0 if self.has_min else -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1 if self.has_min else 2 ** (self.bits - 1) - 1

    def __str__(self) -> str:
        if self.ggml:
            return self.ggml.upper()
        return f"int{self.bits} g{self.group} {'sym' if self.symmetric else 'asym'}"


GGML = {8: "q8_0", 5: "q5_0", 4: "q4_0"}  # the widths a GGML grid serves, and its type
GGML_MIN = {5: "q5_1", 4: "q4_1"}  # the same with a minimum per block (asymmetric)
GGML_BLOCK = 32


def ggml_type(bits: int, symmetric: bool) -> str:
    """The GGML type of a width: ``q4_0`` ..., or ``q4_1``/``q5_1`` when asymmetric."""
    return (GGML if symmetric else GGML_MIN)[bits]


def ggml_widths(symmetric: bool) -> tuple[int, ...]:
    """The widths GGML's grids serve, narrowest first."""
    return tuple(sorted(GGML if symmetric else GGML_MIN))


def layer_group(cols: int, asked: int) -> int:
    """The group size a layer of ``cols`` input columns takes: ``asked`` if it divides
    ``cols``, else the largest of 64 and 32 below it that does (576-wide layers: 64)."""
    for group in (asked, *(g for g in GROUPS if g < asked)):
        if cols % group == 0:
            return group
    raise PrunellaError(
        f"group size {asked}: a layer is {cols} columns wide, which neither it nor "
        f"{', '.join(str(g) for g in GROUPS if g < asked) or 'a smaller one'} divides"
    )


def qparams(
    weight: torch.Tensor, grid: Grid, observer: str = "minmax"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32, bfloat16 values; GGML: float16) and zero point (int8; GGML's
    minimum: float32) of every row of every group: ``[rows, cols / group]`` each.

    ``observer="minmax"`` takes each group's range as it is; ``"mse"`` shrinks it,
    ``[p lo, p hi]`` for ``p = 1, 0.99, ..., 0.21`` (``MSE_STEPS``, ``MSE_MAXSHRINK``),
    and keeps, per group, the ``p`` of least ``sum |w_hat - w|^2.4``: the grid search of
    the GPTQ reference's ``Quantizer(mse=True)`` with its defaults, each candidate's
    scale rounded to the stored dtype before its error is measured (the reference
    measures unrounded scales; llm-compressor's ``mse`` observer stops at ``p = 0.81``
    by default, and after 5 steps in which no group improves)."""
    if observer not in OBSERVER.choices:
        raise PrunellaError(f"observer {observer!r}: one of {', '.join(OBSERVER.choices)}")
    rows, cols = weight.shape
    groups = weight.float().reshape(rows, cols // grid.group, grid.group)
    lo, hi = groups.amin(-1), groups.amax(-1)
    m = None  # q4_0 and q5_0: the weight of largest magnitude, sign kept (first of a tie)
    if grid.ggml in ("q4_0", "q5_0"):
        m = groups.gather(-1, groups.abs().argmax(-1, keepdim=True)).squeeze(-1)
    scale, zero = _range_qparams(lo, hi, m, grid)
    if observer == "minmax":
        return scale, zero
    best = _group_error(groups, scale, zero, grid)
    for i in range(1, round(MSE_MAXSHRINK * MSE_STEPS)):
        p = 1 - i / MSE_STEPS
        s, z = _range_qparams(p * lo, p * hi, None if m is None else p * m, grid)
        err = _group_error(groups, s, z, grid)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero


MSE_STEPS, MSE_MAXSHRINK, MSE_NORM = 100, 0.8, 2.4  # the GPTQ reference's grid, maxshrink, norm
OBSERVER = Option("observer", str, "minmax", "each group's range: as is (minmax), or shrunk "
                  "to least error (mse)", choices=("minmax", "mse"))  # fmt: skip


def _group_error(groups, scale, zero, grid: Grid) -> torch.Tensor:
    """``sum |w_hat - w|^2.4`` over each group."""
    s, z = scale.unsqueeze(-1), zero.unsqueeze(-1).float()
    w_hat = dequantize(quantize(groups, s, z, grid), s, z, grid)
    return (w_hat - groups).abs_().pow_(MSE_NORM).sum(-1)


def _range_qparams(lo, hi, m, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of groups whose range is ``[lo, hi]`` (per row and group;
    ``m`` the weight of largest magnitude, for GGML's ``q4_0``/``q5_0``)."""
    if grid.ggml:
        return _ggml_qparams(lo, hi, m, grid)
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    # a divisor on the weights' device: CUDA divides by a Python number as a product with
    # its reciprocal, which moves a few scales by a unit in the last place
    span = torch.tensor(grid.qmax - grid.qmin, dtype=torch.float32, device=lo.device)
    scale = torch.maximum(lo.abs(), hi) / (span / 2) if grid.symmetric else (hi - lo) / span
    scale = scale.to(torch.bfloat16).float()
    scale = torch.where(scale == 0, torch.finfo(torch.bfloat16).tiny, scale)
    if grid.symmetric:
        zero = torch.zeros_like(scale)
    else:
        zero = (grid.qmin - lo / scale).round().clamp(grid.qmin, grid.qmax)
    return scale, zero.to(torch.int8)


def _ggml_qparams(lo, hi, m, grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """GGML's scale of each block (float16 values; negative for ``q4_0`` when the block's
    largest weight is positive) and no zero point; or, with a minimum (``q4_1``), the
    scale and the minimum (float32 holding float16 values) in the zero point's place."""
    if grid.has_min:
        scale = ((hi - lo) / grid.qmax).to(torch.float16).float()
        scale = torch.where(scale == 0, torch.finfo(torch.float16).tiny, scale)
        return scale, lo.to(torch.float16).float()
    # q8_0: max |w| / 127; q4_0, q5_0: the weight of largest magnitude, sign kept, is qmin
    scale = torch.maximum(lo.abs(), hi) / 127 if grid.ggml == "q8_0" else m / grid.qmin
    scale = scale.to(torch.float16).float()
    scale = torch.where(scale == 0, torch.finfo(torch.float16).tiny, scale)
    return scale, torch.zeros_like(scale, dtype=torch.int8)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Codes ``q = clamp(round(w / s) + z, qmin, qmax)`` (``scale``, ``zero`` broadcast);
    with a minimum ``m`` in ``zero``'s place, ``clamp(round((w - m) / s), 0, qmax)``."""
    if grid.has_min:
        return ((w - zero) / scale).round().clamp(grid.qmin, grid.qmax)
    return (w / scale).round().add(zero).clamp(grid.qmin, grid.qmax)


def dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grid: Grid
) -> torch.Tensor:
    """``w_hat = (q - z) s``; with a minimum ``m`` in ``zero``'s place, ``q s + m``."""
    if grid.has_min:
        return q * scale + zero
    return (q - zero) * scale


def kept_zero(weight: torch.Tensor, grid: Grid) -> torch.Tensor:
    """The weights that stay exactly zero when quantized (pruned ones): those that are
    zero, except on GGML's grids with a minimum per block (``q4_1``, ``q5_1``), which may
    hold no zero."""
    zero = weight == 0
    return zero.zero_() if grid.has_min else zero


def per_column(t: torch.Tensor, group: int) -> torch.Tensor:
    """``[rows, groups]`` parameters repeated to ``[rows, cols]``."""
    return t.repeat_interleave(group, dim=1)


def fake_quantize(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grid: Grid):
    """Every weight rounded to its group's grid (float32)."""
    s, z = per_column(scale, grid.group), per_column(zero.float(), grid.group)
    return dequantize(quantize(weight.float(), s, z, grid), s, z, grid)
