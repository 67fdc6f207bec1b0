"""Quantized checkpoints in the compressed-tensors format (``pack-quantized``), written
through the compressed-tensors library: what transformers loads with
``AutoModelForCausalLM.from_pretrained`` and vLLM serves.

From a dense checkpoint whose quantized layers hold their dequantized weights
``w_hat = (q - z) s`` (rounded once to the checkpoint's dtype) and their scales (and
zero points) kept beside them: one config group per grid (bits, group size, symmetry),
each listing its layers by name; every layer's codes are recovered as
``q = round(w_hat / s) + z`` and checked to give back ``w_hat`` exactly, then the
library's pack-quantized compressor packs them (``weight_packed``: int32 words;
``weight_scale`` in the checkpoint's dtype, or bfloat16 for a float32 checkpoint, since
every scale is a bfloat16 value; ``weight_zero_point`` when asymmetric) and its model
compressor writes the ``quantization_config``.

The checkpoint is read and written one tensor at a time (the library's config comes
from a model skeleton on the meta device), so writing it takes one layer's memory, not
a second copy of the model: the files are those the library writes from a whole model
(``apply_quantization_config``, ``compress_model``, ``save_pretrained``), tensor for
tensor (tested).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import PrunellaError


def codes(
    weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grid
) -> tuple[torch.Tensor, torch.Tensor]:
    """The integer codes of a dequantized ``weight`` (``[rows, cols]``, any float dtype)
    and ``(q - z) s`` unrounded (float64), checked: rounded to ``weight``'s dtype, it is
    ``weight`` exactly. On a GGML grid with a minimum ``m`` per block (in ``zero``'s
    place), ``q s + m`` as the quantizer and llama.cpp compute it, in float32."""
    s = scale.double().repeat_interleave(grid.group, dim=1)
    z = zero.double().repeat_interleave(grid.group, dim=1)
    if grid.has_min:
        q = ((weight.double() - z) / s).round().clamp(grid.qmin, grid.qmax)
        exact = (q.float() * s.float() + z.float()).double()
    else:
        q = (weight.double() / s).round().add(z).clamp(grid.qmin, grid.qmax)
        exact = (q - z) * s
    back = exact.to(weight.dtype)
    if not torch.equal(back, weight):
        raise PrunellaError(
            "a quantized layer's weights are not on its grid (a bug): "
            f"{(back != weight).sum().item()} of {weight.numel()} differ"
        )
    return q, exact


def check_quantizable(model: torch.nn.Module, layers) -> None:
    """One line, before any work, when a layer is not an ``nn.Linear`` (compressed-tensors
    quantizes those only): experts fused in one tensor, GPT-2's Conv1D."""
    for name in layers:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            module = None
        if not isinstance(module, torch.nn.Linear):
            kind = type(module).__name__ if module is not None else "part of a fused tensor"
            raise PrunellaError(
                f"compressed-tensors quantizes linear layers, and {name} is {kind} "
                "(mixture-of-experts weights and Conv1D are not yet written quantized): "
                "use --format hf"
            )


def quantization_config(grids: dict):
    """The library's config: one group per grid, each with its layers by name."""
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
    )

    by_grid: dict = {}
    for name, grid in grids.items():
        by_grid.setdefault(grid, []).append(name)
    return QuantizationConfig(
        config_groups={
            f"group_{i}": QuantizationScheme(
                targets=names,
                weights=QuantizationArgs(
                    num_bits=grid.bits,
                    type="int",
                    symmetric=grid.symmetric,
                    strategy="group",
                    group_size=grid.group,
                ),
            )
            for i, (grid, names) in enumerate(sorted(by_grid.items(), key=lambda g: str(g[0])))
        },
        quantization_status=QuantizationStatus.FROZEN,
        format="pack-quantized",
    )


def write_compressed_tensors(
    dense: Path, folder: Path, grids: dict, tensors: dict[str, torch.Tensor]
) -> None:
    """Write ``dense`` (a checkpoint whose layers in ``grids`` are quantized, their scales
    in ``tensors`` as ``LAYER.weight_scale``/``LAYER.weight_zero_point``) into ``folder``
    as a compressed-tensors ``pack-quantized`` checkpoint, one tensor at a time, each
    quantized layer's weight replaced by the library's packed tensors, in shards as
    ``save_pretrained`` cuts them."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationStatus, apply_quantization_config
    from transformers import AutoConfig, AutoModelForCausalLM

    from .checkpoint import checkpoint_key_map
    from .safetensors_io import CheckpointReader, SizedShards

    config = AutoConfig.from_pretrained(dense)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    check_quantizable(skeleton, grids)
    apply_quantization_config(skeleton, quantization_config(grids), show_progress=False)
    compressor = ModelCompressor.from_pretrained_model(
        skeleton, quantization_format="pack-quantized"
    )
    reader = CheckpointReader(dense)
    key_of = checkpoint_key_map(skeleton, reader)  # module names -> the checkpoint's keys
    layer_at = {}
    for layer in grids:
        key = key_of.get(f"{layer}.weight")
        if not isinstance(key, str) or not key.endswith(".weight"):
            raise PrunellaError(
                f"{layer}.weight is not one '.weight' tensor of the checkpoint written "
                "(a fused or renamed layout): use --format hf"
            )
        layer_at[key] = layer
    with torch.no_grad(), SizedShards(folder) as shards:
        for key in sorted(reader.files, key=lambda k: reader.files[k]):  # file by file
            tensor = reader.tensor(key)
            layer = layer_at.get(key)
            if layer is not None:
                module = skeleton.get_submodule(layer)
                scale = tensors[f"{layer}.weight_scale"]
                zero = tensors.get(f"{layer}.weight_zero_point", torch.zeros_like(scale))
                _, exact = codes(tensor, scale, zero, grids[layer])
                state = {  # float32 weights: the library's round(w / s) + z gives back q
                    "weight": exact.float(),
                    "weight_scale": scale.to(tensor.dtype),
                    "weight_zero_point": zero.to(module.weight_zero_point.dtype),
                }
                packed = PackedQuantizationCompressor.compress(state, module.quantization_scheme)
                packed["weight_scale"] = packed["weight_scale"].to(scale_dtype(tensor.dtype))
                # named as the checkpoint names the weight (the loader maps both alike)
                written = {key.removesuffix("weight") + name: t for name, t in packed.items()}
            else:
                written = {key: tensor}
            for name, t in written.items():
                shards.add(name, t.contiguous())
    for name in ("config.json", "generation_config.json"):
        if (dense / name).is_file():
            (folder / name).write_bytes((dense / name).read_bytes())
    # the quantization_config, into config.json, as compress_model leaves it
    compressor.quantization_config.quantization_status = QuantizationStatus.COMPRESSED
    compressor.update_config(folder)


def scale_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype scales are written in: the checkpoint's, but bfloat16 for float32 (every
    scale is a bfloat16 value, so bfloat16 holds it exactly and the loader's cast back to
    float32 gives the same number). float16 holds them exactly within its normal range
    (scales above 2^-14)."""
    return torch.bfloat16 if dtype == torch.float32 else dtype
