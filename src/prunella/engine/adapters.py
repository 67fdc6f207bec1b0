"""Model adapters: where the decoder blocks and their linear layers live.

Every supported model is a decoder-only transformer whose blocks sit in one
``nn.ModuleList``; the adapter names its path, found from the model itself
(:func:`adapter_for`), with no list of families. The engine calls blocks with
exactly the arguments the model itself passes them (captured at run time), so
rotary embeddings, attention masks and sliding windows need no per-family code.
Inside a block, every ``nn.Linear`` (and GPT-2's transposed ``Conv1D``) is
prunable, and so is every matrix of every expert stored in fused 3-D parameters
(:mod:`prunella.engine.experts`), except the routers. Embeddings and the LM head are
outside the blocks and not pruned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import PrunellaError
from .experts import expert_views, is_fused_experts


@dataclass(frozen=True)
class Adapter:
    family: str
    blocks_path: str

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks_path)

    def linears(self, block: nn.Module) -> dict[str, nn.Module]:
        """The prunable layers of one block, by name inside the block: every linear layer
        but a router, and every expert's gate, up and down matrices of fused experts
        (``mlp.experts.3.gate_proj``)."""
        layers = {}
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear | Conv1D) and not _is_router(block, name, module):
                layers[name] = module
            elif is_fused_experts(module):
                for local, view in expert_views(module).items():
                    layers[f"{name}.{local}"] = view
        return layers

    def layers(self, model: nn.Module) -> dict[str, tuple[int, int]]:
        """Full name -> ``(out_features, in_features)`` of every prunable layer, in model
        order (works on a model whose parameters are on the meta device)."""
        return {
            f"{self.blocks_path}.{i}.{local}": tuple(get_weight(layer).shape)
            for i, block in enumerate(self.blocks(model))
            for local, layer in self.linears(block).items()
        }


def adapter_for(model: nn.Module) -> Adapter:
    """Where ``model`` keeps its decoder blocks, found from the model itself.

    The blocks are the ``nn.ModuleList`` (under the model's text decoder,
    ``model.get_decoder()``, when it names one) whose elements are the classes the
    model names in ``_no_split_modules`` (transformers' list of the modules that must
    stay whole on one device: its decoder layers), or, for a model without that list,
    the ``nn.ModuleList`` holding the most parameters (the outermost, on a tie). Works
    on a model whose parameters are on the meta device.
    """
    model_type = model.config.model_type
    refusal = _not_a_decoder(model.config)
    if refusal:
        raise PrunellaError(f"unsupported architecture {model_type!r}: {refusal}")
    root, prefix = _decoder(model)
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    candidates = []
    for name, module in root.named_modules(prefix=prefix):
        if isinstance(module, nn.ModuleList) and len(module):
            named = {type(block).__name__ for block in module} <= no_split
            size = sum(p.numel() for p in module.parameters())
            # the named classes first, then the most parameters, then the outermost list
            candidates.append((named, size, -name.count("."), name))
    if not candidates:
        raise PrunellaError(f"unsupported architecture {model_type!r}: no list of decoder blocks")
    adapter = Adapter(model_type, max(candidates)[-1])
    fused = _fused_experts(adapter.blocks(model))
    if fused:
        raise PrunellaError(
            f"unsupported architecture {model_type!r}: its experts are fused parameters "
            f"({adapter.blocks_path}.{fused}) in a layout Prunella does not know"
        )
    if not adapter.linears(adapter.blocks(model)[0]):
        raise PrunellaError(
            f"unsupported architecture {model_type!r}: {adapter.blocks_path}.0 has no linear layers"
        )
    return adapter


def _is_router(block: nn.Module, name: str, layer: nn.Module) -> bool:
    """Whether a linear layer of ``block`` is a router beside fused experts: under the
    module holding the experts, named like a gate or router (``mlp.gate``,
    ``mlp.router.gate``, ``mlp.gate.wg``, ``router.proj``, ``shared_expert_gate``), with
    one output per expert or a single one."""
    parts = name.split(".")
    if not any(p == "gate" or p.endswith("_gate") or "router" in p for p in parts):
        return False
    for experts_name, experts in block.named_modules():
        if is_fused_experts(experts):
            home = experts_name.rpartition(".")[0]
            inside = home == "" or name.startswith(home + ".")
            if inside and get_weight(layer).shape[0] in (experts.num_experts, 1):
                return True
    return False


def _decoder(model: nn.Module) -> tuple[nn.Module, str]:
    """The model's text decoder and its name (the model itself, ``""``, if it names none):
    a multimodal model's vision tower has blocks too."""
    try:
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError):
        decoder = None
    if decoder is not None:
        for name, module in model.named_modules():
            if module is decoder:
                return module, name
    return model, ""


def _not_a_decoder(config) -> str:
    """Why a model that transformers builds as a causal LM is not one Prunella prunes
    (``""`` if it is): an encoder-decoder's decoder alone (BART, Whisper, ...: its
    cross-attention never runs without the encoder), or a masked-LM encoder (BERT,
    RoBERTa, ...) whose attention sees the future unless configured as a decoder."""
    from transformers.models.auto import modeling_auto as auto

    seq2seq = {
        *auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
        *auto.MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES,
    }
    if getattr(config, "is_encoder_decoder", False) or config.model_type in seq2seq:
        return "an encoder-decoder model (Prunella prunes decoder-only causal LMs)"
    if config.model_type in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES and not config.is_decoder:
        return "an encoder with bidirectional attention (is_decoder is false), not a causal LM"
    return ""


def _fused_experts(blocks: nn.ModuleList) -> str:
    """The first experts' weight that is neither an ``nn.Linear`` of its own nor in fused
    experts of a known layout (:func:`prunella.engine.experts.is_fused_experts`: Mixtral,
    Qwen3-MoE, OLMoE, gpt-oss, ...), or ``""``: Llama 4's experts (every token through
    every expert, the router's scores applied to the input) and DBRX's 2-D slabs."""
    own = (nn.Linear, Conv1D, nn.Embedding, nn.modules.conv._ConvNd)
    for name, module in blocks.named_modules():
        if isinstance(module, own) or is_fused_experts(module):
            continue
        for key, param in module.named_parameters(recurse=False):
            full = f"{name}.{key}" if name else key
            if param.dim() >= 2 and "expert" in full.lower():
                return full
    return ""


def block_index(layer_name: str) -> int:
    """The block number in a layer's dotted name (``model.layers.3.mlp.up_proj`` -> 3)."""
    return int(next(part for part in layer_name.split(".") if part.isdigit()))


def get_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as a ``[out_features, in_features]`` view."""
    return layer.weight.t() if isinstance(layer, Conv1D) else layer.weight


def set_weight(layer: nn.Module, weight: torch.Tensor) -> None:
    """Copy a ``[out_features, in_features]`` matrix into the layer, in its own dtype."""
    get_weight(layer).data.copy_(weight)
