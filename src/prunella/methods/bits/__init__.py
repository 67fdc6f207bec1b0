"""The bits axis: weights rounded to a few bits, by a layer-wise quantizer.

A quantizer rounds one weight matrix ``W`` (``[out_features, in_features]``, float32)
to a :class:`~prunella.methods.bits.grid.Grid` (bits, group size, symmetry), given the
layer statistics it declares in ``NEEDS``; it returns the quantized weight, its scales
and zero points, and facts for the report. A quantizer is one module with ``PAPER``,
``NEEDS``, ``OPTIONS`` and ``quantize(weight, grid, stats, **options)``, and one line in
:data:`QUANTIZERS`; third-party quantizers register through the ``prunella.quantizers``
entry point group.

The axis (see :mod:`prunella.methods`): the budget is a width, ``--bits 2|3|4|8``, for
every layer; or, when an allocation places the widths (``--allocation`` other than
uniform, or a plan file), an average in bits per weight with the scales and zero points
counted (``--bits 3.5``; 4 bits at group 64 cost 4.25), met from below (:func:`fit`).
Every score-based allocation maps its scores to widths through :func:`fit`; a layer's
level is its grid. A layer whose width the asked group size
(``--group-size``, 128) does not divide takes the largest of 64 and 32 that does, and
the report says so (SmolLM2's 576-wide layers take 64). The axis runs after sparsity:
a pruned weight stays exactly zero. The scales and zero points leave each layer beside
its weight (the compressor's ``tensors``), for the compressed-tensors checkpoint
(:mod:`prunella.io.quantized`). Written as GGUF (``--format gguf``), a layer takes
GGML's grid of its width (8 bits: ``q8_0``, 5: ``q5_0``, 4: ``q4_0``; with ``--symmetric
false``, 5: ``q5_1``, 4: ``q4_1``, a float16 minimum per block too; blocks of 32 weights,
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
from .grid import GGML_BLOCK, WIDTHS, Grid, ggml_type, ggml_widths, layer_group
from .quantizers import QUANTIZERS
from .sparsegpt import check_joint

NAME = "bits"
ORDER = 30  # last: structure, then sparsity, then bits
DEFAULT = False


def check_bits(bits: float | None) -> float | None:
    """``bits`` as a width or an average between the narrowest and the widest, or a
    one-line error."""
    if bits is None:
        return None
    if not min(WIDTHS) <= bits <= max(WIDTHS):
        raise PrunellaError(
            f"bits must be a width ({', '.join(map(str, WIDTHS))}) or an average of widths "
            f"between {min(WIDTHS)} and {max(WIDTHS)}, got {bits:g}"
        )
    return float(bits)


FIELDS = {
    "bits": (
        Annotated[float | None, AfterValidator(check_bits)],
        Field(
            None,
            description="Bits per weight: a width (2, 3, 4, 8) for every layer, or with an "
            "--allocation an average of widths, scales and zero points counted.",
        ),
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
SCALE_BITS = 16  # a scale's bits as a budget counts them (bfloat16, float16)


@dataclass(frozen=True)
class Spec:
    """The bits budget's own form: the asked group, the symmetry, whether the grids are
    GGML's (GGUF output), and whether ``target`` is an average of widths (allocated)
    rather than the width of every layer."""

    group: int
    symmetric: bool
    ggml: bool
    average: bool


def budget(recipe, default: bool = False) -> Budget | None:
    """The recipe's bits: a width for every layer, or, when an allocation places them
    (``--allocation`` other than uniform, or a plan file), an average of widths."""
    if recipe.bits is None:
        return None
    bits = check_bits(recipe.bits)
    allocated = recipe.allocation.name != "uniform" or recipe.allocation_file is not None
    ggml = recipe.format == "gguf"
    widths = axis_widths(ggml, recipe.symmetric)
    if recipe.format == "sparse-bitmask":
        raise PrunellaError(
            "--format sparse-bitmask holds no quantized weights: with --bits use "
            "compressed-tensors (the default), gguf or hf"
        )
    average = "an average of widths needs an --allocation to place them (owl, ...)"
    if ggml and not allocated and bits not in widths:
        held = ", ".join(f"{b} bits ({ggml_type(b, recipe.symmetric)})" for b in widths)
        raise PrunellaError(
            f"--format gguf holds {held}"
            f"{'' if recipe.symmetric else ' with --symmetric false'}; got {bits:g} bits"
            f" ({average})"
        )
    if (
        ggml
        and not recipe.symmetric
        and (recipe.sparsity is not None or ":" in str(recipe.pattern))
    ):
        raise PrunellaError(
            "--symmetric false with --format gguf quantizes on q4_1/q5_1, whose blocks may "
            "hold no zero, so pruned weights would not stay zero: use --symmetric true "
            "(q4_0, q5_0, q8_0) with --sparsity"
        )
    if not allocated and bits not in widths:
        raise PrunellaError(
            f"--bits {bits:g} is not a width ({', '.join(map(str, widths))}); {average}"
        )
    smallest = bits_per_weight(min(widths), recipe.group_size, recipe.symmetric, ggml)
    if allocated and bits < smallest:
        raise PrunellaError(
            f"--bits {bits:g} (an average, scales and zero points counted) is below the "
            f"smallest width's {smallest:g} bits per weight "
            f"{'in GGML blocks' if ggml else f'at group {recipe.group_size}'}"
        )
    if recipe.quantizer.name == "sparsegpt":
        check_joint(recipe)
    if not recipe.symmetric and recipe.format in ("auto", "compressed-tensors"):
        raise PrunellaError(
            "asymmetric grids written as compressed-tensors do not load in transformers "
            "(its reader expects unpacked zero points): use --symmetric true, or "
            "--format hf"
        )
    return Budget(
        NAME,
        bits,
        1 - bits / DENSE_BITS,
        lo=1 - max(widths) / DENSE_BITS,
        hi=1 - min(widths) / DENSE_BITS,
        spec=Spec(recipe.group_size, recipe.symmetric, ggml, allocated),
        allocated=allocated,
    )


def axis_widths(ggml: bool, symmetric: bool = True) -> tuple[int, ...]:
    """The widths a layer can take, narrowest first: GGML's for GGUF (4, 5, 8; 4 and 5
    with a minimum per block), else all."""
    return ggml_widths(symmetric) if ggml else WIDTHS


def bits_per_weight(width: int, group: int, symmetric: bool, ggml: bool = False) -> float:
    """What one weight costs on disk: its code, plus a 16-bit scale per group (and a
    ``width``-bit zero point per group when asymmetric); GGML's blocks: 32 weights and
    one float16 scale (``q4_0``: 4.5, ``q8_0``: 8.5), and a float16 minimum when
    asymmetric (``q4_1``: 5.0, ``q5_1``: 6.0)."""
    if ggml:
        return width + SCALE_BITS * (1 if symmetric else 2) / GGML_BLOCK
    return width + (SCALE_BITS + (0 if symmetric else width)) / group


def fit(raw: dict[str, float], shapes: dict[str, tuple[int, int]], budget: Budget) -> tuple:
    """Per-layer widths from raw ratios (the fraction of a 16-bit layer removed).

    At a whole width every layer takes it. An average ``B`` (bits per weight, scales and
    zero points counted, :func:`bits_per_weight`) is met from below: with ``n_l`` weights
    in layer ``l`` and ``c_l(w)`` its bits per weight at width ``w``, each layer takes the
    width nearest ``16 (1 - r_l - c)``, the shift ``c`` the smallest (bisection) with
    ``sum_l n_l c_l(w_l) <= B sum_l n_l``; then, in the order of how far each layer's
    wanted width lies above its own, layers move one width up while the total stays
    within the budget. The mean ends at most ``B`` and short of it by less than one more
    layer's step up."""
    spec: Spec = budget.spec
    names = list(raw)
    widths = axis_widths(spec.ggml, spec.symmetric)
    if not spec.average:
        values = dict.fromkeys(names, budget.target)
    else:
        values = _fit_average(raw, shapes, budget, widths)
    if spec.ggml:  # GGML's blocks of 32, its type from the width
        detail = {
            "group": dict.fromkeys(names, GGML_BLOCK),
            "symmetric": dict.fromkeys(names, spec.symmetric),
            "ggml": {n: ggml_type(int(bits), spec.symmetric) for n, bits in values.items()},
        }
        return values, detail
    detail = {
        "group": dict.fromkeys(names, spec.group),
        "symmetric": dict.fromkeys(names, spec.symmetric),
    }
    return values, detail


def _fit_average(raw: dict, shapes: dict, budget: Budget, widths: tuple[int, ...]) -> dict:
    """See :func:`fit`: the widths of an average budget."""
    spec: Spec = budget.spec
    names = list(raw)
    r = torch.tensor([raw[n] for n in names], dtype=torch.float64)
    n = torch.tensor([shapes[m][0] * shapes[m][1] for m in names], dtype=torch.float64)
    w = torch.tensor(widths, dtype=torch.float64)
    groups = [1 if spec.ggml else layer_group(shapes[m][1], spec.group) for m in names]
    cost = width_costs(n, groups, widths, spec.symmetric, spec.ggml)
    total = budget.target * n.sum().item()
    if cost[:, 0].sum().item() > total * (1 + 1e-12):
        smallest = cost[:, 0].sum().item() / n.sum().item()
        raise PrunellaError(
            f"--bits {budget.target:g} is below what these layers can take at their "
            f"narrowest width ({smallest:.4g} bits per weight, scales counted)"
        )

    index = fit_widths(r, cost, w, total)
    return {name: float(widths[k]) for name, k in zip(names, index.tolist(), strict=True)}


def width_costs(
    sizes: torch.Tensor, groups: list[int], widths, symmetric: bool, ggml: bool
) -> torch.Tensor:
    """``cost[l, k]``: the bits of layer ``l`` (``sizes[l]`` weights, group ``groups[l]``)
    at width ``widths[k]``, scales counted (:func:`bits_per_weight`)."""
    per_weight = [[bits_per_weight(int(x), g, symmetric, ggml) for x in widths] for g in groups]
    return torch.tensor(per_weight, dtype=torch.float64) * sizes.unsqueeze(1)


def fit_widths(
    raw: torch.Tensor, cost: torch.Tensor, widths: torch.Tensor, total: float
) -> torch.Tensor:
    """The width index of each layer (see :func:`fit`): ``raw`` the layers' ratios,
    ``cost[l, k]`` layer ``l``'s bits at width ``widths[k]``, at most ``total`` bits in
    all (the narrowest widths must fit)."""

    def chosen(shift: float) -> tuple[torch.Tensor, torch.Tensor]:
        wanted = DENSE_BITS * (1 - raw - shift)
        index = (wanted.unsqueeze(1) - widths).abs().argmin(1)
        return index, wanted

    def spent(index: torch.Tensor) -> float:
        return cost.gather(1, index.unsqueeze(1)).sum().item()

    a, b = -2.0, 2.0  # shift a: every layer widest; shift b: every layer narrowest
    if spent(chosen(a)[0]) <= total:
        b = a
    for _ in range(80):
        if b == a:
            break
        mid = (a + b) / 2
        a, b = (a, mid) if spent(chosen(mid)[0]) <= total else (mid, b)
    index, wanted = chosen(b)
    left = total - spent(index)
    for i in (wanted - widths[index]).argsort(descending=True, stable=True).tolist():
        if index[i] + 1 < len(widths):
            step = (cost[i, index[i] + 1] - cost[i, index[i]]).item()
            if step <= left:
                index[i] += 1
                left -= step
    return index


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
    for key, kind in (("group", int), ("symmetric", bool)):
        given = plan.detail.get(key, {})
        if not isinstance(given, dict) or not set(given) <= set(shapes):
            raise PrunellaError(f"{where}: {key!r} must map layers to values")
        if not all(type(v) is kind for v in given.values()):
            raise PrunellaError(f"{where}: every {key!r} must be {kind.__name__}")
    ggml_types = plan.detail.get("ggml", {})
    if not isinstance(ggml_types, dict):
        raise PrunellaError(f"{where}: 'ggml' must map layers to GGML types")
    symmetric_of = plan.detail.get("symmetric", {})
    if budget is not None and not budget.spec.symmetric and set(symmetric_of) != set(plan.values):
        raise PrunellaError(f"{where}: with --symmetric false, 'symmetric' must name every layer")
    if budget is not None and any(v != budget.spec.symmetric for v in symmetric_of.values()):
        raise PrunellaError(
            f"{where}: its grids' symmetry must be the recipe's (--symmetric "
            f"{str(budget.spec.symmetric).lower()})"
        )
    for name, kind in ggml_types.items():
        symmetric = bool(symmetric_of.get(name, True))
        widths = ggml_widths(symmetric)
        bits = int(plan.values.get(name, 0))
        if bits not in widths or ggml_type(bits, symmetric) != kind:
            raise PrunellaError(
                f"{where}: the ggml type of {name!r} must be that of its width and symmetry "
                f"({', '.join(f'{b}: {ggml_type(b, symmetric)}' for b in widths)}), got {kind!r}"
            )
    if ggml_types and budget is not None and not budget.spec.ggml:
        raise PrunellaError(f"{where}: its GGML types need --format gguf")
    for name, bits in plan.values.items():
        allowed = ggml_widths(bool(symmetric_of.get(name, True))) if name in ggml_types else WIDTHS
        if bits not in allowed:
            raise PrunellaError(
                f"{where}: bits of {name!r} must be one of {', '.join(map(str, allowed))}, "
                f"got {bits:g}"
            )
    grids = levels(plan, shapes)  # a group no layer width allows: one line
    if budget is not None and budget.spec.average:
        mean = mean_bits_per_weight(grids, shapes)
        if mean > budget.target + 1e-9:
            raise PrunellaError(
                f"{where}: its widths average {mean:.4g} bits per weight (scales counted), "
                f"above the recipe's {budget.target:g}"
            )


def mean_bits_per_weight(grids: dict[str, Grid], shapes: dict[str, tuple[int, int]]) -> float:
    """The weight-weighted mean of :func:`bits_per_weight` over the layers."""
    sizes = {name: shapes[name][0] * shapes[name][1] for name in grids}
    total = sum(
        bits_per_weight(g.bits, g.group, g.symmetric, bool(g.ggml)) * sizes[name]
        for name, g in grids.items()
    )
    return total / sum(sizes.values())


def layer_bytes(shape: tuple[int, int], level: Grid, nbytes: int, fmt: str) -> int:
    """The layer's bytes once quantized: in a compressed-tensors checkpoint, its packed
    codes (int32 words), a 16-bit scale per group (:func:`prunella.io.quantized.scale_dtype`)
    and, when asymmetric, packed zero points; in any other format, unchanged (the weights
    stay dense)."""
    rows, cols = shape
    if fmt == "gguf" and level.ggml:  # a float16 scale (and minimum) per block of 32
        return rows * cols // GGML_BLOCK * (2 * (1 + level.has_min) + GGML_BLOCK * level.bits // 8)
    if fmt != "compressed-tensors":
        return nbytes
    groups = cols // level.group
    size = rows * math.ceil(cols * level.bits / 32) * 4 + rows * groups * SCALE_BITS // 8 + 16
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
            method = QUANTIZERS.fallback()  # with the options it shares (the observer)
            defaults = method.defaults()
            options = defaults | {k: options[k] for k in defaults.keys() & options.keys()}
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


class LevelQuantizer(Quantizer):
    """What fills the searches' level database on this axis: the quantizer at every
    width of every layer, from the dense weight and the dense model's statistics."""

    @property
    def key(self) -> dict:
        return {"quantizer": self.method.name, "options": self.options}

    def __call__(self, weight: torch.Tensor, level: Grid, stats) -> torch.Tensor:
        return self.method.quantize(weight, level, stats, **self.options)[0]


def level_solver(recipe) -> LevelQuantizer:
    return LevelQuantizer(QUANTIZERS.get(recipe.quantizer.name), recipe.quantizer.options)


def ladder(shapes: dict[str, tuple[int, int]], budget: Budget, hidden_size: int, levels: int):
    """EvoPress's quantization levels: every width for every layer (``levels`` and the
    hidden size do not apply), level 0 the fitter's widths at equal ratios (the fewest
    layers away from the average's width; ties go to the earlier layers)."""
    from ..search.levels import WidthLadder

    if not budget.spec.average:
        raise PrunellaError("a search over bits needs an average (--bits with --allocation)")
    spec: Spec = budget.spec
    widths = axis_widths(spec.ggml, spec.symmetric)
    start, _ = fit(dict.fromkeys(shapes, budget.fraction), shapes, budget)
    return WidthLadder(
        target=budget.fraction,
        average=budget.target,
        widths=list(widths),
        size={n: rows * cols for n, (rows, cols) in shapes.items()},
        group={
            n: GGML_BLOCK if spec.ggml else layer_group(cols, spec.group)
            for n, (_, cols) in shapes.items()
        },
        start={n: widths.index(int(bits)) for n, bits in start.items()},
        symmetric=spec.symmetric,
        ggml=spec.ggml,
    )


def report(recipe, plan: AxisPlan, results: list[dict]) -> dict:
    """The report's bits keys (quantizer, widths, groups, bits per weight with scales)
    and its summary line."""
    sizes = [r["shape"][0] * r["shape"][1] for r in results]
    mean = sum(r["bits"] * n for r, n in zip(results, sizes, strict=True)) / sum(sizes)
    with_scales = mean_bits_per_weight(
        {r["name"]: Grid(r["bits"], r["group"], r["symmetric"], r.get("ggml")) for r in results},
        {r["name"]: tuple(r["shape"]) for r in results},
    )
    widths: dict[int, int] = {}
    for r in results:
        widths[r["bits"]] = widths.get(r["bits"], 0) + 1
    ggml = sorted({r["ggml"] for r in results if r.get("ggml")})
    smaller = 0 if ggml else sum(r["group"] != recipe.group_size for r in results)
    note = f"; {smaller} layer(s) in smaller groups" if smaller else ""
    group = (
        f"GGML {', '.join(ggml).upper()}, blocks of 32" if ggml else f"group {recipe.group_size}"
    )
    mix = ""
    if len(widths) > 1:
        mix = " (" + ", ".join(f"{w} bits: {k} layers" for w, k in sorted(widths.items())) + ")"
    return {
        "quantizer": recipe.quantizer.name,
        "quantizer_options": recipe.quantizer.options,
        "bits": mean,
        "bits_per_weight": with_scales,
        "widths": {str(w): k for w, k in sorted(widths.items())},
        "group_size": recipe.group_size,
        "symmetric": recipe.symmetric,
        "layers_in_smaller_groups": smaller,
        "summary": f"{mean:.4g} bits per weight{mix}, {with_scales:.4g} with scales "
        f"({recipe.quantizer.name}, {group}{note}, "
        f"{'symmetric' if recipe.symmetric else 'asymmetric'})",
    }


def record(recipe, plan: AxisPlan) -> dict:
    return {}
