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
5. with SlimGPT, the winner is cut again block by block (:func:`.cut.build_sequential`:
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
from typing import Annotated, Literal

import torch
from pydantic import AfterValidator, Field
from tqdm.auto import tqdm

from ...engine.adapters import adapter_for
from ...errors import PrunellaError
from . import evopress, reap, shortgpt
from .cut import (
    WIDTH_METHODS,
    Shape,
    block_params,
    build,
    build_sequential,
    checked_layout,
    depth_keeps_blocks,
    gather,
    removal_orders,
)
from .layout import Layout

NAME = "structure"
WIDTH_MULTIPLE = 32  # with --bits: the narrowest group the bits axis takes, and GGML's block


def check_params(params: float | None) -> float | None:
    if params is not None and not 0.0 < params <= 1.0:
        raise PrunellaError(
            f"params is the fraction of the decoder blocks' parameters kept, in (0, 1], "
            f"got {params:g}"
        )
    return params


FIELDS = {
    "params": (
        Annotated[float | None, AfterValidator(check_params)],
        Field(
            None,
            description="Fraction of the decoder blocks' parameters kept, in (0, 1]: blocks "
            "removed, MLP channels and KV groups cut (a smaller model).",
        ),
    ),
    "cut": (
        Literal["auto", "depth", "width", "experts"],
        Field(
            "auto",
            description="With --params: auto (depth and width or experts, the candidate of "
            "least KL), depth (whole blocks only, ShortGPT), width (channels and KV groups "
            "only) or experts (whole experts only, REAP).",
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


def candidates(
    sizes: list[int],
    influence: torch.Tensor,
    layout: Layout | None,
    per_unit: tuple[int, int],
    params: float,
    cut: str,
    experts: dict[int, reap.Experts] | None = None,
    multiple: int = 1,
) -> list[Shape]:
    """Every shape the search compares: per depth, per number of KV groups, the widest
    MLP (a multiple of ``multiple`` channels; or, in a mixture of experts, the most
    experts) whose blocks' parameters are at most ``params`` of the dense ones."""
    target = params * sum(sizes)
    per_channel, per_group = per_unit
    experts = experts or {}
    shapes = []
    for depth in range(len(sizes)):
        removed = tuple(shortgpt.lowest_influence(influence, depth))
        kept = sum(sizes) - sum(sizes[i] for i in removed)
        full = (layout.width, layout.kv_groups) if layout is not None else (0, 0)
        if kept <= target + 1e-9:  # depth alone meets the budget
            if cut not in ("width", "experts"):
                shapes.append(Shape(removed, *full))
            break
        if cut in ("width", "experts") and depth > 0:
            break
        moe = [e for i, e in experts.items() if i not in removed]
        if moe and cut in ("auto", "experts"):
            each = len(moe) * moe[0].per_expert
            count = moe[0].count - max(1, math.ceil((kept - target) / each - 1e-12))
            if count >= moe[0].top_k:
                shapes.append(Shape(removed, *full, experts=count))
        if cut == "depth" or layout is None:
            continue
        blocks = len(sizes) - depth
        fewest = math.ceil(layout.kv_groups / 2) if layout.heads else layout.kv_groups
        for kv in range(layout.kv_groups, fewest - 1, -1):
            rest = kept - blocks * (layout.kv_groups - kv) * per_group
            channels = max(0, math.ceil((rest - target) / (blocks * per_channel) - 1e-12))
            width = (layout.width - channels) // multiple * multiple
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
) -> int:
    """Parameters of the decoder blocks a shape keeps."""
    blocks = [s for i, s in enumerate(sizes) if i not in set(shape.removed)]
    moe = [e for i, e in (experts or {}).items() if i not in set(shape.removed)]
    if shape.experts:
        return sum(blocks) - sum((e.count - shape.experts) * e.per_expert for e in moe)
    if layout is None:
        return sum(blocks)
    cut = (layout.width - shape.width) * per_unit[0] + (
        layout.kv_groups - shape.kv_groups
    ) * per_unit[1]
    return sum(blocks) - len(blocks) * cut


@torch.no_grad()
def kl_to_dense(model, reference: list[torch.Tensor], windows: torch.Tensor, device) -> float:
    """Mean KL (nats per token) from the dense log-probabilities ``reference`` (one per
    window) to ``model``'s."""
    total, tokens = 0.0, 0
    for ids, dense in zip(windows, reference, strict=True):
        logp = torch.log_softmax(model(ids[None].to(device), use_cache=False).logits[0].float(), -1)
        total += float((dense.exp() * (dense - logp)).sum())
        tokens += ids.numel()
    return total / tokens


@torch.no_grad()
def shrink(
    model,
    windows: torch.Tensor,
    recipe,
    device,
    batch_size: int,
    progress: bool = True,
    search: dict | None = None,
) -> tuple[torch.nn.Module, dict]:
    """The smaller model ``recipe.params`` asks for (``model`` is left as it is), and the
    structure's part of the report. With ``search`` (EvoPress's ``minutes`` and
    ``evaluations``), EvoPress chooses which blocks the winning depth removes."""
    blocks = adapter_for(model).blocks(model)
    layout, experts = None, {}
    if recipe.cut in ("auto", "width"):
        try:
            layout = checked_layout(model)
        except PrunellaError:
            if recipe.cut == "width":
                raise
    if recipe.cut in ("auto", "experts"):
        try:
            found = {i: reap.experts_of(model, b) for i, b in enumerate(blocks)}
        except PrunellaError:
            if recipe.cut == "experts":
                raise
            found = {}
        experts = {i: e for i, e in found.items() if e is not None}
        if recipe.cut == "experts" and not experts:
            raise PrunellaError(
                f"--cut experts: {model.config.model_type} has no routed experts to remove"
            )
    sizes = block_params(model)
    per_unit = layout.per_unit(blocks[0]) if layout is not None else (0, 0)
    stats = gather(model, windows, layout, device, batch_size, progress, experts)
    # quantized after the cut: an MLP width that a quantization group (32) divides
    multiple = WIDTH_MULTIPLE if getattr(recipe, "bits", None) is not None else 1
    shapes = candidates(
        sizes, stats.influence, layout, per_unit, recipe.params, recipe.cut, experts, multiple
    )
    shapes = [s for s in shapes if depth_keeps_blocks(model, s.removed)]
    if not shapes:
        raise PrunellaError(
            f"--params {recipe.params:g}: {model.config.model_type}'s config places block "
            "kinds by index, so removing blocks would change the others; only --cut "
            "width or experts can meet this budget, if any"
        )
    orders = None
    if layout is not None:
        width, kv = min(s.width for s in shapes), min(s.kv_groups for s in shapes)
        orders = removal_orders(model, layout, stats, recipe.width_method, width, kv)
    reconstruct = recipe.width_method == "slimgpt"
    scoring = windows[: max(1, min(len(windows), round(recipe.fitness_tokens / windows.shape[1])))]
    dense = [torch.log_softmax(model(w[None].to(device), use_cache=False).logits[0].float(), -1)
             for w in scoring]  # fmt: skip
    scored = []
    for shape in tqdm(shapes, desc="structure candidates", disable=not progress, leave=False):
        smaller = build(model, shape, layout, stats, orders, reconstruct, experts)
        scored.append((kl_to_dense(smaller, dense, scoring, device), shape, smaller))
        scored.sort(key=lambda s: s[0])  # keep only the best model so far
        scored[1:] = [(kl, shape, None) for kl, shape, _ in scored[1:]]
    best_kl, best, smaller = min(scored, key=lambda s: s[0])
    candidate_kl = best_kl
    searched = None
    if search is not None and best.removed:
        target = recipe.params * sum(sizes)

        def kl_of(removed: tuple[int, ...], count: int) -> float:
            shape = replace(best, removed=removed)
            if kept_params(shape, sizes, layout, per_unit, experts) > target + 1e-9:
                return math.inf  # (a mixture of experts' dense block kept instead)
            if not depth_keeps_blocks(model, removed):
                return math.inf
            built = build(model, shape, layout, stats, orders, reconstruct, experts)
            return kl_to_dense(built, dense[:count], scoring[:count], device)

        stages = (max(1, len(dense) // 4), len(dense))
        removed, searched = evopress.search(
            kl_of, best.removed, len(sizes), stages, search["minutes"], search["evaluations"]
        )
        best = replace(best, removed=removed)
        del smaller
        smaller = build(model, best, layout, stats, orders, reconstruct, experts)
        best_kl = candidate_kl = searched["kl"]
    width_cut = layout is not None and (best.width, best.kv_groups) != (
        layout.width,
        layout.kv_groups,
    )
    retained: dict[int, list[int]] = {}
    if (reconstruct and width_cut) or best.experts:
        del smaller  # the winner, cut again block by block, as its papers do
        smaller = build_sequential(
            model, best, layout, recipe.width_method, windows, device, batch_size, progress,
            experts, retained,
        )  # fmt: skip
        best_kl = kl_to_dense(smaller, dense, scoring, device)
    total = sum(sizes)
    kept = kept_params(best, sizes, layout, per_unit, experts)
    moe = next(iter(experts.values()), None)
    report = {
        "params_target": recipe.params,
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
        "cut": recipe.cut,
        "width_method": recipe.width_method,
        "papers": [shortgpt.PAPER]
        + ([WIDTH_METHODS[recipe.width_method].PAPER] if layout is not None else [])
        + ([reap.PAPER] if experts else []),
        "fitness_tokens": scoring.numel(),
        "kl": best_kl,
        "candidate_kl": candidate_kl,
        "search": searched,
        "block_influence": [round(float(x), 6) for x in stats.influence],
        "candidates": [
            {
                "removed_blocks": list(s.removed),
                "intermediate_size": s.width,
                "kv_groups": s.kv_groups,
                "experts": s.experts,
                "params": kept_params(s, sizes, layout, per_unit, experts),
                "kl": kl,
            }
            for kl, s, _ in sorted(
                scored, key=lambda s: (len(s[1].removed), -s[1].kv_groups, -s[1].experts)
            )
        ],
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
    report["summary"] = (
        f"structure: {kept / total:.2%} of the blocks' parameters kept (target "
        f"{recipe.params:.2%}): {len(sizes) - len(best.removed)}/{len(sizes)} blocks"
        + "".join(f", {x}" for x in shown)
        + f"; KL {best_kl:.4f} (best of {len(shapes)}"
        + (f", then EvoPress: {searched['evaluations']} evaluations)" if searched else ")")
    )
    return smaller, report
