"""Models larger than memory: one decoder block in memory at a time.

The model is built with its parameters on the ``meta`` device (no memory) and
its buffers real (``accelerate.init_empty_weights(include_buffers=False)``);
the parameters outside the blocks (embeddings, final norm, LM head) are read
from the checkpoint's safetensors shards, which are memory-mapped, and each
block's parameters are read just before it is pruned and written out, then
dropped, just after. Peak memory is then about one block, the calibration
activations and the embeddings.

Checkpoint keys are mapped to parameter names with ``transformers``' own
renaming rules (e.g. GPT-NeoX's ``embed_out`` is ``lm_head``) and written back
under the original keys. Checkpoints whose loading needs tensor conversions
(fused experts and the like) are refused with a clear message.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .errors import PrunellaError

INDEX = "model.safetensors.index.json"


class CheckpointReader:
    """Tensors of a safetensors checkpoint (one file or an indexed set of shards), by key."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        index = self.path / INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            self.files = {key: self.path / name for key, name in weight_map.items()}
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if len(files) != 1:
                raise PrunellaError(f"{path} has {len(files)} safetensors files and no {INDEX}")
            self.files = {}
            for file in files:
                with safe_open(file, framework="pt") as handle:
                    self.files.update(dict.fromkeys(handle.keys(), file))

    def keys(self) -> list[str]:
        return list(self.files)

    def tensor(self, key: str) -> torch.Tensor:
        """A copy of one tensor; the file is mapped only while it is read, so the pages
        of blocks already done do not stay in this process's resident memory."""
        with safe_open(self.files[key], framework="pt") as handle:
            return handle.get_tensor(key)

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in set(self.files.values()))


def checkpoint_key_map(model: nn.Module, reader: CheckpointReader) -> dict[str, str]:
    """Model parameter/buffer name -> checkpoint key, with transformers' renaming rules."""
    names = dict(model.state_dict(keep_vars=True))
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key

        transforms = get_model_conversion_mapping(model)
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    except ImportError:  # older transformers: keys are the parameter names
        return {key: key for key in reader.files if key in names}
    mapping = {}
    for key in reader.files:
        name, converted = rename_source_key(
            key, renamings, converters, model.base_model_prefix, names
        )
        if converted is not None:
            raise PrunellaError(
                f"streaming cannot read {key!r}: this checkpoint needs a tensor conversion; "
                "use --offload none"
            )
        if name in names:
            mapping[name] = key
    return mapping


def empty_model(path: Path, dtype: torch.dtype | None = None):
    """The model of ``path`` with every parameter on the meta device and real buffers.

    ``dtype`` defaults to the checkpoint's own (from its config).
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    if dtype is None:
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype or torch.float32
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def materialize(
    module: nn.Module,
    prefix: str,
    reader: CheckpointReader,
    key_map: dict[str, str],
    skip: str | None = None,
) -> None:
    """Read the parameters (and stored buffers) of ``module`` (named ``prefix...``) from disk.

    Submodules named ``skip`` (relative to ``module``) are left alone. Tied
    parameters are re-tied afterwards; any parameter still empty is an error.
    """
    for name, sub in module.named_modules():
        if skip is not None and (name == skip or name.startswith(skip + ".")):
            continue
        full = f"{prefix}{name}." if name else prefix
        for store in (sub._parameters, sub._buffers):
            for key, tensor in store.items():
                if tensor is None or (full + key) not in key_map:
                    continue
                value = reader.tensor(key_map[full + key])
                if tuple(value.shape) != tuple(tensor.shape):
                    raise PrunellaError(
                        f"tensor {key_map[full + key]!r} has shape {tuple(value.shape)}, "
                        f"the model expects {tuple(tensor.shape)}"
                    )
                if isinstance(tensor, nn.Parameter):
                    value = nn.Parameter(value, requires_grad=False)
                store[key] = value
    if hasattr(module, "tie_weights"):
        module.tie_weights()
    for name, param in module.named_parameters():
        if param.is_meta and not (skip is not None and name.startswith(skip + ".")):
            raise PrunellaError(f"the checkpoint has no tensor for {prefix + name!r}")


def release(module: nn.Module) -> None:
    """Drop a block's parameters from memory (back to the meta device)."""
    module.to("meta")


def release_outside(model: nn.Module, skip: str) -> None:
    """Drop the parameters outside the submodule ``skip`` (the blocks) to the meta device.

    Once the first block's inputs are captured, the embeddings, final norm and LM
    head are not needed until the checkpoint is written, and :func:`materialize`
    reads them back then. Buffers (rotary frequencies) stay.
    """
    for name, sub in model.named_modules():
        if name == skip or name.startswith(skip + "."):
            continue
        for key, param in sub._parameters.items():
            if param is not None and not param.is_meta:
                sub._parameters[key] = nn.Parameter(param.to("meta"), requires_grad=False)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write a safetensors file atomically (temporary name, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
        str(tmp),
        metadata={"format": "pt"},
    )
    os.replace(tmp, path)


def module_tensors(
    module: nn.Module, prefix: str, key_map: dict[str, str], seen: set[int] | None = None
) -> dict[str, torch.Tensor]:
    """Checkpoint key -> tensor for what ``module`` stores (tied duplicates once)."""
    seen = set() if seen is None else seen
    out = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        full = prefix + name
        if full not in key_map or tensor.is_meta or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        out[key_map[full]] = tensor
    return out
