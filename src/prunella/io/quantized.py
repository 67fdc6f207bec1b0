"""Quantized checkpoints in the compressed-tensors format (``pack-quantized``), written
through the compressed-tensors library: what transformers loads with
``AutoModelForCausalLM.from_pretrained`` and vLLM serves.

From a dense checkpoint whose quantized layers hold their dequantized weights
``w_hat = (q - z) s`` (rounded once to the checkpoint's dtype) and their scales (and
zero points) kept beside them: one config group per grid (bits, group size, symmetry),
each listing its layers by name; every layer's codes are recovered as
``q = round(w_hat / s) + z`` and checked to give back ``w_hat`` exactly, then the library
packs them (``weight_packed``: int32 words; ``weight_scale`` in the checkpoint's dtype,
or bfloat16 for a float32 checkpoint, since every scale is a bfloat16 value;
``weight_zero_point`` when asymmetric) and writes the ``quantization_config``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import PrunellaError


def codes(
    weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grid
) -> tuple[torch.Tensor, torch.Tensor]:
    """The integer codes of a dequantized ``weight`` (``[rows, cols]``, any float dtype)
    and ``(q - z) s`` unrounded (float64), checked: rounded to ``weight``'s dtype, it is
    ``weight`` exactly."""
    s = scale.double().repeat_interleave(grid.group, dim=1)
    z = zero.double().repeat_interleave(grid.group, dim=1)
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


@contextlib.contextmanager
def _no_library_bars() -> Iterator[None]:
    """compressed-tensors draws a bar while packing, and offers no switch: the run has its
    own progress, so that bar is left out."""
    from compressed_tensors.compressors.model_compressors import model_compressor

    bar = model_compressor.tqdm
    model_compressor.tqdm = lambda items, **_: items
    try:
        yield
    finally:
        model_compressor.tqdm = bar


def write_compressed_tensors(
    dense: Path, folder: Path, grids: dict, tensors: dict[str, torch.Tensor]
) -> None:
    """Write ``dense`` (a checkpoint whose layers in ``grids`` are quantized, their scales
    in ``tensors`` as ``LAYER.weight_scale``/``LAYER.weight_zero_point``) into ``folder``
    as a compressed-tensors ``pack-quantized`` checkpoint."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(dense, dtype="auto")
    check_quantizable(model, grids)
    by_grid: dict = {}
    for name, grid in grids.items():
        by_grid.setdefault(grid, []).append(name)
    config = QuantizationConfig(
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
    apply_quantization_config(model, config, show_progress=False)
    dtypes = {name: model.get_submodule(name).weight.dtype for name in grids}
    with torch.no_grad():
        for name, grid in grids.items():
            module = model.get_submodule(name)
            scale = tensors[f"{name}.weight_scale"]
            zero = tensors.get(f"{name}.weight_zero_point", torch.zeros_like(scale))
            _, exact = codes(module.weight, scale, zero, grid)
            module.weight_scale.copy_(scale.to(module.weight_scale.dtype))
            module.weight_zero_point.copy_(zero.to(module.weight_zero_point.dtype))
            # float32 weights: the library's round(w / s) + z gives back q exactly
            module.weight.data = exact.float()
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    with _no_library_bars():
        compressor.compress_model(model)
    for name in grids:  # scales are bfloat16 values (see scale_dtype)
        module = model.get_submodule(name)
        module.weight_scale.data = module.weight_scale.data.to(scale_dtype(dtypes[name]))
    model.save_pretrained(folder)
    compressor.update_config(folder)


def scale_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype scales are written in: the checkpoint's, but bfloat16 for float32 (every
    scale is a bfloat16 value, so bfloat16 holds it exactly and the loader's cast back to
    float32 gives the same number). float16 holds them exactly within its normal range
    (scales above 2^-14)."""
    return torch.bfloat16 if dtype == torch.float32 else dtype
