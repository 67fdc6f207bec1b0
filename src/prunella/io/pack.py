"""Packed sparse checkpoints: the ``sparse-bitmask`` layout of compressed-tensors.

For every pruned weight ``W`` (``[rows, cols]``) the checkpoint stores, under the
layer's name without ``.weight``:

* ``.compressed``  -- the non-zero values, row by row (1-D, the weight's dtype);
* ``.bitmask``     -- the non-zero positions, ``uint8 [rows, ceil(cols / 8)]``, bits
  packed little-endian along each row (``numpy.packbits(..., bitorder="little")``);
* ``.shape``       -- ``[rows, cols]`` (int64);
* ``.row_offsets`` -- where each row starts in ``.compressed`` (int64 ``[rows]``);

and ``config.json`` gets the ``quantization_config`` that llm-compressor wrote up
to compressed-tensors 0.14 (``quant_method: compressed-tensors`` and a
``sparsity_config`` of format ``sparse-bitmask``). Compressed-tensors 0.15 and
later no longer read this layout, so Prunella reads it itself: :func:`unpack`
inflates Prunella's packed checkpoints and legacy ``sparse-bitmask`` and
``sparse-24-bitmask`` ones back to a plain checkpoint. Prunella also records a
CRC-32 of each packed weight in the shard metadata, so a corrupted byte is an
error rather than a silently wrong weight.

Everything streams: one tensor is in memory at a time, and shards are written
through a temporary data file, then assembled with their header and renamed.
"""

from __future__ import annotations

import json
import math
import shutil
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from ..errors import PrunellaError
from ..version import __version__
from .checkpoint import prunable_keys, sparsity_format
from .folders import atomic_folder, check_disk_space, check_out_dir
from .safetensors_io import ShardWriter, raw_bytes, write_index

PARTS = ("compressed", "bitmask", "shape", "row_offsets")
CRC_KEY = "prunella.crc32."


def bitmask_compress(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The four ``sparse-bitmask`` tensors of one 2-D weight."""
    mask = weight != 0
    counts = mask.sum(dim=1)
    return {
        "compressed": weight[mask],
        "bitmask": torch.from_numpy(np.packbits(mask.numpy(), axis=-1, bitorder="little")),
        "shape": torch.tensor(list(weight.shape), dtype=torch.int64),
        "row_offsets": torch.cumsum(counts, 0) - counts,
    }


def bitmask_decompress(parts: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The dense weight from ``sparse-bitmask`` (or ``sparse-24-bitmask``) tensors, checked."""
    shape = [int(v) for v in parts["shape"].flatten().tolist()]
    if len(shape) != 2 or min(shape) < 1:
        raise PrunellaError(f"packed weight {name}: bad shape {shape}")
    rows, cols = shape
    bitmask = parts["bitmask"]
    if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (rows, math.ceil(cols / 8)):
        raise PrunellaError(
            f"packed weight {name}: bitmask of shape {tuple(bitmask.shape)} "
            f"does not fit a {rows}x{cols} weight"
        )
    mask = torch.from_numpy(
        np.unpackbits(bitmask.numpy(), axis=-1, count=cols, bitorder="little").astype(bool)
    )
    values = parts["compressed"].flatten()
    if int(mask.sum()) != values.numel():
        raise PrunellaError(
            f"packed weight {name}: the bitmask marks {int(mask.sum())} "
            f"non-zeros but {values.numel()} values are stored (corrupt file)"
        )
    if "row_offsets" in parts:
        counts = mask.sum(dim=1)
        if not torch.equal(parts["row_offsets"].flatten().long(), torch.cumsum(counts, 0) - counts):
            raise PrunellaError(f"packed weight {name}: row offsets disagree with the bitmask")
    dense = torch.zeros(rows, cols, dtype=values.dtype)
    dense[mask] = values
    return dense


def _crc(parts: dict[str, torch.Tensor]) -> str:
    crc = 0
    for part in PARTS:
        crc = zlib.crc32(raw_bytes(parts[part]).data, crc)
    return f"{crc:08x}"


def _shards(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise PrunellaError(f"{folder} has no .safetensors files")
    return files


def _open(file: Path):
    try:
        return safe_open(file, framework="pt")
    except Exception as exc:
        raise PrunellaError(f"corrupt safetensors file {file}: {exc}") from None


def _copy_other_files(src: Path, dst: Path) -> None:
    for item in src.iterdir():
        if item.suffix == ".safetensors" or item.name == "model.safetensors.index.json":
            continue
        if item.is_file():
            shutil.copy2(item, dst / item.name)


def pack(src: str | Path, out: str | Path, overwrite: bool = False, progress: bool = True) -> dict:
    """Write a packed (``sparse-bitmask``) copy of the dense checkpoint ``src`` to ``out``."""
    from tqdm.auto import tqdm

    src = Path(src)
    if sparsity_format(src):
        raise PrunellaError(f"{src} is already packed ({sparsity_format(src)})")
    targets = prunable_keys(src)
    out = check_out_dir(out, src, overwrite)
    check_disk_space(out.resolve().parent, sum(f.stat().st_size for f in _shards(src)))
    zeros = total = 0
    structure = "2:4"
    with atomic_folder(out) as tmp:
        weight_map, size = {}, 0
        for file in tqdm(_shards(src), desc="packing", unit="shard", disable=not progress):
            writer = ShardWriter(tmp / file.name)
            with _open(file) as handle:
                for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                    tensor = handle.get_tensor(key)
                    if key in targets and tensor.dim() == 2:
                        prefix = key.removesuffix(".weight")
                        parts = bitmask_compress(tensor)
                        for part in PARTS:
                            writer.add(f"{prefix}.{part}", parts[part])
                            weight_map[f"{prefix}.{part}"] = file.name
                        writer.metadata[CRC_KEY + prefix] = _crc(parts)
                        zeros += tensor.numel() - parts["compressed"].numel()
                        total += tensor.numel()
                        if structure == "2:4" and not _is_nm(tensor, 2, 4):
                            structure = "unstructured"
                    else:
                        writer.add(key, tensor)
                        weight_map[key] = file.name
            size += writer.close()
        write_index(tmp, weight_map, size)
        _copy_other_files(src, tmp)
        config = json.loads((src / "config.json").read_text(encoding="utf-8"))
        global_sparsity = zeros / total if total else 0.0
        config["quantization_config"] = {
            "quant_method": "compressed-tensors",
            "format": "sparse-bitmask",
            "version": f"prunella-{__version__}",
            "sparsity_config": {
                "format": "sparse-bitmask",
                "targets": ["Linear"],
                "ignore": ["lm_head"],
                "global_sparsity": global_sparsity,
                "sparsity_structure": structure,
            },
            "transform_config": {},
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return {
        "packed_weights": total,
        "global_sparsity": zeros / total if total else 0.0,
        "bytes": _size(out),
        "dense_bytes": _size(src),
    }


def _is_nm(weight: torch.Tensor, n: int, m: int) -> bool:
    if weight.shape[1] % m:
        return False
    zeros = (weight == 0).reshape(weight.shape[0], -1, m).sum(-1)
    return bool((zeros >= m - n).all())


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors"))


def packed_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor, str, bool]]:
    """``(name, dense tensor, shard file name, was packed)`` of a packed checkpoint, one at
    a time."""
    for file in _shards(folder):
        with _open(file) as handle:
            metadata = handle.metadata() or {}
            keys = list(handle.keys())
            groups: dict[str, set[str]] = {}
            for key in keys:
                prefix, _, part = key.rpartition(".")
                if part in PARTS:
                    groups.setdefault(prefix, set()).add(part)
            for key in keys:
                prefix, _, part = key.rpartition(".")
                if prefix in groups:
                    if part != "compressed":
                        continue
                    missing = {"compressed", "bitmask", "shape"} - groups[prefix]
                    if missing:
                        raise PrunellaError(
                            f"packed weight {prefix} in {file.name} lacks {sorted(missing)}"
                        )
                    parts = {p: handle.get_tensor(f"{prefix}.{p}") for p in groups[prefix]}
                    crc = metadata.get(CRC_KEY + prefix)
                    if crc is not None and (set(PARTS) - set(parts) or _crc(parts) != crc):
                        raise PrunellaError(
                            f"packed weight {prefix} in {file.name} fails its "
                            "checksum: the file is corrupt"
                        )
                    yield f"{prefix}.weight", bitmask_decompress(parts, prefix), file.name, True
                else:
                    yield key, handle.get_tensor(key), file.name, False


def unpack(
    src: str | Path, out: str | Path, overwrite: bool = False, progress: bool = True
) -> Path:
    """Inflate a packed checkpoint (Prunella's, or legacy compressed-tensors) to a plain one."""
    from tqdm.auto import tqdm

    src = Path(src)
    if not src.is_dir():
        raise PrunellaError(f"packed checkpoint {src} not found")
    fmt = sparsity_format(src)
    if fmt not in ("sparse-bitmask", "sparse-24-bitmask"):
        raise PrunellaError(f"{src} is not a packed checkpoint (sparsity format: {fmt})")
    out = check_out_dir(out, src, overwrite)
    with atomic_folder(out) as tmp:
        writers: dict[str, ShardWriter] = {}
        weight_map = {}
        for name, tensor, shard, _ in tqdm(
            packed_tensors(src), desc="unpacking", unit="tensor", disable=not progress
        ):
            if shard not in writers:
                writers[shard] = ShardWriter(tmp / shard)
            writers[shard].add(name, tensor)
            weight_map[name] = shard
        size = sum(writer.close() for writer in writers.values())
        write_index(tmp, weight_map, size)
        _copy_other_files(src, tmp)
        config = json.loads((src / "config.json").read_text(encoding="utf-8"))
        config.pop("quantization_config", None)
        config.pop("compression_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out
