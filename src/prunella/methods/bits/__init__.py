"""The bits axis: weights rounded to a few bits, by a layer-wise quantizer.

A quantizer rounds one weight matrix ``W`` (``[out_features, in_features]``, float32)
to a :class:`~prunella.methods.bits.grid.Grid` (bits, group size, symmetry), given the
layer statistics it declares in ``NEEDS``; it returns the quantized weight, its scales
and zero points, and facts for the report. A quantizer is one module with ``PAPER``,
``NEEDS``, ``OPTIONS`` and ``quantize(weight, grid, stats, **options)``, and one line in
:data:`QUANTIZERS`; third-party quantizers register through the ``prunella.quantizers``
entry point group.

The axis (see :mod:`prunella.methods`): the budget is a width, ``--bits 2|3|4|8``, for
every layer; a layer's level is its grid. A layer whose width the asked group size
(``--group-size``, 128) does not divide takes the largest of 64 and 32 that does, and
the report says so (SmolLM2's 576-wide layers take 64). The axis runs after sparsity:
a pruned weight stays exactly zero. The scales and zero points leave each layer beside
its weight (the compressor's ``tensors``), for the compressed-tensors checkpoint
(:mod:`prunella.io.quantized`). Written as GGUF (``--save-format gguf``), a layer takes
GGML's grid of its width (8 bits: ``q8_0``, 4 bits: ``q4_0``; blocks of 32 weights,
float16 scales) in place of ``--group-size``, so that its codes and scales are written
unchanged (:mod:`prunella.io.gguf_file`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

import torch
from pydantic import AfterValidator, Field

from ...errors import PrunellaError
from ...registry import Method, method_field
from ..plan import AxisPlan, Budget
from .grid import GGML, GGML_BLOCK, WIDTHS, Grid, layer_group
from .quantizers import QUANTIZERS

NAME = "bits"
ORDER = 30  # last: structure, then sparsity, then bits
DEFAULT = False
ALLOCATED = False  # every layer at the asked width (allocating widths is still to come)


def check_bits(bits: float | None) -> int | None:
    """``bits`` as a supported width, or a one-line error."""
    if bits is None:
        return None
    if bits not in WIDTHS:
        raise PrunellaError(
            f"bits must be one of {', '.join(map(str, WIDTHS))}, got {bits:g} (an average "
            "of several widths needs an allocation of widths, not built yet)"
        )
    return int(bits)


FIELDS = {
    "bits": (
        Annotated[float | None, AfterValidator(check_bits)],
        Field(None, description="Bits per weight of every layer: 2, 3, 4 or 8."),
    ),
    "quantizer": method_field("gptq", "Quantizer (see 'prunella methods')."),
    "group_size": (
        int,
        Field(
            128,
            ge=8,
            description="Weights per scale along a row (a layer it does not divide takes 64 "
            "or 32).",
        ),
    ),
    "symmetric": (
        bool,
        Field(True, description="Symmetric grid (no zero points), as vLLM's int4 kernels want."),
    ),
}
METHODS = {"quantizer": QUANTIZERS}
DENSE_BITS = 16  # what a width is measured against (bfloat16)


def budget(recipe, default: bool = False) -> Budget | None:
    """The recipe's width (``None`` when it asks for no bits)."""
    if recipe.bits is None:
        return None
    bits = check_bits(recipe.bits)
    if recipe.save_format == "packed":
        raise PrunellaError(
            "--save-format packed (sparse-bitmask) holds no quantized weights: with --bits "
            "use compressed-tensors (the default) or dense"
        )
    if recipe.save_format == "gguf" and (bits not in GGML or not recipe.symmetric):
        raise PrunellaError(
            f"--save-format gguf holds {' and '.join(f'{b} bits ({GGML[b]})' for b in GGML)}"
            f", symmetric; got {bits} bits{'' if recipe.symmetric else ', asymmetric'}"
        )
    if not recipe.symmetric and recipe.save_format in ("auto", "compressed-tensors"):
        raise PrunellaError(
            "asymmetric grids written as compressed-tensors do not load in transformers "
            "(its reader expects unpacked zero points): use --symmetric true, or "
            "--save-format dense"
        )
    return Budget(
        NAME,
        float(bits),
        1 - bits / DENSE_BITS,
        lo=1 - max(WIDTHS) / DENSE_BITS,
        hi=1 - min(WIDTHS) / DENSE_BITS,
        spec=(recipe.group_size, recipe.symmetric, recipe.save_format == "gguf"),
    )


def fit(raw: dict[str, float], sizes: dict[str, int], budget: Budget) -> tuple[dict, dict]:
    """Per-layer widths from raw ratios (the fraction of a 16-bit layer removed): the
    supported width nearest ``16 (1 - r_l - c)``, one common shift ``c`` (bisection) for
    the weighted mean width closest to the target; equal ratios give the target itself."""
    names = list(raw)
    r = torch.tensor([raw[n] for n in names], dtype=torch.float64)
    n = torch.tensor([sizes[n] for n in names], dtype=torch.float64)
    widths = torch.tensor(WIDTHS, dtype=torch.float64)

    def levels(shift: float) -> torch.Tensor:
        wanted = DENSE_BITS * (1 - r - shift)
        return widths[(wanted.unsqueeze(1) - widths).abs().argmin(1)]

    def mean(bits: torch.Tensor) -> float:
        return ((bits * n).sum() / n.sum()).item()

    a, b = -1.0, 1.0  # a shift up removes more, so the mean width falls
    for _ in range(60):
        mid = (a + b) / 2
        a, b = (mid, b) if mean(levels(mid)) > budget.target else (a, mid)
    best = min((levels(a), levels(b)), key=lambda bits: abs(mean(bits) - budget.target))
    group, symmetric, ggml = budget.spec
    values = {name: float(bits) for name, bits in zip(names, best.tolist(), strict=True)}
    if ggml:  # GGML's blocks of 32, its type from the width
        detail = {
            "group": dict.fromkeys(names, GGML_BLOCK),
            "symmetric": dict.fromkeys(names, True),
            "ggml": {name: GGML[int(bits)] for name, bits in values.items()},
        }
        return values, detail
    detail = {"group": dict.fromkeys(names, group), "symmetric": dict.fromkeys(names, symmetric)}
    return values, detail


def levels(plan: AxisPlan, shapes: dict[str, tuple[int, int]]) -> dict[str, Grid]:
    """Each layer's grid: its width, the group size its width allows, the symmetry."""
    group, symmetric = plan.detail.get("group", {}), plan.detail.get("symmetric", {})
    ggml = plan.detail.get("ggml", {})
    return {
        name: Grid(
            int(bits), layer_group(shapes[name][1], int(group.get(name, 128))),
            bool(symmetric.get(name, True)), ggml.get(name),
        )
        for name, bits in plan.values.items()
    }  # fmt: skip


def check(plan: AxisPlan, shapes: dict[str, tuple[int, int]], budget, where: str) -> None:
    """Every width supported, groups whole numbers a layer can take, symmetry a flag."""
    unknown = sorted(set(plan.detail) - {"group", "symmetric", "ggml"})
    if unknown:
        raise PrunellaError(f"{where}: unknown key {unknown[0]!r} in the bits plan")
    for name, kind in plan.detail.get("ggml", {}).items():
        if kind not in GGML.values() or GGML.get(int(plan.values.get(name, 0))) != kind:
            raise PrunellaError(
                f"{where}: the ggml type of {name!r} must be that of its width "
                f"({', '.join(f'{b}: {k}' for b, k in GGML.items())}), got {kind!r}"
            )
    for name, bits in plan.values.items():
        if bits not in WIDTHS:
            raise PrunellaError(
                f"{where}: bits of {name!r} must be one of {', '.join(map(str, WIDTHS))}, "
                f"got {bits:g}"
            )
    for key, kind in (("group", int), ("symmetric", bool)):
        given = plan.detail.get(key, {})
        if not isinstance(given, dict) or not set(given) <= set(shapes):
            raise PrunellaError(f"{where}: {key!r} must map layers to values")
        if not all(type(v) is kind for v in given.values()):
            raise PrunellaError(f"{where}: every {key!r} must be {kind.__name__}")
    levels(plan, shapes)  # a group no layer width allows: one line


def layer_bytes(shape: tuple[int, int], level: Grid, nbytes: int, save_format: str) -> int:
    """The layer's bytes once quantized: in a compressed-tensors checkpoint, its packed
    codes (int32 words), a scale per group (the checkpoint's dtype) and, when asymmetric,
    packed zero points; in any other format, unchanged (the weights stay dense)."""
    rows, cols = shape
    if save_format == "gguf" and level.ggml:  # a float16 scale per block of 32
        return rows * cols // GGML_BLOCK * (2 + GGML_BLOCK * level.bits // 8)
    if save_format != "compressed-tensors":
        return nbytes
    element = nbytes // (rows * cols)
    groups = cols // level.group
    size = rows * math.ceil(cols * level.bits / 32) * 4 + rows * groups * element + 16
    if not level.symmetric:
        size += math.ceil(rows * level.bits / 32) * 4 * groups
    return size


@dataclass
class Quantizer:
    """The bits axis's compressor: the recipe's quantizer at each layer's grid."""

    method: Method
    options: dict
    axis: str = NAME

    @property
    def name(self) -> str:
        return self.method.name

    @property
    def needs(self) -> frozenset[str]:
        return self.method.needs

    @property
    def data_free_note(self) -> str:
        return f"quantized by {QUANTIZERS.fallback().name}"

    def __call__(
        self, weight: torch.Tensor, level: Grid, stats, data_free: bool = False
    ) -> tuple[torch.Tensor, dict]:
        method, options = self.method, self.options
        if data_free:  # too few calibration tokens: what needs no statistics
            method = QUANTIZERS.fallback()
            options = method.defaults()
        new, scale, zero, facts = method.quantize(weight, level, stats, **options)
        tensors = {"weight_scale": scale}
        if not level.symmetric:
            tensors["weight_zero_point"] = zero
        return new, facts | {"group": level.group, "tensors": tensors}

    def describe(self, level: Grid) -> dict:
        described = {"bits": level.bits, "symmetric": level.symmetric}
        return described | ({"ggml": level.ggml} if level.ggml else {})


def compressor(recipe) -> Quantizer:
    return Quantizer(QUANTIZERS.get(recipe.quantizer.name), recipe.quantizer.options)


def report(recipe, plan: AxisPlan, results: list[dict]) -> dict:
    """The report's bits keys (quantizer, width, groups) and its summary line."""
    sizes = [r["shape"][0] * r["shape"][1] for r in results]
    mean = sum(r["bits"] * n for r, n in zip(results, sizes, strict=True)) / sum(sizes)
    ggml = sorted({r["ggml"] for r in results if r.get("ggml")})
    smaller = 0 if ggml else sum(r["group"] != recipe.group_size for r in results)
    note = f"; {smaller} layer(s) in smaller groups" if smaller else ""
    group = (
        f"GGML {', '.join(ggml).upper()}, blocks of 32" if ggml else f"group {recipe.group_size}"
    )
    return {
        "quantizer": recipe.quantizer.name,
        "quantizer_options": recipe.quantizer.options,
        "bits": mean,
        "group_size": recipe.group_size,
        "symmetric": recipe.symmetric,
        "layers_in_smaller_groups": smaller,
        "summary": f"{mean:g} bits per weight ({recipe.quantizer.name}, {group}{note}, "
        f"{'symmetric' if recipe.symmetric else 'asymmetric'})",
    }


def record(recipe, plan: AxisPlan) -> dict:
    return {}
