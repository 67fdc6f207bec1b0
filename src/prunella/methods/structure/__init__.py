"""The structure axis: whole blocks removed, MLP channels and KV groups cut, for real.

The budget is the fraction of the decoder blocks' parameters kept (``--params 0.8``).
A structured model is a smaller dense model that every engine runs as it is: its
config says ``num_hidden_layers``, ``intermediate_size`` and ``num_key_value_heads``.
The families supported here (Llama, Mistral, Qwen 2/3, Gemma, OLMo, Granite, ...) hold
*one* MLP width and one number of KV groups for all blocks, so the allocation chooses
the depth (which blocks go) and one width for the blocks that stay.

How (each step its paper's module):

1. one pass of the dense model over the calibration windows gathers ShortGPT's block
   influence (:mod:`.shortgpt`) and the Gram matrices of the inputs of ``down_proj``
   and ``o_proj`` (:func:`.cut.gather`);
2. every block's channels and KV groups are ranked once, by SlimGPT's structured OBS
   (:mod:`.slimgpt`, the default) or by activation-weighted magnitude
   (:mod:`.magnitude`, the baseline, no reconstruction);
3. the candidates (:func:`candidates`): for every depth ``d`` from 0 to the depth that
   alone meets the budget, the ``d`` blocks of least influence removed and, for each
   number of KV groups from all down to half, the widest MLP that meets the budget
   (exactly, to one channel per block; with ``--bits``, to a multiple of 32 channels,
   so that a quantization group divides it); ``--cut depth`` keeps only the depth-only
   candidate (ShortGPT), ``--cut width`` only those at full depth;
4. each candidate is built from those one-pass statistics (:func:`.cut.build`:
   consumers refit by least squares) and scored by its KL divergence to the dense model
   on the first ``--fitness-tokens`` calibration tokens, the fitness of EvoPress; the
   lowest wins;
5. with ``--allocation evopress``, EvoPress searches on from the winner
   (:mod:`.evopress`): which blocks go and, with ``--cut auto``, how many, with the KV
   groups, the MLP width following from the budget (depth and width together);
6. with SlimGPT, the winner is cut again block by block (:func:`.cut.build_sequential`:
   each block ranked and refit on the activations of the blocks before it as cut, the
   paper's order), which the one-pass statistics stand in for while comparing.

This is Minitron's recipe without the retraining (Sreenivas et al., "LLM Pruning and
Distillation in Practice: The Minitron Approach", 2024: depth and width candidates
pruned and compared on a calibration loss), with ShortGPT's order for depth and
SlimGPT's for width. The structure runs first, on the whole model in memory; the other
axes (``--sparsity``, ``--bits``) then compress the smaller model in the same run.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import AfterValidator, Field
from tqdm.auto import tqdm

from ...engine.adapters import adapter_for
from ...errors import PrunellaError
from . import evopress, heapr, reap, shortgpt, tpe
from .cut import (
    WIDTH_METHODS,
    Shape,
    Statistics,
    block_params,
    checked_layout,
    config_holds,
    depth_keeps_blocks,
)
from .heapr import Atomic
from .layout import Layout
from .sources import InMemory, Parts, Streamed

NAME = "structure"
WIDTH_MULTIPLE = 32  # with --bits: the narrowest group the bits axis takes, and GGML's block
# fused experts run through torch's grouped matrix product, whose operands need strides of
# 16 bytes: 8 bfloat16 values ("strides should be multiple of 16 bytes" otherwise)
EXPERT_WIDTH_MULTIPLE = 8


SEARCHES = {"evopress": "EvoPress", "tpe": "TPE"}  # --allocation: the structure's searches
SEARCH_PAPERS = {"evopress": evopress.PAPER, "tpe": tpe.PAPER}
UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def check_params(params: float | str | None) -> float | str | None:
    """``--params``: a fraction in (0, 1] (a float), or a size of the checkpoint's
    weights with its unit (``400MB``, ``0.4GB``, ``380MiB``: kept as written)."""
    if isinstance(params, str):
        try:
            params = float(params)
        except ValueError:
            size_bytes(params)  # a size, or one line
            return params.strip()
    if params is not None and not 0.0 < params <= 1.0:
        raise PrunellaError(
            f"params is the fraction of the decoder blocks' parameters kept, in (0, 1], "
            f"got {params:g}"
        )
    return params


def size_bytes(size: str) -> int:
    """The bytes of a size such as ``400MB``, ``0.4GB``, ``380MiB`` or ``1000000B``."""
    text = size.strip().upper().replace(" ", "")
    unit = next((u for u in sorted(UNITS, key=len, reverse=True) if text.endswith(u)), None)
    try:
        number = float(text.removesuffix(unit)) if unit else math.nan
    except ValueError:
        number = math.nan
    if not number > 0 or not math.isfinite(number):
        raise PrunellaError(
            f"params is a fraction in (0, 1] or a size with its unit (400MB, 0.4GB, "
            f"380MiB), got {size!r}"
        )
    return int(number * UNITS[unit])


FIELDS = {
    "params": (
        Annotated[float | str | None, AfterValidator(check_params)],
        Field(
            None,
            description="Fraction of the decoder blocks' parameters kept, in (0, 1], or the "
            "size of the checkpoint's weights (400MB, 0.4GB, 380MiB): blocks removed, MLP "
            "channels and KV groups cut (a smaller model).",
        ),
    ),
    "cut": (
        Literal["auto", "depth", "width", "experts", "atomic"],
        Field(
            "auto",
            description="With --params: auto (depth and width or experts, the candidate of "
            "least KL), depth (whole blocks only, ShortGPT), width (channels and KV groups "
            "only), experts (whole experts only, REAP) or atomic (every expert narrower, "
            "HEAPr's atomic experts).",
        ),
    ),
    "width_method": (
        Literal["slimgpt", "magnitude"],
        Field(
            "slimgpt",
            description="With --params: which channels and KV groups go, slimgpt (structured "
            "OBS, consumers refit) or magnitude (activation-weighted, no refit).",
        ),
    ),
    "fitness_tokens": (
        int,
        Field(
            4096,
            ge=1,
            description="With --params: calibration tokens on which each candidate "
            "structure's KL to the dense model is measured.",
        ),
    ),
}


GGUF_BYTES = {"f32": 4.0, "f16": 2.0, "q8_0": 34 / 32, "q5_1": 24 / 32, "q5_0": 22 / 32,
              "q4_1": 20 / 32, "q4_0": 18 / 32}  # fmt: skip  # bytes per weight, GGML's blocks


def weight_bytes(recipe, element: int) -> tuple[float, float, float]:
    """Bytes per parameter as the recipe's ``--format`` writes them: a decoder block's
    linear weight, any other parameter of a block (norms, biases), a parameter outside
    the blocks (embeddings, head, final norm); ``element`` is the model's. With
    ``--bits`` the linear weight's code and scales at the narrowest group a cut width
    may leave (32, :data:`WIDTH_MULTIPLE`), or the allocated average."""
    from ..bits import bits_per_weight

    fmt, bits = recipe.format, getattr(recipe, "bits", None)
    if fmt == "sparse-bitmask":
        raise PrunellaError(
            "--params as a size with --format sparse-bitmask: its bytes depend on the "
            "sparsity allocated after the cut; give --params as a fraction"
        )
    ggml = fmt == "gguf"
    if bits is None or fmt == "hf":  # dense weights (hf: quantized values, dense)
        linear = GGUF_BYTES[recipe.gguf_type] if ggml else float(element)
    elif recipe.allocation.name != "uniform":  # an average, scales counted
        linear = bits / 8
    else:
        group = min(recipe.group_size, WIDTH_MULTIPLE)
        linear = bits_per_weight(int(bits), group, recipe.symmetric, ggml) / 8
    if not ggml:
        return linear, float(element), float(element)
    edge = recipe.gguf_type if bits is None and recipe.gguf_type in ("f32", "f16") else "q8_0"
    return linear, 4.0, GGUF_BYTES[edge]  # norms and biases in F32


def parameter_kinds(model) -> tuple[int, int, int, int]:
    """The parameters outside the decoder blocks, the blocks' non-linear ones (norms,
    biases, routers), the blocks' linear weights, and the number of linear layers."""
    adapter = adapter_for(model)
    layers = [m for b in adapter.blocks(model) for m in adapter.linears(b).values()]
    linear = sum(m.weight.numel() for m in layers)
    inside = sum(block_params(model))
    total = sum(p.numel() for p in model.parameters())
    return total - inside, inside - linear, linear, len(layers)


def fixed_bytes(model, recipe) -> tuple[float, float, int]:
    """What the weights cost besides the blocks' linear weights (the bytes outside the
    blocks, the blocks' other parameters, and in compressed-tensors each quantized
    layer's 16-byte shape), the bytes of one linear weight, and the linear weights."""
    outside, other, linear, layers = parameter_kinds(model)
    c_linear, c_other, c_outside = weight_bytes(recipe, next(model.parameters()).element_size())
    shapes = 16 * layers if recipe.format == "compressed-tensors" and recipe.bits else 0
    return c_outside * outside + c_other * other + shapes, c_linear, linear


def written_bytes(model, recipe) -> float:
    """The bytes of ``model``'s weights as :func:`weight_bytes` counts them."""
    fixed, c_linear, linear = fixed_bytes(model, recipe)
    return fixed + c_linear * linear


def params_for_size(model, size: int, recipe) -> float:
    """The fraction of the blocks' parameters that a checkpoint of at most ``size``
    bytes of weights keeps (:func:`weight_bytes`): with ``P_o`` parameters outside the
    blocks, ``B_n`` non-linear and ``B_l`` linear ones in them, at ``c_o``, ``c_n``,
    ``c_l`` bytes each,

        params = (B_n + (size - c_o P_o - c_n B_n) / c_l) / (B_n + B_l),

    met from below: a removed block's norms are counted as kept, and they cost at least
    what its linear weights do."""
    fixed, c_linear, linear = fixed_bytes(model, recipe)
    other = parameter_kinds(model)[1]
    if size >= written_bytes(model, recipe):
        raise PrunellaError(
            f"--params {recipe.params}: the weights already take "
            f"{written_bytes(model, recipe) / 1e6:.1f} MB ({recipe.format}), nothing to cut"
        )
    if size <= fixed:
        raise PrunellaError(
            f"--params {recipe.params}: the weights outside the blocks' linear layers "
            f"alone take {fixed / 1e6:.1f} MB ({recipe.format})"
        )
    return (other + (size - fixed) / c_linear) / (other + linear)


def widest_mlp(
    sizes: list[int],
    removed: tuple[int, ...],
    kv: int,
    layout: Layout,
    per_unit: tuple[int, int],
    params: float,
    multiple: int = 1,
) -> int:
    """The widest MLP (a multiple of ``multiple`` channels) that keeps the blocks'
    parameters at most ``params`` of the dense ones when the blocks ``removed`` go and
    the others keep ``kv`` KV groups (0 or less: none does)::

        width = W - ceil((kept(removed) - blocks * (G - kv) * p_kv - params * total)
                         / (blocks * p_channel))
    """
    target = params * sum(sizes)
    kept = sum(sizes) - sum(sizes[i] for i in removed)
    blocks = len(sizes) - len(removed)
    rest = kept - blocks * (layout.kv_groups - kv) * per_unit[1]
    channels = max(0, math.ceil((rest - target) / (blocks * per_unit[0]) - 1e-12))
    return layout.width if not channels else (layout.width - channels) // multiple * multiple


def candidates(
    sizes: list[int],
    influence: torch.Tensor,
    layout: Layout | None,
    per_unit: tuple[int, int],
    params: float,
    cut: str,
    experts: dict[int, reap.Experts] | None = None,
    multiple: int = 1,
    atomic: Atomic | None = None,
) -> list[Shape]:
    """Every shape the search compares: per depth, per number of KV groups, the widest
    MLP (a multiple of ``multiple`` channels; or, in a mixture of experts, the most
    experts, and the widest experts: ``atomic``) whose blocks' parameters are at most
    ``params`` of the dense ones."""
    target = params * sum(sizes)
    experts = experts or {}
    shapes = []
    for depth in range(len(sizes)):
        removed = tuple(shortgpt.lowest_influence(influence, depth))
        kept = sum(sizes) - sum(sizes[i] for i in removed)
        full = (layout.width, layout.kv_groups) if layout is not None else (0, 0)
        if kept <= target + 1e-9:  # depth alone meets the budget
            if cut not in ("width", "experts", "atomic"):
                shapes.append(Shape(removed, *full))
            break
        if cut in ("width", "experts", "atomic") and depth > 0:
            break
        moe = [e for i, e in experts.items() if i not in removed]
        if moe and cut in ("auto", "experts"):
            each = len(moe) * moe[0].per_expert
            count = moe[0].count - max(1, math.ceil((kept - target) / each - 1e-12))
            if count >= moe[0].top_k:
                shapes.append(Shape(removed, *full, experts=count))
        if moe and atomic is not None and cut in ("auto", "atomic"):
            units = math.ceil((kept - target) / (len(moe) * atomic.per_unit) - 1e-12)
            step = max(multiple, EXPERT_WIDTH_MULTIPLE)
            width = (atomic.width - max(1, units)) // step * step
            if width > 0:
                shapes.append(Shape(removed, *full, expert_width=width))
        if cut == "depth" or layout is None:
            continue
        fewest = math.ceil(layout.kv_groups / 2) if layout.heads else layout.kv_groups
        for kv in range(layout.kv_groups, fewest - 1, -1):
            width = widest_mlp(sizes, removed, kv, layout, per_unit, params, multiple)
            if width > 0:
                shapes.append(Shape(removed, width, kv))
    if not shapes:
        raise PrunellaError(
            f"--params {params:g}: no structure keeps at most {params:.1%} of the blocks' "
            f"parameters with --cut {cut} (every block, every channel or more experts than "
            "a token is routed to would go)"
        )
    return shapes


def kept_params(
    shape: Shape,
    sizes: list[int],
    layout: Layout | None,
    per_unit,
    experts: dict[int, reap.Experts] | None = None,
    atomic: Atomic | None = None,
) -> int:
    """Parameters of the decoder blocks a shape keeps."""
    blocks = [s for i, s in enumerate(sizes) if i not in set(shape.removed)]
    moe = [e for i, e in (experts or {}).items() if i not in set(shape.removed)]
    if shape.experts:
        return sum(blocks) - sum((e.count - shape.experts) * e.per_expert for e in moe)
    if shape.expert_width:
        return sum(blocks) - len(moe) * (atomic.width - shape.expert_width) * atomic.per_unit
    if layout is None:
        return sum(blocks)
    cut = (layout.width - shape.width) * per_unit[0] + (
        layout.kv_groups - shape.kv_groups
    ) * per_unit[1]
    return sum(blocks) - len(blocks) * cut


def plan_section(report: dict) -> dict:
    """The structure as a plan file holds it: the budget, the width method and, per block
    of the dense model, whether it stays, its MLP width, KV groups and experts."""
    removed = set(report["removed_blocks"])
    widths = {k: report.get(k) for k in UNIT_KEYS}
    return {
        "params": report["params_target"],
        "width_method": report["width_method"],
        "blocks": [
            {"block": i, "kept": i not in removed, **(widths if i not in removed else {})}
            for i in range(report["dense_blocks"])
        ],
    }


UNIT_KEYS = ("intermediate_size", "kv_groups", "experts", "expert_width")  # a kept block's


def shape_of_section(section, where: str) -> tuple[Shape, float, str, int]:
    """The shape, budget, width method and block count of a plan file's ``structure``
    (the dense model's); one line where
    it is malformed, or where its kept blocks differ in width (the families cut here hold
    one MLP width, one KV count and one expert count in their configs)."""
    if not isinstance(section, dict) or not isinstance(section.get("blocks"), list):
        raise PrunellaError(f"{where}: 'structure' must hold a 'blocks' list")
    blocks, kept = section["blocks"], {}
    if [b.get("block") if isinstance(b, dict) else None for b in blocks] != list(
        range(len(blocks))
    ):
        raise PrunellaError(f"{where}: structure blocks must be numbered 0, 1, 2, ... in order")
    for b in blocks:
        if b.get("kept", True):
            kept[b["block"]] = tuple(b.get(k) for k in UNIT_KEYS)
    if not kept:
        raise PrunellaError(f"{where}: the structure keeps no block")
    if len(set(kept.values())) > 1:
        (i, first), (j, other) = (
            next(iter(kept.items())),
            next((j, v) for j, v in kept.items() if v != next(iter(kept.values()))),
        )
        raise PrunellaError(
            f"{where}: block {j} keeps (MLP, KV groups, experts, expert width) {other}, "
            f"block {i} {first}; "
            "the configs cut here hold one of each for every block"
        )
    values = next(iter(kept.values()))
    for name, value in zip(UNIT_KEYS, values, strict=True):
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 1
        ):
            raise PrunellaError(f"{where}: structure {name} must be a positive whole number")
    params = section.get("params")
    if isinstance(params, bool) or not isinstance(params, int | float) or not 0 < params <= 1:
        raise PrunellaError(f"{where}: structure params must be a number in (0, 1]")
    method = section.get("width_method", "slimgpt")
    if method not in WIDTH_METHODS:
        raise PrunellaError(
            f"{where}: structure width_method must be one of {', '.join(WIDTH_METHODS)}, "
            f"got {method!r}"
        )
    removed = tuple(i for i in range(len(blocks)) if i not in kept)
    shape = Shape(removed, *(v or 0 for v in values))
    return shape, float(params), method, len(blocks)


def check_given(
    given: tuple[Shape, int],
    model,
    sizes,
    layout,
    per_unit,
    experts,
    atomic,
    params: float,
    multiple: int = 1,
) -> Shape:
    """The plan's shape (``given``: it and the plan's block count) for this model (an
    expert count equal to the dense one: not cut); one line for a structure that this
    model cannot take, or that keeps more than ``params`` of its blocks' parameters."""
    shape, planned = given
    where = f"the plan's structure ({planned} blocks)"
    if planned != len(sizes):
        raise PrunellaError(f"{where} is for another model: this one has {len(sizes)} blocks")
    if layout is None and (shape.width or shape.kv_groups):
        raise PrunellaError(f"{where} cuts widths, which this family's config cannot hold")
    if layout is not None:  # a width the plan leaves out is the dense one
        shape = replace(shape, width=shape.width or layout.width,
                        kv_groups=shape.kv_groups or layout.kv_groups)  # fmt: skip
        if shape.width < layout.width and shape.width % multiple:
            raise PrunellaError(
                f"{where}: MLP {shape.width} is not a multiple of {multiple}, which "
                "quantization groups and GGML's blocks need"
            )
        if not 0 < shape.width <= layout.width or not 0 < shape.kv_groups <= layout.kv_groups:
            raise PrunellaError(
                f"{where}: MLP {shape.width} and KV groups {shape.kv_groups} must be within "
                f"1..{layout.width} and 1..{layout.kv_groups}"
            )
        if shape.kv_groups < layout.kv_groups and not layout.heads:
            raise PrunellaError(f"{where} cuts KV groups, which this family keeps whole")
    moe = next(iter(experts.values()), None)
    count = moe.count if moe is not None else 0
    cut_experts = shape.experts or count
    if (moe is None and shape.experts) or (moe and not moe.top_k <= cut_experts <= count):
        raise PrunellaError(
            f"{where}: experts {shape.experts} must be within "
            f"{moe.top_k if moe else 0}..{count} (the router's top-k to the dense count)"
        )
    shape = replace(shape, experts=0) if shape.experts == count else shape
    dense_width = atomic.width if atomic is not None else 0
    if shape.expert_width and not shape.expert_width <= dense_width:
        raise PrunellaError(
            f"{where}: expert width {shape.expert_width} must be within 1..{dense_width}"
            + ("" if atomic else " (this model's experts cannot be narrowed)")
        )
    shape = replace(shape, expert_width=0) if shape.expert_width == dense_width else shape
    if shape.expert_width % EXPERT_WIDTH_MULTIPLE:
        raise PrunellaError(
            f"{where}: expert width {shape.expert_width} must be a multiple of "
            f"{EXPERT_WIDTH_MULTIPLE} (fused experts need 16-byte strides)"
        )
    if shape.experts and shape.expert_width:
        raise PrunellaError(f"{where} cuts both whole experts and their width: one at a time")
    if not depth_keeps_blocks(model, shape.removed):
        raise PrunellaError(f"{where} removes blocks, but this config places block kinds by index")
    if not config_holds(model.config, shape, layout, atomic):
        raise PrunellaError(
            f"{where}: {model.config.model_type}'s config refuses these sizes (e.g. a head "
            "count that does not divide the hidden size)"
        )
    kept = kept_params(shape, sizes, layout, per_unit, experts, atomic)
    if kept > params * sum(sizes) + 1e-9:
        raise PrunellaError(
            f"{where} keeps {kept / sum(sizes):.2%} of the blocks' parameters, more than "
            f"--params {params:g}"
        )
    return shape


def width_multiple(recipe) -> int:
    """What an MLP width must be a multiple of: quantized after the cut, or written in
    GGML's blocks, one that a group (32) divides; else any width."""
    quantized = getattr(recipe, "bits", None) is not None
    return WIDTH_MULTIPLE if quantized or getattr(recipe, "format", "") == "gguf" else 1


def discover(model, cut: str) -> tuple[Layout | None, dict[int, reap.Experts], Atomic | None]:
    """What ``--cut`` may remove from ``model``: its widths' layout (MLP channels, KV
    groups), its mixture-of-experts blocks and their atomic experts; one line where
    ``--cut`` names what the family cannot cut."""
    blocks = adapter_for(model).blocks(model)
    layout, experts = None, {}
    if cut in ("auto", "width"):
        try:
            layout = checked_layout(model)
        except PrunellaError:
            if cut == "width":
                raise
    if cut in ("auto", "experts", "atomic"):
        try:
            found = {i: reap.experts_of(model, b) for i, b in enumerate(blocks)}
        except PrunellaError:
            if cut in ("experts", "atomic"):
                raise
            found = {}
        experts = {i: e for i, e in found.items() if e is not None}
        if cut in ("experts", "atomic") and not experts:
            raise PrunellaError(
                f"--cut {cut}: {model.config.model_type} has no routed experts to remove"
            )
    atomic = heapr.atomic_of(model, experts) if cut in ("auto", "atomic") else None
    if cut == "atomic" and atomic is None:
        raise PrunellaError(
            f"--cut atomic: {model.config.model_type}'s experts are not fused tensors whose "
            "width one config field sets; --cut experts removes whole experts"
        )
    return layout, experts, atomic


@torch.no_grad()
def shrink(
    model,
    windows: torch.Tensor,
    recipe,
    device,
    batch_size: int,
    progress: bool = True,
    search: dict | None = None,
    given: tuple[Shape, int] | None = None,
    source: InMemory | Streamed | None = None,
) -> tuple[torch.nn.Module | Path, dict]:
    """The smaller model ``recipe.params`` asks for (``model`` is left as it is), and the
    structure's part of the report: the ``given`` shape (a plan file's, with its block
    count: :func:`shape_of_section`), or the candidate of least KL (:func:`choose`).
    With ``search`` (EvoPress's ``minutes`` and ``evaluations``), EvoPress searches on
    from the winning candidate. ``source``: where the dense model is read from (in
    memory by default; :class:`.sources.Streamed` returns the folder of the checkpoint
    it wrote instead of a model)."""
    source = source or InMemory(model, device, batch_size, progress)
    params, size = recipe.params, None
    if isinstance(params, str):  # a size of the checkpoint's weights
        size = size_bytes(params)
        params = params_for_size(model, size, recipe)
    layout, experts, atomic = discover(model, "auto" if given is not None else recipe.cut)
    if isinstance(source, Streamed) and atomic is not None:
        if recipe.cut == "atomic" or (given is not None and given[0].expert_width):
            raise PrunellaError(
                "--cut atomic needs the whole model in memory (HEAPr's scores come from a "
                "backward pass); it cannot run with --offload disk"
            )
        atomic = None  # auto, streamed: whole experts and depth only
    sizes = block_params(model)
    per_unit = layout.per_unit(adapter_for(model).blocks(model)[0]) if layout else (0, 0)
    scoring = windows[: max(1, min(len(windows), round(recipe.fitness_tokens / windows.shape[1])))]
    dense = source.reference(scoring)
    parts = None
    if given is not None:
        best = check_given(
            given, model, sizes, layout, per_unit, experts, atomic, params, width_multiple(recipe)
        )
        chosen = {"candidates": [], "candidate_kl": None, "search": None,
                  "block_influence": None}  # fmt: skip
        if best.expert_width:  # HEAPr's scores, then the cut from them
            stats = Statistics(torch.zeros(len(sizes)))
            stats.atomic = heapr.scores(model, windows, batch_size, progress)
            parts = Parts(None, stats, None, False, experts, atomic)
        elif layout is not None and recipe.width_method != "slimgpt":  # orders, no refit
            stats = source.gather(windows, layout, experts, None)
            orders = source.orders(layout, stats, recipe.width_method, best.width, best.kv_groups)
            parts = Parts(layout, stats, orders, False, experts, atomic)
    else:
        best, parts, chosen = choose(
            source, windows, recipe, params, layout, experts, atomic, dense, scoring, search
        )
    width_cut = layout is not None and (best.width, best.kv_groups) != (
        layout.width,
        layout.kv_groups,
    )
    retained: dict[int, list[int]] = {}
    if (width_cut and recipe.width_method == "slimgpt") or best.experts:
        # the winner, cut again block by block, as its papers do
        smaller = source.sequential(best, layout, recipe.width_method, windows, experts, retained)
    elif parts is not None:  # from the one-pass statistics (no refit, or atomic experts)
        smaller = source.one_pass(best, parts)
    else:  # a given depth: the blocks go, the others stay as they are
        smaller = source.depth_only(best, layout)
    best_kl = source.result_kl(smaller, dense, scoring)
    if isinstance(smaller, Path):
        from ...io.checkpoint import empty_model

        counted = empty_model(smaller)
    else:
        counted = smaller
    total = sum(sizes)
    kept = kept_params(best, sizes, layout, per_unit, experts, atomic)
    moe = next(iter(experts.values()), None)
    searched = chosen.get("search")
    report = {
        "params_target": params,
        "size_target": size,
        "weight_bytes": written_bytes(counted, recipe) if size is not None else None,
        "block_params": total,
        "kept_params": kept,
        "kept_fraction": kept / total,
        "removed_blocks": list(best.removed),
        "blocks": len(sizes) - len(best.removed),
        "dense_blocks": len(sizes),
        "intermediate_size": best.width if layout is not None else None,
        "dense_intermediate_size": layout.width if layout is not None else None,
        "kv_groups": best.kv_groups if layout is not None else None,
        "dense_kv_groups": layout.kv_groups if layout is not None else None,
        "experts": best.experts or (moe.count if moe else None),
        "dense_experts": moe.count if moe else None,
        "expert_width": best.expert_width or (atomic.width if atomic else None),
        "dense_expert_width": atomic.width if atomic else None,
        "cut": "given" if given is not None else recipe.cut,
        "width_method": recipe.width_method,
        "papers": [shortgpt.PAPER]
        + ([WIDTH_METHODS[recipe.width_method].PAPER] if layout is not None else [])
        + ([reap.PAPER] if experts else [])
        + ([heapr.PAPER] if atomic else [])
        + ([SEARCH_PAPERS[searched["method"]]] if searched else []),
        "fitness_tokens": scoring.numel(),
        "kl": best_kl,
        **chosen,
    }
    if retained:  # by the dense model's names of the mixture-of-experts modules
        prefix = adapter_for(model).blocks_path
        report["retained_experts"] = {
            f"{prefix}.{i}.{experts[i].path}": kept for i, kept in retained.items()
        }
    shown = []
    if layout is not None:
        shown.append(f"MLP {best.width}/{layout.width}")
        shown.append(f"KV groups {best.kv_groups}/{layout.kv_groups}")
    if moe is not None:
        shown.append(f"experts {best.experts or moe.count}/{moe.count}")
    if atomic is not None:
        shown.append(f"expert width {best.expert_width or atomic.width}/{atomic.width}")
    how = "the plan's" if given is not None else f"best of {len(chosen['candidates'])}"
    report["summary"] = (
        f"structure: {kept / total:.2%} of the blocks' parameters kept (target "
        + (
            f"{recipe.params}: {report['weight_bytes'] / 1e6:.1f} MB of weights, "
            if size is not None
            else ""
        )
        + f"{params:.2%}): {len(sizes) - len(best.removed)}/{len(sizes)} blocks"
        + "".join(f", {x}" for x in shown)
        + f"; KL {best_kl:.4f} ({how}"
        + (
            f", then {SEARCHES[searched['method']]}: {searched['evaluations']} evaluations)"
            if searched
            else ")"
        )
    )
    return smaller, report


def choose(
    source, windows, recipe, params, layout, experts, atomic, dense, scoring, search
) -> tuple[Shape, Parts, dict]:
    """The candidate of least KL to the dense model (``dense``: its log-probabilities on
    the ``scoring`` windows), searched on by EvoPress when ``search`` is given: depth
    and width together (:func:`.evopress.joint_search`) where ``--cut auto`` cuts
    widths, else which blocks the winning depth removes
    (:func:`.evopress.depth_search`); what cutting it takes (:class:`.sources.Parts`),
    and the report's account of the choice."""
    model = source.model
    sizes = block_params(model)
    per_unit = layout.per_unit(adapter_for(model).blocks(model)[0]) if layout else (0, 0)
    stats = source.gather(windows, layout, experts, atomic)
    multiple = width_multiple(recipe)
    shapes = candidates(
        sizes, stats.influence, layout, per_unit, params, recipe.cut, experts, multiple, atomic
    )
    shapes = [s for s in shapes if depth_keeps_blocks(model, s.removed)]
    shapes = [s for s in shapes if config_holds(model.config, s, layout, atomic)]
    if not shapes:
        raise PrunellaError(
            f"--params {params:g}: {model.config.model_type}'s config places block "
            "kinds by index, so removing blocks would change the others; only --cut "
            "width or experts can meet this budget, if any"
        )
    orders = None
    if layout is not None:
        width, kv = min(s.width for s in shapes), min(s.kv_groups for s in shapes)
        orders = source.orders(layout, stats, recipe.width_method, width, kv)
    parts = Parts(layout, stats, orders, recipe.width_method == "slimgpt", experts, atomic)
    progress = getattr(source, "progress", False)
    scored = [
        (source.kl(shape, parts, dense, scoring), shape)
        for shape in tqdm(shapes, desc="structure candidates", disable=not progress, leave=False)
    ]
    best_kl, best = min(scored, key=lambda s: s[0])
    searched = None
    joint = (
        layout is not None and recipe.cut == "auto" and not best.experts and not best.expert_width
    )
    if search is not None and (joint or best.removed):
        start = best
        target = params * sum(sizes)
        narrowest = min((s.width for s in shapes if s.width), default=0)  # the orders' floor

        def kl_of(shape: Shape | None, count: int) -> float:
            if shape is None:
                return math.inf
            if kept_params(shape, sizes, layout, per_unit, experts, atomic) > target + 1e-9:
                return math.inf  # (a mixture of experts' dense block kept instead)
            if not depth_keeps_blocks(model, shape.removed):
                return math.inf
            return source.kl(shape, parts, dense[:count], scoring[:count])

        def shape_of(genome: evopress.Genome) -> Shape | None:
            removed, kv = genome
            width = widest_mlp(sizes, removed, kv, layout, per_unit, params, multiple)
            shape = Shape(removed, width, kv)
            return shape if width >= narrowest and kv in kv_held else None

        kv_held = {s.kv_groups for s in shapes}  # the KV counts the config accepts
        if joint:  # depth and width together
            kv_range = (min(s.kv_groups for s in shapes), layout.kv_groups)
            depths = (0, max(len(s.removed) for s in shapes))
        else:  # which blocks go, the depth and width the candidates chose
            kv_range, depths = (start.kv_groups,) * 2, (len(start.removed),) * 2

        def genome_kl(genome: evopress.Genome, count: int) -> float:
            return kl_of(shape_of(genome) if joint else replace(start, removed=genome[0]), count)

        blocks, seed = len(sizes), search.get("seed", 0)
        stages = (max(1, len(dense) // 4), len(dense))
        options = (search["minutes"], search["evaluations"], seed)
        genome = (start.removed, start.kv_groups)
        if search.get("method") == "tpe":
            genome, searched = tpe.search(
                genome_kl, genome, blocks, kv_range, depths, len(dense), *options,
                search.get("startup", tpe.STARTUP),
            )  # fmt: skip
        elif joint:
            genome, searched = evopress.joint_search(
                genome_kl, genome, blocks, kv_range, depths[1], stages, *options
            )
        else:
            removed, searched = evopress.depth_search(
                lambda r, n: genome_kl((r, start.kv_groups), n), start.removed, blocks,
                stages, *options,
            )  # fmt: skip
            genome = (removed, start.kv_groups)
        best = shape_of(genome) if joint else replace(start, removed=genome[0])
        searched["joint"] = joint
        if searched["kl"] <= best_kl:
            best_kl = searched["kl"]
        else:  # (a short search ends on a genome chosen on a quarter of the windows)
            best, searched["kept_candidate"] = start, True
    return (
        best,
        parts,
        {
            "candidate_kl": best_kl,
            "search": searched,
            "block_influence": [round(float(x), 6) for x in stats.influence],
            "candidates": [
                {
                    "removed_blocks": list(s.removed),
                    "intermediate_size": s.width,
                    "kv_groups": s.kv_groups,
                    "experts": s.experts,
                    "params": kept_params(s, sizes, layout, per_unit, experts, atomic),
                    "expert_width": s.expert_width,
                    "kl": kl,
                }
                for kl, s in sorted(
                    scored,
                    key=lambda s: (
                        len(s[1].removed),
                        -s[1].kv_groups,
                        -s[1].experts,
                        -s[1].expert_width,
                    ),
                )
            ],
        },
    )
