"""A smaller model: blocks removed, MLP channels and KV groups cut, consumers refit.

:func:`gather` runs the dense model once over the calibration windows and keeps, per
block, ShortGPT's influence and the Gram matrices of the inputs of ``down_proj`` and
``o_proj``; :func:`removal_orders` ranks every block's channels and KV groups once
(by SlimGPT's OBS or by activation-weighted magnitude); :func:`build` makes the model
of one :class:`Shape` from them: the kept blocks renumbered, each cut tensor sliced,
``down_proj`` and ``o_proj`` refit on their kept columns, and a config of the family's
own class with the smaller sizes, so that transformers and vLLM load it as they load
the original.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from ...engine.adapters import adapter_for
from ...engine.forward import Activations, capture, run_through
from ...errors import PrunellaError
from . import heapr, magnitude, reap, shortgpt, slimgpt
from .heapr import Atomic
from .layout import Layout, layout_of

WIDTH_METHODS = {"slimgpt": slimgpt, "magnitude": magnitude}


@dataclass
class Statistics:
    """What the dense model's pass over the calibration windows leaves per block."""

    influence: torch.Tensor  # ShortGPT's BI per block
    mlp: list[torch.Tensor] = field(default_factory=list)  # Gram of down_proj's input
    attention: list[torch.Tensor] = field(default_factory=list)  # Gram of o_proj's input
    saliency: dict[int, torch.Tensor] = field(default_factory=dict)  # REAP's, per MoE block
    atomic: dict[int, torch.Tensor] = field(default_factory=dict)  # HEAPr's, [experts, width]
    tokens: int = 0


@dataclass(frozen=True)
class Shape:
    """One structure: the blocks removed (indices of the dense model), the MLP width and
    the KV groups every kept block keeps, and the routed experts every mixture-of-experts
    block keeps and their width in atomic experts (0: not cut)."""

    removed: tuple[int, ...]
    width: int
    kv_groups: int
    experts: int = 0
    expert_width: int = 0


def _inputs(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _output(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple | list) else out


@torch.no_grad()
def gather(
    model: nn.Module,
    windows: torch.Tensor,
    layout: Layout | None,
    device: torch.device,
    batch_size: int,
    progress: bool = True,
    experts: dict[int, reap.Experts] | None = None,
) -> Statistics:
    """One forward of ``model`` over ``windows``; per block the summed input/output cosine
    (for :func:`shortgpt.block_influence`), with a ``layout`` ``X^T X`` of the inputs of
    ``down_proj`` and ``o_proj`` (float32), and with ``experts`` (block -> its routed
    experts) REAP's saliency of each expert."""
    experts = experts or {}
    sums = {i: torch.zeros(e.count, dtype=torch.float64) for i, e in experts.items()}
    counts = {i: torch.zeros(e.count, dtype=torch.float64) for i, e in experts.items()}
    blocks = adapter_for(model).blocks(model)
    cos = torch.zeros(len(blocks), dtype=torch.float64)
    grams: dict[tuple[str, int], torch.Tensor] = {}
    seen: dict[int, torch.Tensor] = {}
    hooks = []

    def before(i):
        def hook(module, args, kwargs):
            seen[i] = _inputs(args, kwargs)

        return hook

    def after(i):
        def hook(module, args, kwargs, out):
            cos[i] += float(shortgpt.token_cosines(seen.pop(i), _output(out)))

        return hook

    def gram(key):
        return lambda module, args: add_gram(grams, key, args[0])

    for i, block in enumerate(blocks):
        hooks.append(block.register_forward_pre_hook(before(i), with_kwargs=True))
        hooks.append(block.register_forward_hook(after(i), with_kwargs=True))
        if layout is not None:
            hooks.append(block.mlp.down_proj.register_forward_pre_hook(gram(("mlp", i))))
            hooks.append(block.self_attn.o_proj.register_forward_pre_hook(gram(("attn", i))))
        if i in experts:
            moe = block.get_submodule(experts[i].path).experts
            hook = reap.saliency_hook(sums[i], counts[i])
            hooks.append(moe.register_forward_pre_hook(hook, with_kwargs=True))
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(windows), batch_size), desc="structure statistics",
                          disable=not progress, leave=False):  # fmt: skip
            batch = windows[start : start + batch_size].to(device)
            run_through(model, blocks[-1], batch, use_cache=False)  # no LM head
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    tokens = windows.numel()
    stats = Statistics(shortgpt.block_influence(cos, tokens), tokens=tokens)
    if layout is not None:
        stats.mlp = [grams[("mlp", i)].cpu() for i in range(len(blocks))]
        stats.attention = [grams[("attn", i)].cpu() for i in range(len(blocks))]
    stats.saliency = {i: reap.mean_saliency(sums[i], counts[i]) for i in experts}
    return stats


def removal_orders(
    model: nn.Module, layout: Layout, stats: Statistics, method: str, width: int, kv: int
) -> list[dict[str, list[int]]]:
    """Per block, its MLP channels and KV groups in the order they go, down to ``width``
    channels and ``kv`` groups."""
    rank = WIDTH_METHODS[method].removal_order
    orders = []
    for i, block in enumerate(adapter_for(model).blocks(model)):
        group = layout.n_rep * layout.head_dim
        orders.append({
            "channel": rank(block.mlp.down_proj.weight.detach(), stats.mlp[i], 1, width)
            if width < layout.width else [],
            "kv": rank(block.self_attn.o_proj.weight.detach(), stats.attention[i], group, kv)
            if kv < layout.kv_groups else [],
        })  # fmt: skip
    return orders


def kept_units(order: list[int], total: int, keep: int) -> torch.Tensor:
    """The units left when the first ``total - keep`` of ``order`` are removed (sorted)."""
    gone = set(order[: total - keep])
    if len(gone) != total - keep:
        raise PrunellaError(f"internal: removal order too short for {keep} of {total} units")
    return torch.tensor([u for u in range(total) if u not in gone], dtype=torch.long)


def smaller_config(config, shape: Shape, layout: Layout | None, atomic: Atomic | None = None):
    """The family's own config with ``shape``'s depth (and widths; ``atomic``: the
    config field of the experts' width): every per-layer list (``layer_types``) keeps the
    kept blocks' entries."""
    values = copy.deepcopy(config.to_dict())
    n = config.num_hidden_layers
    kept = [i for i in range(n) if i not in set(shape.removed)]
    for key, value in list(values.items()):
        if isinstance(value, list) and len(value) == n and key != "architectures":
            values[key] = [value[i] for i in kept]
    values["num_hidden_layers"] = len(kept)
    if layout is not None:
        values["intermediate_size"] = shape.width
        values["num_key_value_heads"] = shape.kv_groups
        values["num_attention_heads"] = shape.kv_groups * layout.n_rep
        values["head_dim"] = layout.head_dim
    if shape.experts:
        for key in reap.COUNT_KEYS:
            if key in values:
                values[key] = shape.experts
    if shape.expert_width:
        values[atomic.key] = shape.expert_width
    values.pop("transformers_version", None)
    return type(config).from_dict(values)


def config_holds(config, shape: Shape, layout: Layout | None, atomic=None) -> bool:
    """Whether the family's config accepts ``shape``'s sizes (Llama's, for one, wants a
    hidden size that its number of heads divides, even with an explicit head size)."""
    try:
        smaller_config(config, shape, layout, atomic)
    except Exception:  # transformers' strict validation has errors of its own
        return False
    return True


def cut_tensors(
    block: nn.Module,
    layout: Layout,
    keep: dict[str, torch.Tensor],
    grams: dict[str, torch.Tensor],
    only: str = "",
) -> dict[str, torch.Tensor]:
    """One block's cut tensors (name inside the block -> tensor; with ``only``, those whose
    name starts with it): every tensor a unit owns sliced to the kept units ``keep``
    (``channel``: MLP channels, ``kv``: KV groups), and ``down_proj`` / ``o_proj`` refit by
    least squares where ``grams`` holds their input's Gram matrix (SlimGPT's
    compensation)."""
    keep = {**keep, "query": keep["kv"]}
    params = dict(block.named_parameters())
    out = {}
    for cut in layout.cuts:
        if not cut.name.startswith(only):
            continue
        tensor = params[cut.name].detach()
        index = layout.keep_index(cut.kind, keep[cut.kind]).to(tensor.device)
        out[cut.name] = tensor.index_select(cut.dim, index)
    for name, kind in (("mlp.down_proj", "channel"), ("self_attn.o_proj", "query")):
        if name in grams:
            weight = params[f"{name}.weight"]
            index = layout.keep_index(kind, keep[kind])
            refit = slimgpt.refit(weight.detach().float().cpu(), grams[name], index)
            out[f"{name}.weight"] = refit.to(weight.dtype).to(weight.device)
    return out


def assemble(
    model: nn.Module,
    shape: Shape,
    layout: Layout | None,
    replaced: dict[int, dict[str, torch.Tensor]],
    atomic: Atomic | None = None,
) -> nn.Module:
    """The model of ``shape``: a new model of the smaller config, holding ``model``'s
    tensors (block ``i``'s replaced by ``replaced[i]`` where given), the removed blocks
    dropped and the others renumbered."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    prefix = adapter_for(model).blocks_path + "."
    dtype = next(model.parameters()).dtype
    kept_blocks = [i for i in range(model.config.num_hidden_layers) if i not in set(shape.removed)]
    renumber = {old: new for new, old in enumerate(kept_blocks)}
    state = {}
    for key, tensor in model.state_dict().items():
        if not key.startswith(prefix):
            state[key] = tensor
            continue
        index, local = key[len(prefix) :].split(".", 1)
        if int(index) in renumber:
            tensor = replaced.get(int(index), {}).get(local, tensor)
            state[f"{prefix}{renumber[int(index)]}.{local}"] = tensor
    with no_init_weights():  # every tensor is loaded next (checked below)
        smaller = AutoModelForCausalLM.from_config(
            smaller_config(model.config, shape, layout, atomic), dtype=dtype
        )
    missing, unexpected = smaller.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in _tied(smaller)]
    if missing or unexpected:
        raise PrunellaError(
            "internal: the cut model's tensors do not match its config "
            f"({(missing + unexpected)[0]})"
        )
    smaller.tie_weights()
    smaller.generation_config = copy.deepcopy(model.generation_config)
    return smaller.to(next(model.parameters()).device).eval()


@torch.no_grad()
def build(
    model: nn.Module,
    shape: Shape,
    layout: Layout | None,
    stats: Statistics | None,
    orders: list[dict[str, list[int]]] | None,
    reconstruct: bool,
    experts: dict[int, reap.Experts] | None = None,
    atomic: Atomic | None = None,
) -> nn.Module:
    """The model of ``shape`` from the dense model's one-pass statistics and the units'
    removal ``orders`` (a new model; ``model`` is left as it is); a mixture of experts'
    blocks (``experts``) keep their ``shape.experts`` of highest REAP saliency, or every
    expert its ``shape.expert_width`` atomic experts of highest HEAPr score."""
    replaced: dict[int, dict[str, torch.Tensor]] = {}
    blocks = adapter_for(model).blocks(model)
    for i in experts or {} if shape.expert_width else ():
        if i not in shape.removed:
            replaced[i] = heapr.cut_tensors(blocks[i], atomic, stats.atomic[i], shape.expert_width)
    for i, moe in (experts or {}).items() if shape.experts else ():
        if i not in shape.removed:
            order = reap.removal_order(stats.saliency[i], shape.experts)
            kept = kept_units(order, moe.count, shape.experts)
            replaced[i] = {n: t.detach().index_select(0, kept.to(t.device))
                           for n, t in moe.tensors(blocks[i]).items()}  # fmt: skip
    if layout is not None:
        for i in range(len(blocks)):
            if i in shape.removed:
                continue
            keep = {
                "channel": kept_units(orders[i]["channel"], layout.width, shape.width),
                "kv": kept_units(orders[i]["kv"], layout.kv_groups, shape.kv_groups),
            }
            grams = {}
            if reconstruct and shape.width < layout.width:
                grams["mlp.down_proj"] = stats.mlp[i]
            if reconstruct and shape.kv_groups < layout.kv_groups:
                grams["self_attn.o_proj"] = stats.attention[i]
            replaced[i] = cut_tensors(blocks[i], layout, keep, grams)
    return assemble(model, shape, layout, replaced, atomic)


@torch.no_grad()
def build_sequential(
    model: nn.Module,
    shape: Shape,
    layout: Layout,
    method: str,
    windows: torch.Tensor,
    device: torch.device,
    batch_size: int,
    progress: bool = True,
    experts: dict[int, reap.Experts] | None = None,
    retained: dict[int, list[int]] | None = None,
) -> nn.Module:
    """The model of ``shape`` cut block by block as SlimGPT does (:func:`cut_in_order`,
    each block on the activations of the blocks before it *as cut*); a new model."""
    work = copy.deepcopy(model)
    blocks = adapter_for(work).blocks(work)
    acts = capture(work, blocks, windows, batch_size, device, torch.float32)
    for i in tqdm(range(len(blocks)), desc="structure, block by block", disable=not progress,
                  leave=False):  # fmt: skip
        if i in shape.removed:
            continue  # the hidden states go on to the next block as they are
        cut_in_order(blocks[i], i, acts, shape, layout, method, experts or {}, retained)
    return assemble(work, shape, layout, {})


@torch.no_grad()
def cut_in_order(
    block: nn.Module,
    i: int,
    acts: Activations,
    shape: Shape,
    layout: Layout | None,
    method: str,
    experts: dict[int, reap.Experts],
    retained: dict[int, list[int]] | None = None,
) -> None:
    """Cut block ``i`` in place on ``acts``, the activations entering it, and move
    ``acts`` on through it: its units ranked and its consumers refit on those
    activations (attention first, then the MLP on the cut attention's outputs); in a
    mixture of experts, its experts of least REAP saliency removed, measured on the same
    activations (llm-compressor's sequential REAP; ``retained`` gets the kept experts)."""
    rank = WIDTH_METHODS[method].removal_order
    refit = method == "slimgpt"
    steps = ()
    if layout is not None:
        keep = {"channel": torch.arange(layout.width), "kv": torch.arange(layout.kv_groups)}
        steps = (
            ("self_attn.o_proj", "kv", layout.n_rep * layout.head_dim, shape.kv_groups,
             layout.kv_groups),
            ("mlp.down_proj", "channel", 1, shape.width, layout.width),
        )  # fmt: skip
    for name, kind, group, kept, total in steps:
        if kept == total:
            continue
        layer = block.get_submodule(name)
        gram = input_gram(layer, acts, block, i)
        order = rank(layer.weight.detach().float().cpu(), gram, group, kept)
        units = {**keep, kind: kept_units(order, total, kept)}
        half = name.split(".")[0]  # self_attn, then mlp
        cut = cut_tensors(block, layout, units, {name: gram} if refit else {}, half)
        for local, tensor in cut.items():
            block.get_parameter(local).data = tensor
    moe = experts.get(i)
    if shape.experts and moe is not None:
        sums, counts = (torch.zeros(moe.count, dtype=torch.float64) for _ in range(2))
        module = block.get_submodule(moe.path).experts
        hook = reap.saliency_hook(sums, counts)
        handle = module.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            acts.forward(block, i, update=False)
        finally:
            handle.remove()
        order = reap.removal_order(reap.mean_saliency(sums, counts), shape.experts)
        kept = kept_units(order, moe.count, shape.experts)
        reap.cut_experts(block, moe, kept)
        if retained is not None:
            retained[i] = kept.tolist()
    acts.forward(block, i, update=True)


def input_gram(layer: nn.Module, acts: Activations, block: nn.Module, i: int) -> torch.Tensor:
    """``sum_t x_t x_t^T`` of ``layer``'s inputs while ``acts`` run through ``block`` (block
    ``i``), float32 on CPU."""
    gram: dict[str, torch.Tensor] = {}
    handle = layer.register_forward_pre_hook(lambda module, args: add_gram(gram, "x", args[0]))
    try:
        acts.forward(block, i, update=False)
    finally:
        handle.remove()
    return gram["x"].cpu()


def add_gram(sums: dict, key, inputs: torch.Tensor) -> None:
    """``sums[key] += X^T X`` for the inputs ``X`` (``[..., in]``, float32), started at zero."""
    x = inputs.detach().flatten(0, -2).float()
    if key not in sums:
        sums[key] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
    sums[key].addmm_(x.T, x)


def _tied(model: nn.Module) -> set[str]:
    """Parameter names that share storage with another (tied embeddings)."""
    seen, tied = {}, set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if param.data_ptr() in seen:
            tied.add(name)
        seen.setdefault(param.data_ptr(), name)
    return tied


def block_params(model: nn.Module) -> list[int]:
    """Parameters of each decoder block."""
    return [sum(p.numel() for p in b.parameters()) for b in adapter_for(model).blocks(model)]


def depth_keeps_blocks(model: nn.Module, removed: tuple[int, ...]) -> bool:
    """Whether the config with the blocks ``removed`` describes the kept blocks as they
    are: a model of it built on the meta device has, block for block, the same
    parameters (a config that places block kinds by index, as DeepSeek-V3's
    ``first_k_dense_replace`` or Llama 4's interleaving, may not)."""
    from transformers import AutoModelForCausalLM

    if not removed:
        return True
    shape = Shape(removed, 0, 0)
    with torch.device("meta"):
        probe = AutoModelForCausalLM.from_config(smaller_config(model.config, shape, None))
    kept = [b for i, b in enumerate(adapter_for(model).blocks(model)) if i not in removed]
    built = adapter_for(probe).blocks(probe)
    return len(kept) == len(built) and all(
        {n: p.shape for n, p in a.named_parameters()}
        == {n: p.shape for n, p in b.named_parameters()}
        for a, b in zip(kept, built, strict=True)
    )


# families whose vLLM model derives the head dimension as hidden_size // num_attention_heads
# and never reads the config's head_dim (vllm/model_executor/models/qwen2.py, 0.34): with
# query heads removed that is another width, so their KV groups are not cut
HEAD_DIM_FROM_HIDDEN = frozenset({"qwen2"})


def checked_layout(model: nn.Module) -> Layout:
    """The layout of ``model``'s blocks, checked against the family's own modules: a
    block of a config with one channel and one KV group fewer, built on the meta
    device, must have exactly the sliced shapes (else, a one-line error; or, where only
    ``o_proj`` keeps its width whatever the heads, as Helium's, no KV group is cut). No
    KV group is cut either where vLLM would not read the smaller config's head size
    (:data:`HEAD_DIM_FROM_HIDDEN`)."""
    from transformers import AutoModelForCausalLM

    block = adapter_for(model).blocks(model)[0]
    layout = layout_of(model, block)
    if model.config.model_type in HEAD_DIM_FROM_HIDDEN:
        layout = replace(layout, heads=False)
    fewer = next(  # the most KV groups short of all that the config accepts
        (k for k in range(layout.kv_groups - 1, 0, -1)
         if config_holds(model.config, Shape((), layout.width - 1, k), layout)),
        None,
    )  # fmt: skip
    for kv in ([fewer] if fewer else []) + [layout.kv_groups]:
        shape = Shape((), layout.width - 1, kv)
        with torch.device("meta"):
            probe = AutoModelForCausalLM.from_config(smaller_config(model.config, shape, layout))
        got = dict(adapter_for(probe).blocks(probe)[0].named_parameters())
        have = dict(block.named_parameters())
        keep = {"channel": torch.arange(shape.width), "kv": torch.arange(kv)}
        keep["query"] = keep["kv"]
        wrong = [
            c.name
            for c in layout.cuts
            if got[c.name].shape[c.dim] != len(layout.keep_index(c.kind, keep[c.kind]))
            or got[c.name].dim() != have[c.name].dim()
        ]
        if not wrong:
            return layout if kv < layout.kv_groups else replace(layout, heads=False)
    raise PrunellaError(
        f"{model.config.model_type}: its config does not make {wrong[0]} narrower with the "
        "MLP width: its blocks cannot be cut in width; --cut depth removes whole blocks"
    )
