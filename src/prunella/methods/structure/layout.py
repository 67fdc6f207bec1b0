"""Where a block's structure lives: which tensors one MLP channel or one KV group owns.

A decoder block that can be cut has an attention module with separate ``q_proj``,
``k_proj``, ``v_proj`` and ``o_proj`` (grouped-query attention: ``n_rep`` query heads
share each key/value head) and an MLP with ``up_proj`` and ``down_proj`` (and
``gate_proj`` when gated). Cutting removes, for one **MLP channel** ``j``, row ``j`` of
the gate and up projections and column ``j`` of ``down_proj``; for one **KV group**
``g``, its key and value heads, its ``n_rep`` query heads (rows of ``q_proj``) and their
columns of ``o_proj``, and the matching entries of any norm that spans all the heads
(OLMo-2's ``q_norm``). The config holds one width for all blocks (``intermediate_size``,
``num_key_value_heads``), so every block keeps the same number of each.

Fused projections (Phi-3's ``qkv_proj``), attention without ``o_proj`` (GPT-2, OPT,
BLOOM), multi-head latent attention and mixtures of experts have no such layout: a
width cut is refused for them in one line; removing whole blocks needs nothing but the
block list and the config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...errors import PrunellaError

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class Cut:
    """One tensor of a block and how a unit owns it: along ``dim``, ``size`` entries per
    unit (``kind``: ``channel`` of the MLP, ``query`` head, or ``kv`` head)."""

    name: str
    kind: str
    dim: int
    size: int


@dataclass(frozen=True)
class Layout:
    """The cuttable structure of the model's blocks (all alike)."""

    width: int  # MLP channels
    kv_groups: int
    n_rep: int  # query heads per KV group
    head_dim: int
    cuts: tuple[Cut, ...]
    heads: bool = True  # whether the family's config can say fewer KV groups

    def per_unit(self, block: nn.Module) -> tuple[int, int]:
        """Parameters of one block that one MLP channel and one KV group own."""
        params = dict(block.named_parameters())
        channel = group = 0
        for cut in self.cuts:
            shape = params[cut.name].shape
            others = params[cut.name].numel() // shape[cut.dim]
            if cut.kind == "channel":
                channel += others * cut.size
            else:  # a query head of a group counts n_rep times
                group += others * cut.size * (self.n_rep if cut.kind == "query" else 1)
        return channel, group

    def keep_index(self, kind: str, kept: torch.Tensor) -> torch.Tensor:
        """Indices along a tensor's cut dimension kept, given the kept units (channels, or
        KV groups)."""
        if kind == "channel":
            return kept
        heads = kept if kind == "kv" else (kept[:, None] * self.n_rep + torch.arange(self.n_rep))
        heads = heads.reshape(-1)
        return (heads[:, None] * self.head_dim + torch.arange(self.head_dim)).reshape(-1)


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def layout_of(model: nn.Module, block: nn.Module) -> Layout:
    """The layout of ``model``'s blocks (``block``: one of them), or a one-line error that
    says why its width cannot be cut."""
    config = model.config
    family = getattr(config, "model_type", type(model).__name__)
    attention, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
    missing = [
        f"self_attn.{p}"
        for p in ATTENTION
        if not isinstance(getattr(attention, p, None), nn.Linear)
    ] + [
        f"mlp.{p}"
        for p in ("up_proj", "down_proj")
        if not isinstance(getattr(mlp, p, None), nn.Linear)
    ]
    if missing:
        raise PrunellaError(
            f"{family}: its blocks have no {missing[0]} (fused projections, latent attention "
            "or experts): MLP channels and KV groups cannot be cut; --cut depth removes "
            "whole blocks"
        )
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or 0
    kv = kv or heads
    head_dim = head_dim_of(config)
    width = mlp.down_proj.in_features
    if (
        attention.k_proj.out_features != kv * head_dim
        or attention.q_proj.out_features != heads * head_dim
    ):
        raise PrunellaError(
            f"{family}: q_proj/k_proj widths do not match {heads} heads and {kv} key/value "
            f"heads of {head_dim}: its attention cannot be cut"
        )
    cuts = [Cut(f"mlp.{p}.{t}", "channel", 0, 1) for p in ("gate_proj", "up_proj")
            for t in ("weight", "bias") if _has(mlp, p, t)]  # fmt: skip
    cuts += [Cut("mlp.down_proj.weight", "channel", 1, 1)]
    for proj, kind in (("q_proj", "query"), ("k_proj", "kv"), ("v_proj", "kv")):
        cuts += [Cut(f"self_attn.{proj}.{t}", kind, 0, head_dim) for t in ("weight", "bias")
                 if _has(attention, proj, t)]  # fmt: skip
    cuts.append(Cut("self_attn.o_proj.weight", "query", 1, head_dim))
    owned = {c.name for c in cuts}
    for name, param in attention.named_parameters():
        full = f"self_attn.{name}"
        if full in owned or name.startswith("o_proj."):
            continue
        if param.dim() == 1 and param.numel() == heads * head_dim:
            cuts.append(Cut(full, "query", 0, head_dim))
        elif param.dim() == 1 and param.numel() == kv * head_dim and kv != heads:
            cuts.append(Cut(full, "kv", 0, head_dim))
        elif not (param.dim() == 1 and param.numel() == head_dim):
            raise PrunellaError(
                f"{family}: {full} {tuple(param.shape)} is not a per-head tensor: its "
                "attention cannot be cut"
            )
    for name, _ in mlp.named_parameters():
        if f"mlp.{name}" not in owned and not name.startswith("down_proj."):
            raise PrunellaError(f"{family}: mlp.{name} is not a projection: its MLP cannot be cut")
    return Layout(width, kv, heads // kv, head_dim, tuple(cuts))


def _has(module: nn.Module, proj: str, tensor: str) -> bool:
    layer = getattr(module, proj, None)
    return layer is not None and getattr(layer, tensor, None) is not None
