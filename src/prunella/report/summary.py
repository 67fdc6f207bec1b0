"""What a checkpoint holds: per-layer sparsity and pattern (and bits), size on disk, format.

Works on any checkpoint (dense, Prunella-packed, legacy compressed-tensors
``sparse-bitmask`` / ``sparse-24-bitmask``, or compressed-tensors ``pack-quantized``),
compressed by Prunella or not: weights are read one tensor at a time from the
safetensors shards, never as a whole model. A quantized layer's sparsity is the share
of its codes that stand for zero (``q = z``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import PrunellaError
from ..io.checkpoint import check_checkpoint, layer_order, prunable_keys, sparsity_format
from ..io.gguf_file import find_gguf, gguf_layers
from ..io.pack import packed_tensors
from ..io.safetensors_io import CheckpointReader

NM_CANDIDATES = ((2, 4), (4, 8), (1, 4), (3, 4), (1, 8), (2, 8), (3, 8), (5, 8), (6, 8), (7, 8))


def detect_pattern(weight: torch.Tensor) -> str:
    """The N:M this weight was pruned to, else ``unstructured`` (or ``dense``).

    N:M means every group of M consecutive weights of a row holds at least M - N
    zeros, and not more than that on average (an unstructured matrix at 75% easily
    has one zero in every 8, which does not make it 7:8).
    """
    zeros = weight == 0
    if not zeros.any():
        return "dense"
    rows, cols = weight.shape
    sparsity = zeros.float().mean().item()
    for n, m in sorted(NM_CANDIDATES, key=lambda nm: (nm[1], nm[0])):
        if cols % m or not (m - n) / m <= sparsity < (m - n + 1) / m:
            continue
        if (zeros.reshape(rows, -1, m).sum(-1) >= m - n).all():
            return f"{n}:{m}"
    return "unstructured"


def quantized_layers(path: Path, quant: dict) -> list[dict]:
    """Per quantized layer of a ``pack-quantized`` checkpoint: shape, bits, group, and the
    share of codes that stand for zero."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    args = {}  # layer -> its group's weight arguments (targets listed by name)
    for scheme in (quant.get("config_groups") or {}).values():
        for target in scheme.get("targets", []):
            args[target] = scheme["weights"]
    reader = CheckpointReader(path)
    layers = []
    for key in reader.keys():  # noqa: SIM118  (a reader, not a dict)
        if not key.endswith(".weight_packed"):
            continue
        name = key.removesuffix(".weight_packed")  # as the checkpoint names it
        weights = group_of(name, args, quant)
        bits, group = weights["num_bits"], weights["group_size"]
        rows, cols = reader.tensor(f"{name}.weight_shape").tolist()
        codes = unpack_from_int32(reader.tensor(key), bits, torch.Size([rows, cols]))
        zero = torch.zeros(rows, cols // group, dtype=codes.dtype)
        if not weights.get("symmetric", True):
            packed = reader.tensor(f"{name}.weight_zero_point")
            zero = unpack_from_int32(packed, bits, torch.Size([rows, cols // group]), 0)
        zeros = (codes == zero.repeat_interleave(group, 1)).sum().item()
        layers.append({"name": name, "shape": [rows, cols], "sparsity": zeros / codes.numel(),
                       "pattern": f"int{bits} g{group}", "bits": bits, "group": group})  # fmt: skip
    order = {name: i for i, name in enumerate(layer_order(path))}
    return sorted(layers, key=lambda r: order.get(r["name"], len(order)))


def group_of(name: str, args: dict, quant: dict) -> dict:
    """The weight arguments of the packed layer ``name``: its config group's, found by
    the layer's name (or the module name it stands for, when the checkpoint's keys lack
    the model's prefix), else the one group there is (targets by class, as "Linear")."""
    if name in args:
        return args[name]
    target = next((t for t in args if t.endswith("." + name)), None)
    if target is not None:
        return args[target]
    groups = list((quant.get("config_groups") or {}).values())
    if len(groups) == 1:
        return groups[0]["weights"]
    raise PrunellaError(f"the packed layer {name} is in none of its quantization_config's groups")


def quantization_config(path: Path) -> dict | None:
    """The ``quantization_config`` of a compressed-tensors ``pack-quantized`` checkpoint."""
    import json

    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    quant = config.get("quantization_config") or {}
    return quant if quant.get("format") == "pack-quantized" else None


def checkpoint_summary(path: str | Path) -> dict:
    """Format, size on disk and, per prunable linear layer (in model order), shape,
    sparsity and pattern."""
    gguf = find_gguf(path)
    if gguf is not None:
        return _summary(gguf, "gguf", gguf.stat().st_size, gguf_layers(gguf))
    path, _ = check_checkpoint(path)
    quant = quantization_config(path)
    fmt = "compressed-tensors" if quant else sparsity_format(path) or "dense"
    if quant:
        tensors = ()
    elif fmt == "dense":  # prunable_keys come in model order
        reader = CheckpointReader(path)
        tensors = ((key, reader.tensor(key)) for key in prunable_keys(path))
    else:  # packed weights come in shard order
        tensors = ((n, t) for n, t, _, packed in packed_tensors(path) if packed)
    layers = []
    for name, tensor in tensors:
        if tensor.dim() not in (2, 3):
            continue
        # fused experts stored as one 3-D tensor (gpt-oss, Llama 4): all experts in one row
        pattern = detect_pattern(tensor) if tensor.dim() == 2 else "fused experts"
        layers.append(
            {
                "name": name.removesuffix(".weight"),
                "shape": list(tensor.flatten(0, -2).shape),
                "sparsity": (tensor == 0).sum().item() / tensor.numel(),
                "pattern": pattern,
            }
        )
    if quant:
        layers = quantized_layers(path, quant)
    elif fmt != "dense":
        order = {name: i for i, name in enumerate(layer_order(path))}
        layers.sort(key=lambda r: order.get(r["name"], len(order)))
    nbytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return _summary(path, fmt, nbytes, layers)


def _summary(path: Path, fmt: str, nbytes: int, layers: list[dict]) -> dict:
    total = sum(r["shape"][0] * r["shape"][1] for r in layers)
    zeros = sum(r["sparsity"] * r["shape"][0] * r["shape"][1] for r in layers)
    return {
        "model": str(path),
        "format": fmt,
        "bytes": nbytes,
        "sparsity": zeros / total if total else 0.0,
        "prunable_parameters": total,
        "layers": layers,
    }
