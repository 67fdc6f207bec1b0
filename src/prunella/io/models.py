"""Loading a whole model into memory: ``(model, tokenizer)`` from a checkpoint folder.

Packed checkpoints (Prunella's, or legacy compressed-tensors ``sparse-bitmask`` and
``sparse-24-bitmask``) are inflated on the way. Weights are read from safetensors
only, and ``trust_remote_code`` is off unless asked for.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ..engine.adapters import adapter_for
from ..errors import PrunellaError, first_line
from .checkpoint import assert_finite, check_checkpoint, sparsity_format
from .gguf_file import find_gguf
from .pack import unpack

# the files one of transformers' tokenizers is read from
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as exc:
        if not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
            raise PrunellaError(
                f"{path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): copy in the "
                "tokenizer files of the model it came from"
            ) from None
        raise PrunellaError(f"could not load the tokenizer in {path}: {first_line(exc)}") from None


def load(model: str | Path, dtype: str | torch.dtype = "auto", trust_remote_code: bool = False):
    """Load ``(model, tokenizer, path, adapter)`` from a checkpoint folder, a bundled
    name or a GGUF file (:func:`~prunella.io.gguf_file.find_gguf`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf(model)
    if gguf is not None:  # what transformers' GGUF reader de-quantizes
        try:
            hf_model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=dtype
            )
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        except Exception as exc:
            raise PrunellaError(f"could not load the GGUF file {gguf}: {first_line(exc)}") from None
        hf_model.eval()
        assert_finite(hf_model)
        return hf_model, tokenizer, gguf, adapter_for(hf_model)
    path, adapter = check_checkpoint(model)
    with tempfile.TemporaryDirectory(prefix="prunella-unpacked-") as tmp:
        weights = path
        if sparsity_format(path):  # a packed checkpoint: inflate it first
            weights = unpack(path, Path(tmp) / "dense", progress=False)
        try:
            hf_model = AutoModelForCausalLM.from_pretrained(
                weights, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
            )
        except Exception as exc:
            raise PrunellaError(
                f"could not load the weights in {path}: {first_line(exc)}"
            ) from None
    tokenizer = load_tokenizer(path, trust_remote_code)
    hf_model.eval()
    assert_finite(hf_model)
    return hf_model, tokenizer, path, adapter
