"""Model adapters: where the decoder blocks and their linear layers live.

Every supported model is a decoder-only transformer whose blocks sit in one
``nn.ModuleList``; the adapter names its path, found from the model itself
(:func:`adapter_for`), with no list of families. The engine calls blocks with
exactly the arguments the model itself passes them (captured at run time), so
rotary embeddings, attention masks and sliding windows need no per-family code.
Inside a block, every ``nn.Linear`` (and GPT-2's transposed ``Conv1D``) is
prunable. Embeddings and the LM head are outside the blocks and not pruned.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import PrunellaError


@dataclass(frozen=True)
class Adapter:
    family: str
    blocks_path: str

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks_path)

    def linears(self, block: nn.Module) -> dict[str, nn.Module]:
        """The prunable layers of one block, in execution order, by name inside the block."""
        return {
            name: module
            for name, module in block.named_modules()
            if isinstance(module, nn.Linear | Conv1D)
        }

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

    The blocks are the ``nn.ModuleList`` whose elements are the classes the model names
    in ``_no_split_modules`` (transformers' list of the modules that must stay whole on
    one device: its decoder layers), or, for a model without that list, the
    ``nn.ModuleList`` of one class holding the most parameters. Works on a model whose
    parameters are on the meta device.
    """
    config = model.config
    model_type = config.model_type
    if getattr(config, "is_encoder_decoder", False):
        raise PrunellaError(
            f"unsupported architecture {model_type!r}: an encoder-decoder model "
            "(Prunella prunes decoder-only causal LMs)"
        )
    if _is_encoder(config):
        raise PrunellaError(
            f"unsupported architecture {model_type!r}: an encoder with bidirectional attention "
            "(is_decoder is false), not a causal LM"
        )
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    candidates = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        classes = {type(block).__name__ for block in module}
        if classes <= no_split or len(classes) == 1:
            size = sum(p.numel() for p in module.parameters())
            candidates.append((classes <= no_split, size, name))
    if not candidates:
        raise PrunellaError(f"unsupported architecture {model_type!r}: no list of decoder blocks")
    adapter = Adapter(model_type, max(candidates)[2])
    fused = [
        f"{adapter.blocks_path}.{name}"
        for name, param in adapter.blocks(model).named_parameters()
        if param.dim() == 3
    ]
    if fused:
        raise PrunellaError(
            f"unsupported architecture {model_type!r}: its experts are fused 3-D parameters "
            f"({fused[0]}), which Prunella does not prune yet"
        )
    if not adapter.linears(adapter.blocks(model)[0]):
        raise PrunellaError(
            f"unsupported architecture {model_type!r}: {adapter.blocks_path}.0 has no linear layers"
        )
    return adapter


def _is_encoder(config) -> bool:
    """A masked-LM family (BERT, RoBERTa, ...) not configured as a decoder: transformers
    builds a causal-LM head for it, but its attention still sees the future."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    return config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not config.is_decoder


def block_index(layer_name: str) -> int:
    """The block number in a layer's dotted name (``model.layers.3.mlp.up_proj`` -> 3)."""
    return int(next(part for part in layer_name.split(".") if part.isdigit()))


def get_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as a ``[out_features, in_features]`` view."""
    return layer.weight.t() if isinstance(layer, Conv1D) else layer.weight


def set_weight(layer: nn.Module, weight: torch.Tensor) -> None:
    """Copy a ``[out_features, in_features]`` matrix into the layer, in its own dtype."""
    get_weight(layer).data.copy_(weight)
