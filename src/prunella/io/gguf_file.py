"""GGUF files, the format llama.cpp runs: a checkpoint written with one GGML type per tensor.

It does what llama.cpp's own converter (``convert_hf_to_gguf.py``) does for the
architectures below, through the ``gguf`` package (llama.cpp's Python writer):

* tensor names from ``gguf.get_tensor_name_map`` (``blk.N.attn_q.weight`` ...);
* for ``llama`` (and ``mistral``, which llama.cpp runs as ``llama``), the rows of
  ``q_proj`` and ``k_proj`` permuted per head from the Hugging Face rotary layout
  (halves) to llama.cpp's (interleaved pairs); every reader undoes it;
* the hyper-parameters (context length, widths, heads, RMS epsilon, rope base, head
  dimension) and the byte-level BPE tokenizer (tokens, types, merges, special ids,
  chat template) in the file, so that the file alone is the model;
* norms and biases in F32; the token embeddings and the output head in the asked type
  when it is F32 or F16, else in Q8_0; each decoder block's linear weight in the asked type
  (``F32``, ``F16``, ``Q8_0``, ``Q5_1``, ``Q5_0``, ``Q4_1``, ``Q4_0``, which
  ``gguf.quants`` quantizes), or F16 when its row length is not a multiple of the
  type's block of 32 weights (the summary counts those).

The tensors are streamed from the safetensors files to the GGUF file one by one, so the
memory it takes is one tensor's, not the model's. Where it differs from llama.cpp's
converter: no rope-scaling tables (a checkpoint with ``rope_scaling`` is refused, in one
line) and no pre-tokenizer hash; the pre-tokenizer is named from the tokenizer's own
description (``gpt-2``, or ``smollm`` for digits split one by one before GPT-2's
byte-level split) and ``default`` otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..errors import PrunellaError
from .checkpoint import read_config
from .quantized import codes

ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
GGUF_FILE = "model.gguf"  # the name in an output folder
PERMUTED = ("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")  # llama only
TYPES = ("f32", "f16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0")


def _ggml(kind: str):
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[kind.upper()]


def _config(src: Path) -> dict:
    config = read_config(src)
    model_type = config["model_type"]
    if model_type not in ARCHITECTURES:
        raise PrunellaError(
            f"GGUF output is written for {', '.join(ARCHITECTURES)} models; {src} is {model_type!r}"
        )
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise PrunellaError(
            f"GGUF output does not write rope scaling yet ({rope.get('rope_type')!r} in "
            f"{src / 'config.json'}): write compressed-tensors or dense instead"
        )
    return config


def _check_tokenizer(src: Path) -> None:
    try:
        backend = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        backend = {}
    if backend.get("model", {}).get("type") != "BPE" or "ByteLevel" not in json.dumps(
        backend.get("pre_tokenizer")
    ):
        raise PrunellaError(
            f"GGUF output writes byte-level BPE tokenizers (GPT-2's kind, in tokenizer.json); "
            f"{src} has none"
        )


def check_gguf_source(src: Path) -> None:
    """One line, before any work, if the checkpoint in ``src`` cannot be written as GGUF
    (its architecture, its rope scaling, its tokenizer)."""
    _config(src)
    _check_tokenizer(src)


def _permute(weight, heads: int):
    """Hugging Face's rotary halves -> llama.cpp's interleaved pairs, head by head:
    row ``h·d + i`` (first half) goes to ``h·d + 2i``, row ``h·d + d/2 + i`` to
    ``h·d + 2i + 1`` (``d`` the head dimension)."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _pre_tokenizer(src: Path) -> str:
    """llama.cpp's name for the split before BPE, read from ``tokenizer.json``."""
    try:
        pre = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))["pre_tokenizer"]
    except (OSError, KeyError, json.JSONDecodeError):
        return "default"
    parts = pre.get("pretokenizers", [pre]) if pre else []
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"  # llama.cpp's name (llama-vocab.cpp); it refuses "gpt2" in one line
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    return "default"


def _tokenizer(writer, src: Path, vocab_size: int) -> None:
    """Tokens (padded to the model's vocabulary), their types, merges and special ids."""
    from gguf import SpecialVocab, TokenType
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src)
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(src))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    SpecialVocab(src, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)


def _hyper_parameters(writer, config: dict) -> None:
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    rope = config.get("rope_parameters") or {}
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(config["vocab_size"])


def _tensors(src: Path):
    """``(name, file, shape)`` of each tensor of the checkpoint's safetensors files."""
    from safetensors import safe_open

    for file in sorted(src.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            names = f.keys()  # a safe_open handle is not iterable
            for name in names:
                yield name, file, tuple(f.get_slice(name).get_shape())


def _read(file: Path, name: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(file, framework="pt") as f:
        return f.get_tensor(name)


def write_gguf(
    src: Path,
    dst: Path,
    weight_type: str = "f16",
    grids: dict | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> dict:
    """Write the Hugging Face checkpoint in ``src`` as one GGUF file ``dst``; its block
    weights in ``weight_type`` (one of :data:`TYPES`), except the layers quantized on a
    GGML grid (``grids``: layer -> :class:`~prunella.methods.bits.grid.Grid`, their
    scales in ``tensors`` as ``LAYER.weight_scale``), which are written as their codes
    and scales, unchanged. Returns a summary: the type of each tensor and how many block
    weights fell back to F16."""
    import gguf

    if weight_type not in TYPES:
        raise PrunellaError(
            f"GGUF weight type must be one of {', '.join(TYPES)}, got {weight_type!r}"
        )
    config = _config(src)
    _check_tokenizer(src)
    arch = ARCHITECTURES[config["model_type"]]
    blocks = config["num_hidden_layers"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], blocks)
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    tied = config.get("tie_word_embeddings", False)
    edge = weight_type if weight_type in ("f32", "f16") else "q8_0"  # embeddings, head

    grids = {layer: grid for layer, grid in (grids or {}).items() if grid.ggml}
    plan = []  # (GGUF name, name, file, type, shape, GGML grid or None)
    fallback = 0
    for name, file, shape in _tensors(src):
        if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
            continue
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise PrunellaError(f"GGUF output has no name for the tensor {name!r} of {src}")
        grid = grids.get(name.removesuffix(".weight"))
        if grid is not None:
            kind = grid.ggml
        elif len(shape) == 1:
            kind = "f32"
        elif new.startswith(("token_embd", "output.")):
            kind = edge
        else:
            kind = weight_type
        if kind not in ("f32", "f16") and shape[-1] % gguf.GGML_QUANT_SIZES[_ggml(kind)][0]:
            kind, fallback = "f16", fallback + 1
        plan.append((new, name, file, kind, shape, grid))

    writer = gguf.GGUFWriter(dst, arch)
    writer.add_name(config.get("_name_or_path") or src.name)
    block_types = [kind for new, _n, _f, kind, _s, _g in plan if new.startswith("blk.")]
    writer.add_file_type(_file_type(max(set(block_types), key=block_types.count)))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _hyper_parameters(writer, config)
    _tokenizer(writer, src, config["vocab_size"])
    for new, _name, _file, kind, shape, _grid in plan:
        block, size = gguf.GGML_QUANT_SIZES[_ggml(kind)]
        nbytes = int(np.prod(shape)) // block * size
        writer.add_tensor_info(new, list(shape), np.float32, nbytes, raw_dtype=_ggml(kind))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _new, name, file, kind, _shape, grid in plan:
        data = _read(file, name)
        if grid is not None:  # its codes and scales (and minimums), as quantized
            layer = name.removesuffix(".weight")
            scale = tensors[f"{layer}.weight_scale"]
            zero = tensors.get(f"{layer}.weight_zero_point", torch.zeros_like(scale))
            data = codes(data, scale, zero, grid)[0]
        else:
            scale = zero = None
            data = data.float()
        if arch == "llama" and name.endswith(PERMUTED):
            n = heads if ".q_proj." in name else kv_heads
            data = _permute(data, n)
            if scale is not None:  # a row's scales and minimums go with it
                scale, zero = _permute(scale, n), _permute(zero, n)
        if scale is not None:
            writer.write_tensor_data(_pack_ggml(data, scale, kind, zero))
        else:
            writer.write_tensor_data(_encode(data.numpy(), kind))
    writer.close()
    return {
        "file": dst.name,
        "weight_type": weight_type,
        "types": {new: kind for new, _n, _f, kind, _s, _g in plan},
        "f16_fallbacks": fallback,
    }


def _pack_ggml(
    q: torch.Tensor, scale: torch.Tensor, kind: str, minimum: torch.Tensor | None = None
) -> np.ndarray:
    """Codes ``q`` (``[rows, cols]``) and their float16 scales (``[rows, cols / 32]``; and
    minimums for ``q4_1``/``q5_1``) in GGML's block layout: per block of 32, the scale
    ``d`` (2 bytes), the minimum ``m`` (2 bytes, ``_1`` types), then the codes: ``q8_0``
    one int8 each; ``q4_0`` ``q + 8`` (``q4_1``: ``q``) in nibbles, byte ``j`` holding
    code ``j`` low and code ``j + 16`` high; ``q5_0`` ``q + 16`` (``q5_1``: ``q``), its
    fifth bits first (bit ``j`` of a little-endian 32-bit word for code ``j``), then its
    low nibbles as ``q4_0``'s."""
    rows, cols = q.shape
    blocks = cols // 32

    def halves(t: torch.Tensor) -> np.ndarray:  # float16 bytes, [rows, blocks, 2]
        return t.to(torch.float16).contiguous().numpy().view(np.uint8).reshape(rows, blocks, 2)

    head = [halves(scale)] + ([halves(minimum)] if kind in ("q4_1", "q5_1") else [])
    q = q.to(torch.int16).numpy().reshape(rows, blocks, 32)
    if kind == "q8_0":
        body = q.astype(np.int8).view(np.uint8)
    elif kind in ("q4_0", "q4_1"):
        u = (q + (8 if kind == "q4_0" else 0)).astype(np.uint8)
        body = u[..., :16] | (u[..., 16:] << 4)
    else:  # q5_0, q5_1
        u = (q + (16 if kind == "q5_0" else 0)).astype(np.uint8)
        high = ((u >> 4) & 1).astype(np.uint32) << np.arange(32, dtype=np.uint32)
        qh = high.sum(-1, dtype=np.uint32).astype("<u4").view(np.uint8).reshape(rows, blocks, 4)
        low = u & 0x0F
        body = np.concatenate([qh, low[..., :16] | (low[..., 16:] << 4)], axis=-1)
    return np.ascontiguousarray(np.concatenate([*head, body], axis=-1).reshape(rows, -1))


def _encode(data: np.ndarray, kind: str) -> np.ndarray:
    """``data`` in the bytes of GGML type ``kind``."""
    from gguf import quants

    if kind == "f32":
        return np.ascontiguousarray(data, dtype=np.float32)
    if kind == "f16":
        return np.ascontiguousarray(data, dtype=np.float16)
    return quants.quantize(np.ascontiguousarray(data, dtype=np.float32), _ggml(kind))


def _file_type(weight_type: str) -> int:
    from gguf import LlamaFileType

    return {
        "f32": LlamaFileType.ALL_F32,
        "f16": LlamaFileType.MOSTLY_F16,
        "q8_0": LlamaFileType.MOSTLY_Q8_0,
        "q5_1": LlamaFileType.MOSTLY_Q5_1,
        "q5_0": LlamaFileType.MOSTLY_Q5_0,
        "q4_1": LlamaFileType.MOSTLY_Q4_1,
        "q4_0": LlamaFileType.MOSTLY_Q4_0,
    }[weight_type]


def find_gguf(model: str | Path) -> Path | None:
    """The GGUF file ``model`` names: a ``.gguf`` file, or a folder that holds
    ``model.gguf`` and no ``config.json`` (Prunella's gguf output); else ``None``."""
    path = Path(model)
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and (path / GGUF_FILE).is_file() and not (path / "config.json").exists():
        return path / GGUF_FILE
    return None


def gguf_layers(file: Path) -> list[dict]:
    """Each decoder block's 2-D weight in ``file``: its GGUF name, shape ``[rows, cols]``,
    fraction of zeros after de-quantization and GGML type (as its pattern)."""
    from gguf import GGUFReader, dequantize

    layers = []
    for tensor in GGUFReader(file).tensors:
        if not tensor.name.startswith("blk.") or len(tensor.shape) != 2:
            continue
        values = dequantize(tensor.data, tensor.tensor_type)
        layers.append(
            {
                "name": tensor.name.removesuffix(".weight"),
                "shape": [int(tensor.shape[1]), int(tensor.shape[0])],
                "sparsity": float((values == 0).mean()),
                "pattern": f"GGUF {tensor.tensor_type.name}",
            }
        )
    return layers
