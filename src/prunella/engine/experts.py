"""The experts of a mixture-of-experts block, as prunable layers of their own.

transformers 5 stores the experts of Mixtral, Qwen2/3-MoE, OLMoE, GraniteMoE,
DeepSeek-V3, gpt-oss, ... as fused 3-D parameters of one experts module (no
``nn.Linear`` per expert), decorated with ``use_experts_implementation``, which
records their layout:

* ``gate_up_proj`` ``[E, 2I, H]``: expert ``e``'s gate rows then its up rows
  (``is_concatenated``), or gate and up rows interleaved (gpt-oss: gate rows
  ``0, 2, 4, ...``); ``[E, H, 2I]`` when ``is_transposed``; ``up_proj`` alone when
  the experts have no gate (``has_gate`` false); optional ``*_bias``;
* ``down_proj`` ``[E, H, I]`` (``[E, I, H]`` transposed).

:func:`expert_views` gives each expert three :class:`ExpertLinear` layers,
``{e}.gate_proj``, ``{e}.up_proj`` and ``{e}.down_proj``: ``[out, in]`` views into
the fused tensors, so a solver's in-place write prunes the fused parameter itself
and the checkpoint is saved as it is. While a block is pruned, :func:`routed`
replaces each experts module's forward by :func:`routed_forward`, which sends
every expert exactly the tokens its router chose, through its views: the
engine's hooks then gather per-expert statistics (Hessians, input norms) from the
routed tokens only, and gate and up share their expert's input statistics. Every
expert is called on every batch, with no rows when the router chose it for no
token, so that one-pass pruning (batches meeting at each layer) sees every batch.

Experts kept as ``nn.Linear`` modules need none of this. Llama 4's experts class
is not decorated: it runs every token through every expert, the router's scores
applied to the input (zero for an expert not chosen). Its layout is the one
written here (:data:`EXPLICIT`), and :func:`scaled_input_forward` sends each
expert its chosen (non-zero) rows. Other undecorated fused experts (DBRX's 2-D
slabs) are refused by the adapter.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from types import MethodType

import torch
import torch.nn.functional as F
from torch import nn

EXPERT = re.compile(r"^(.*\.experts\.\d+)\.[^.]+$")
VIEWS = "_prunella_views"  # where an experts module keeps its views (a plain attribute)
# The one explicit adapter: discovery cannot read the layout of an undecorated class.
EXPLICIT = {
    "Llama4TextExperts": dict(
        is_transposed=True, is_concatenated=True, has_gate=True, has_bias=False, scaled_input=True
    )
}


def is_fused_experts(module: nn.Module) -> bool:
    """Whether ``module`` holds fused 3-D expert parameters in a layout Prunella knows
    (transformers' ``use_experts_implementation`` classes)."""
    explicit = EXPLICIT.get(type(module).__name__)
    if explicit is not None and not hasattr(module, "has_gate"):
        module.__dict__.update(explicit)  # plain attributes, as the decorator sets them
    has_layout = all(hasattr(module, a) for a in ("is_transposed", "is_concatenated", "has_gate"))
    weight = module._parameters.get(
        "gate_up_proj" if getattr(module, "has_gate", True) else "up_proj"
    )
    down = module._parameters.get("down_proj")
    return has_layout and weight is not None and down is not None and weight.dim() == 3


def expert_of(layer_name: str) -> str | None:
    """The expert a layer belongs to (``model.layers.3.mlp.experts.5`` for its
    ``gate_proj``, ``up_proj`` or ``down_proj``), or ``None`` outside the experts."""
    match = EXPERT.match(layer_name)
    return match.group(1) if match else None


class ExpertLinear(nn.Module):
    """One matrix of one expert: a ``[out_features, in_features]`` view of a fused
    parameter, read afresh on every access (so it follows the parameter when it is
    loaded, moved or copied to another device)."""

    def __init__(self, experts: nn.Module, param: str, expert: int, part: int, parts: int):
        super().__init__()
        # a plain reference, not a submodule: the experts module owns the parameters
        object.__setattr__(self, "experts", experts)
        self.param, self.expert, self.part, self.parts = param, expert, part, parts
        self.routed_weight = 0.0  # the router's weights summed over the current input's tokens

    def _slice(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rows ``part`` of ``parts`` of an ``[out, ...]`` tensor, in the model's layout."""
        if self.parts == 1:
            return tensor
        if self.experts.is_concatenated:
            return tensor.chunk(self.parts, dim=0)[self.part]
        return tensor[self.part :: self.parts]  # interleaved (gpt-oss)

    @property
    def weight(self) -> torch.Tensor:
        w = getattr(self.experts, self.param)[self.expert]
        return self._slice(w.t() if self.experts.is_transposed else w)

    @property
    def bias(self) -> torch.Tensor | None:
        if not getattr(self.experts, "has_bias", False):
            return None
        return self._slice(getattr(self.experts, f"{self.param}_bias")[self.expert])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.param}[{self.expert}] part {self.part}/{self.parts}"


def expert_views(experts: nn.Module) -> dict[str, ExpertLinear]:
    """``{e}.gate_proj`` / ``{e}.up_proj`` / ``{e}.down_proj`` -> view, for every expert
    (the same objects on every call, so hooks put on them stay)."""
    views = experts.__dict__.get(VIEWS)
    if views is None:
        views = {}
        for e in range(experts.num_experts):
            if experts.has_gate:
                views[f"{e}.gate_proj"] = ExpertLinear(experts, "gate_up_proj", e, 0, 2)
                views[f"{e}.up_proj"] = ExpertLinear(experts, "gate_up_proj", e, 1, 2)
            else:
                views[f"{e}.up_proj"] = ExpertLinear(experts, "up_proj", e, 0, 1)
            views[f"{e}.down_proj"] = ExpertLinear(experts, "down_proj", e, 0, 1)
        experts.__dict__[VIEWS] = views  # not a submodule: state_dict and saving ignore it
    return views


def routed_forward(
    self: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """The experts' forward, one expert at a time through its views:
    ``y_t = sum_{e in top_k(t)} w_te * down_e(act(gate_e(x_t)) * up_e(x_t))``, with the
    model's own gating (``_apply_gate``: gpt-oss's clamped SwiGLU, ...)."""
    views = expert_views(self)
    out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
    for e in range(self.num_experts):
        token, slot = torch.where(top_k_index == e)
        x, weight = hidden_states[token], top_k_weights[token, slot]
        mass = float(weight.detach().float().sum())
        gate_view, up_view = views.get(f"{e}.gate_proj"), views[f"{e}.up_proj"]
        if self.has_gate:
            gate, up = _call(gate_view, x, mass), _call(up_view, x, mass)
            if self.is_concatenated:
                gate_up = torch.cat([gate, up], dim=-1)
            else:
                gate_up = torch.stack([gate, up], dim=-1).flatten(-2)
            h = self._apply_gate(gate_up)
        else:
            h = self.act_fn(_call(up_view, x, mass))
        y = _call(views[f"{e}.down_proj"], h, mass)
        if getattr(self, "has_post_expert_norm", False):
            y = self.post_expert_norm(y)
        out.index_add_(0, token, y.float() * weight.float()[:, None])
    return out.to(hidden_states.dtype)


def scaled_input_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Llama 4's experts' forward through the views: ``hidden_states`` is ``[E * T, H]``,
    expert ``e``'s block of ``T`` rows scaled by its router scores (zero rows where it was
    not chosen, whose outputs are zero). Each expert runs on its chosen rows only. The
    router's weights are already in the inputs: its weight mass is not seen, so the
    routed weight recorded is the token count."""
    views = expert_views(self)
    x = hidden_states.view(self.num_experts, -1, hidden_states.shape[-1])
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(self.num_experts):
        token = x[e].ne(0).any(-1).nonzero().squeeze(1)
        chosen, count = x[e, token], float(len(token))
        gate = _call(views[f"{e}.gate_proj"], chosen, count)
        h = self.act_fn(gate) * _call(views[f"{e}.up_proj"], chosen, count)
        out[e, token] = _call(views[f"{e}.down_proj"], h, count).float()
    return out.view(hidden_states.shape).to(hidden_states.dtype)


def _call(view: ExpertLinear, x: torch.Tensor, routed_weight: float) -> torch.Tensor:
    """Run ``view`` on ``x``, its router weight set just before (with one pass, batches
    take turns inside the calls, so it must be this batch's)."""
    view.routed_weight = routed_weight
    return view(x)


@contextlib.contextmanager
def routed(block: nn.Module) -> Iterator[None]:
    """Run the fused experts of ``block`` through their views (:func:`routed_forward`)."""
    patched = [m for m in block.modules() if is_fused_experts(m)]
    own = [m.__dict__.get("forward") for m in patched]  # e.g. accelerate's device hooks
    for module in patched:
        forward = scaled_input_forward if getattr(module, "scaled_input", False) else routed_forward
        module.forward = MethodType(forward, module)
    try:
        yield
    finally:
        for module, forward in zip(patched, own, strict=True):
            if forward is None:
                del module.forward
            else:
                module.forward = forward
