"""Model adapters: where the decoder blocks and their linear layers live.

Every supported family is a decoder-only transformer whose blocks sit in one
``nn.ModuleList``; the adapter names its path. The engine calls blocks with
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


_LLAMA_LIKE = Adapter("llama", "model.layers")

ADAPTERS: dict[str, Adapter] = {
    "llama": _LLAMA_LIKE,  # Llama 2/3, SmolLM, TinyLlama, Vicuna ...
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "opt": Adapter("opt", "model.decoder.layers"),
    "gpt2": Adapter("gpt2", "transformer.h"),
    "gpt_neox": Adapter("gpt_neox", "gpt_neox.layers"),
}


def adapter_for(model_type: str) -> Adapter:
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise PrunellaError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(sorted(ADAPTERS))}"
        ) from None


def block_index(layer_name: str) -> int:
    """The block number in a layer's dotted name (``model.layers.3.mlp.up_proj`` -> 3)."""
    return int(next(part for part in layer_name.split(".") if part.isdigit()))


def get_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as a ``[out_features, in_features]`` view."""
    return layer.weight.t() if isinstance(layer, Conv1D) else layer.weight


def set_weight(layer: nn.Module, weight: torch.Tensor) -> None:
    """Copy a ``[out_features, in_features]`` matrix into the layer, in its own dtype."""
    get_weight(layer).data.copy_(weight)
