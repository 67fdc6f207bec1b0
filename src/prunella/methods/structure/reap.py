"""REAP: which whole experts of a mixture of experts to remove.

Lasby et al., "REAP the Experts: Why Pruning Prevails for One-Shot MoE Compression"
(2025, arXiv 2510.13999), as llm-compressor's ``REAPPruningModifier`` implements it:
the saliency of expert ``j`` of a block is

    S_j = mean over the tokens t routed to j of  g_tj * ||f_j(x_t)||_2

(``g_tj`` the router's weight that multiplies the expert's output ``f_j(x_t)``), and
the experts of least saliency go, the same number in every block (the config holds
one ``num_experts``). An expert removed takes its slice of every fused expert tensor
and its row of the router (and of a score-correction bias). As in llm-compressor's
sequential pipeline, the blocks are pruned in order, each block's saliencies taken on
the outputs of the blocks before it as pruned (:func:`.cut.build_sequential`); the
candidates of the structure search use the dense model's saliencies.

Where experts take router-scaled inputs (Llama 4: ``f_j(g_tj x_t)``, the router's
weight applied before the expert, not after), the saliency is the norm of what the
expert adds to the token, ``||f_j(g_tj x_t)||``, which is REAP's ``g_tj ||f_j(x_t)||``
wherever the weight multiplies the output. Refused, in one line: group-limited routers
(DeepSeek-V3 with ``n_group > 1``: the experts would have to go in equal numbers per
group).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...engine.experts import EXPLICIT
from ...errors import PrunellaError

PAPER = "Lasby et al., REAP the Experts: Why Pruning Prevails for One-Shot MoE Compression, 2025"
COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
TOP_K_KEYS = ("num_experts_per_tok", "top_k", "moe_top_k")


@dataclass(frozen=True)
class Experts:
    """Where a block's routed experts live: the module holding ``router`` and ``experts``
    (``path`` inside the block), the count, how many a token goes to, and the
    parameters one expert owns (its fused slices and its router row)."""

    path: str
    router: str
    count: int
    top_k: int
    per_expert: int
    config_keys: tuple[str, ...]

    def tensors(self, block: nn.Module) -> dict[str, torch.Tensor]:
        """Every tensor of ``block`` indexed by expert along its first dimension (name
        inside the block)."""
        moe = block.get_submodule(self.path)
        owned = {}
        for part in ("experts", self.router):
            module = getattr(moe, part)
            for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
                if tensor.dim() >= 1 and tensor.shape[0] == self.count:
                    owned[f"{self.path}.{part}.{name}"] = tensor
        return owned


def experts_of(model: nn.Module, block: nn.Module) -> Experts | None:
    """The routed experts of ``block`` (one of ``model``'s blocks), ``None`` for a dense
    block, or a one-line error for a layout whose experts cannot be removed."""
    config = model.config
    for path, module in block.named_modules():
        router = next((r for r in ("gate", "router") if hasattr(module, r)), None)
        if not hasattr(module, "experts") or router is None:
            continue
        family = config.model_type
        if getattr(config, "n_group", None) not in (None, 1):
            raise PrunellaError(
                f"{family}: a group-limited router (n_group {config.n_group}) needs its "
                "experts removed in equal numbers per group, which is not implemented"
            )
        given = config.to_dict()
        keys = tuple(k for k in COUNT_KEYS if k in given)
        top_k = next((given[k] for k in TOP_K_KEYS if k in given), None)
        if not keys or top_k is None:
            raise PrunellaError(f"{family}: its config names no expert count or top-k")
        count = int(given[keys[0]])
        found = Experts(path, router, count, int(top_k), 0, keys)
        per_expert = sum(  # parameters, as the budget counts them (not a bias buffer)
            t.numel() // count for t in found.tensors(block).values() if isinstance(t, nn.Parameter)
        )
        return Experts(path, router, count, int(top_k), per_expert, keys)
    return None


def saliency_hook(sums: torch.Tensor, counts: torch.Tensor):
    """A forward pre-hook for an experts module called as ``experts(x, top_k_index,
    top_k_weights)``: adds ``g_tj * ||f_j(x_t)||`` and a count to expert ``j`` for every
    routed pair, each ``f_j`` computed by the module's own forward on its tokens."""

    def hook(module, args, kwargs):
        if scaled_input(module):
            x = args[0] if args else kwargs["hidden_states"]
            return scaled_saliency(module, sums, counts, x)
        x, index, weights = (list(args) + [kwargs.get(k) for k in ("top_k_index",
                             "top_k_weights")])[:3]  # fmt: skip
        if index is None or weights is None or weights.shape != index.shape:
            raise PrunellaError(
                f"{type(module).__name__} is not called with (hidden, top-k index, top-k "
                "weights): REAP cannot read its routing"
            )
        x = x.reshape(-1, x.shape[-1])
        index, weights = index.reshape(x.shape[0], -1), weights.reshape(x.shape[0], -1)
        for j in range(sums.numel()):
            token, slot = (index == j).nonzero(as_tuple=True)
            if token.numel() == 0:
                continue
            ones = torch.ones(token.numel(), 1, dtype=weights.dtype, device=x.device)
            alone = torch.full_like(ones, j, dtype=index.dtype)
            out = module.forward(x[token], alone, ones)
            norms = torch.linalg.norm(out.double(), dim=-1)
            sums[j] += float((weights[token, slot].double() * norms).sum())
            counts[j] += token.numel()

    return hook


def scaled_input(experts: nn.Module) -> bool:
    """Whether ``experts`` takes its inputs scaled by the router's weights (Llama 4): the
    attribute the experts adapter sets, or its layout table's entry for the class."""
    explicit = EXPLICIT.get(type(experts).__name__, {})
    return bool(getattr(experts, "scaled_input", explicit.get("scaled_input", False)))


def scaled_saliency(module: nn.Module, sums: torch.Tensor, counts: torch.Tensor, x) -> None:
    """Adds ``||f_j(g_tj x_t)||`` and a count to expert ``j`` for every token routed to it,
    from ``module``'s own output on ``x`` (``[E * T, H]``: expert ``j``'s block of ``T``
    rows scaled by its router weights, zero where it was not chosen)."""
    count = sums.numel()
    routed = x.reshape(count, -1, x.shape[-1]).ne(0).any(-1)  # [E, T]
    out = module.forward(x).reshape(count, -1, x.shape[-1])  # what the block's forward makes
    for j in range(count):  # one expert's norms in float64 at a time
        norms = torch.linalg.vector_norm(out[j][routed[j]], dim=-1, dtype=torch.float64)
        sums[j] += float(norms.sum())
        counts[j] += int(routed[j].sum())


def mean_saliency(sums: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``S_j``: the summed saliency over the tokens routed to ``j`` (0 for none)."""
    return sums / counts.clamp(min=1.0)


def removal_order(saliency: torch.Tensor, stop: int) -> list[int]:
    """Experts lowest saliency first (``torch.topk``, as llm-compressor), all but ``stop``."""
    drop = len(saliency) - stop
    return torch.topk(saliency, drop, largest=False).indices.tolist() if drop else []


def cut_experts(block: nn.Module, experts: Experts, kept: torch.Tensor) -> None:
    """Keep only the experts ``kept`` of ``block``, in place: every tensor indexed by
    expert sliced, and every module's ``num_experts`` set."""
    for name, tensor in experts.tensors(block).items():
        owner, _, attr = name.rpartition(".")
        module = block.get_submodule(owner)
        sliced = tensor.detach().index_select(0, kept.to(tensor.device)).contiguous()
        if isinstance(tensor, nn.Parameter):
            tensor.data = sliced
        else:
            module.register_buffer(attr, sliced, persistent=attr in module.state_dict())
    moe = block.get_submodule(experts.path)
    for module in (moe, moe.experts, getattr(moe, experts.router)):
        for key in ("num_experts", "n_routed_experts", "num_local_experts"):
            if isinstance(getattr(module, key, None), int):
                setattr(module, key, len(kept))
