"""Reading and writing safetensors files, one tensor at a time where it matters.

* :class:`CheckpointReader` -- a checkpoint's tensors by key (one file or indexed
  shards), each read only while it is needed;
* :func:`save_tensors` -- a whole file at once, atomically;
* :class:`ShardWriter` -- a file written one tensor at a time (the header is
  assembled at the end), so that copying a checkpoint holds one tensor in memory;
* :func:`write_index` -- ``model.safetensors.index.json`` for a sharded folder;
* :func:`read_header` -- what a file holds (names, dtypes, shapes), without its data.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from ..errors import PrunellaError
from . import faults
from .folders import publish_file

INDEX = "model.safetensors.index.json"
DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


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


def read_header(file: Path) -> dict[str, dict]:
    """Tensor name -> ``{"dtype", "shape", "data_offsets"}`` of a safetensors file, from its
    header alone (the data is not read)."""
    with Path(file).open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    header.pop("__metadata__", None)
    return header


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write a safetensors file atomically (temporary name, then rename), tensor by tensor
    from the tensors' own memory: no serialised copy of the whole file is built."""
    header, offset = {}, 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps({"__metadata__": {"format": "pt"}, **header}, separators=(",", ":"))
    blob = blob.encode() + b" " * (-len(blob) % 8)
    _write_file(path, blob, (raw_bytes(tensor).data for tensor in tensors.values()))


def _write_file(path: Path, header: bytes, chunks) -> None:
    """Write a safetensors file, its length-prefixed ``header`` then the data ``chunks``,
    under a temporary name, flushed and renamed into place; on an error (a full disk) the
    half file is removed."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("wb") as out:
            faults.write(out, struct.pack("<Q", len(header)), path.name)
            faults.write(out, header, path.name)
            for chunk in chunks:
                faults.write(out, chunk, path.name)
        publish_file(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def raw_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The bytes of ``tensor`` as a uint8 array (any dtype, bfloat16 included)."""
    return tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()


class ShardWriter:
    """Write a safetensors file one tensor at a time (header assembled at the end)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data_path = path.with_name(path.name + ".data")
        self.data = self.data_path.open("wb")
        self.header: dict = {}
        self.metadata: dict[str, str] = {"format": "pt"}
        self.offset = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        raw = raw_bytes(tensor)
        self.data.write(raw.data)
        self.header[name] = {
            "dtype": DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [self.offset, self.offset + raw.size],
        }
        self.offset += raw.size

    def close(self) -> int:
        """Write the file (header, then the data) under its name; return the data bytes."""
        self.data.close()
        blob = json.dumps(
            {"__metadata__": self.metadata, **self.header}, separators=(",", ":")
        ).encode()
        blob += b" " * (-len(blob) % 8)
        with self.data_path.open("rb") as data:
            _write_file(self.path, blob, iter(lambda: data.read(16 * 2**20), b""))
        self.data_path.unlink()
        return self.offset


class SizedShards:
    """Tensors written one at a time into shards of at most ``limit`` bytes of data (50 GB,
    transformers 5.25's default ``max_shard_size``), named as ``save_pretrained`` names them
    once their count is known (``model.safetensors`` for one), with the index. Used as a
    context manager: on an error the partial files are closed and removed."""

    def __init__(self, folder: Path, limit: int = 50 * 10**9) -> None:
        self.folder, self.limit = folder, limit
        self.writers: list[ShardWriter] = []
        self.shard_of: dict[str, int] = {}
        self.size = 0

    def __enter__(self) -> SizedShards:
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is not None:
            self._discard()
            return
        try:
            self.close()
        except BaseException:
            self._discard()
            raise

    def _discard(self) -> None:
        for writer in self.writers:
            writer.data.close()
            writer.data_path.unlink(missing_ok=True)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if not self.writers or (self.size and self.size + nbytes > self.limit):
            self.writers.append(ShardWriter(self.folder / f"shard-{len(self.writers)}.partial"))
            self.size = 0
        self.writers[-1].add(name, tensor)
        self.shard_of[name] = len(self.writers) - 1
        self.size += nbytes

    def close(self) -> None:
        total = sum(writer.close() for writer in self.writers)
        count = len(self.writers)
        names = (
            ["model.safetensors"]
            if count == 1
            else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        for writer, name in zip(self.writers, names, strict=True):
            writer.path.rename(self.folder / name)
        write_index(self.folder, {k: names[i] for k, i in self.shard_of.items()}, total)


def write_index(folder: Path, weight_map: dict[str, str], total: int) -> None:
    """``model.safetensors.index.json`` for a folder of several shards (none for one)."""
    if len(set(weight_map.values())) > 1:
        (folder / INDEX).write_text(
            json.dumps(
                {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                indent=2,
            )
            + "\n",
            encoding="utf-8",
        )


def model_nbytes(model: torch.nn.Module, loaded_only: bool = True) -> int:
    """Bytes of the model's tensors as saved (tied tensors once): those in memory, or
    without ``loaded_only`` every one (on the meta device too: a streamed model's)."""
    seen, total = set(), 0
    for tensor in model.state_dict(keep_vars=True).values():
        if id(tensor) not in seen and not (loaded_only and tensor.is_meta):
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total
