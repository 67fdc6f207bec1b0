"""HEAPr's atomic experts as a structure cut: every routed expert narrower.

Li et al., "HEAPr: Hessian-based Efficient Atomic Expert Pruning in Output Space",
ICLR 2026; the scores are :mod:`prunella.methods.heapr`'s (one forward and backward
pass of the next-token loss):

    S_ek = E_t[x_tk²] · E_t[(g_t · w_k)²]

for atomic expert ``k`` (an intermediate neuron: a gate and an up row, a down column) of
expert ``e``. The configs hold one expert width, so the cut is the paper's per-expert
ranking ("uniform" in ``prunella heapr``): every expert of every mixture-of-experts block
keeps its ``expert_width`` atomic experts of highest score, and the config's expert
intermediate size (``moe_intermediate_size``, ``intermediate_size``, ...) shrinks. The
candidates weigh this against removing whole experts (REAP) and blocks by their KL to the
dense model. The paper ranks all atomic experts together, which leaves the experts at
different widths that no config of these families can describe.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...engine.adapters import adapter_for
from ...errors import PrunellaError
from .. import heapr
from ..heapr import PAPER  # noqa: F401 (the report's reference)
from .reap import Experts


@dataclass(frozen=True)
class Atomic:
    """A model's atomic experts: the experts module inside a block (``path``), its width
    (atomic experts per expert), the parameters one unit of width owns in a block (one
    atomic expert of every expert) and the config field of the width."""

    path: str
    width: int
    per_unit: int
    key: str


def atomic_of(model: nn.Module, experts: dict[int, Experts]) -> Atomic | None:
    """The atomic experts of ``model``'s mixture-of-experts blocks, or ``None`` where its
    experts are not fused tensors or no config field sets their width alone."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from ...engine.experts import is_fused_experts

    if not experts:
        return None
    i, moe = next(iter(experts.items()))
    path = f"{moe.path}.experts"
    module = adapter_for(model).blocks(model)[i].get_submodule(path)
    if not is_fused_experts(module):
        return None
    width = heapr.expert_width(module)
    if width < 2:
        return None
    try:
        key = heapr.width_key(model.config, model, width, width - 1)
    except PrunellaError:
        return None
    config = model.config.__class__.from_dict({**model.config.to_dict(), key: width - 1})
    with init_empty_weights():
        narrower = AutoModelForCausalLM.from_config(config)
    block = adapter_for(narrower).blocks(narrower)[i].get_submodule(path)
    per_unit = sum(p.numel() for p in module.parameters()) - sum(
        p.numel() for p in block.parameters()
    )
    return Atomic(path, width, per_unit, key)


def scores(
    model: nn.Module, windows: torch.Tensor, batch_size: int, progress: bool
) -> dict[int, torch.Tensor]:
    """Block index -> ``S`` (``[experts, width]``), HEAPr's score of each atomic expert."""
    prefix = adapter_for(model).blocks_path + "."
    stats = heapr.heapr_stats(model, windows, batch_size, progress)
    return {
        int(name[len(prefix) :].split(".")[0]): s.scores().cpu()
        for name, s in stats.items()
        if name.startswith(prefix)
    }


def cut_tensors(
    block: nn.Module, atomic: Atomic, score: torch.Tensor, width: int
) -> dict[str, torch.Tensor]:
    """The block's expert tensors (name inside the block -> tensor) with every expert
    keeping its ``width`` atomic experts of highest ``score``."""
    module = block.get_submodule(atomic.path)
    keep = heapr.atomic_keep({"": score}, 1 - width / atomic.width, uniform=True)[""]
    if int(keep[0].sum()) != width:
        raise PrunellaError(f"internal: HEAPr kept {int(keep[0].sum())} of {width} atomic experts")
    shrunk = heapr.shrunk_tensors(module, keep)
    return {f"{atomic.path}.{name}": tensor for name, tensor in shrunk.items()}
