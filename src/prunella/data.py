"""Calibration and evaluation tokens.

A *source* is a local text file, a named dataset, or one of the texts shipped
with Prunella:

* ``sample`` (the default for calibration) -- chapters I-VIII of Lewis Carroll's
  *Alice's Adventures in Wonderland* (public domain), ~25k tokens;
* ``sample-eval`` (the default for evaluation) -- chapters IX-XII, held out;
* ``wikitext2`` and ``c4`` -- the papers' datasets, through the optional
  ``datasets`` library, when it can reach the Hugging Face hub or has them cached.

Calibration windows are ``nsamples`` random windows of ``seqlen`` tokens, with
start offsets drawn from a generator seeded with ``seed`` (SparseGPT's protocol).
Evaluation windows are the consecutive non-overlapping windows of the text.
"""

from __future__ import annotations

import random
from importlib import resources
from pathlib import Path

import torch

from .errors import PrunellaError

SHIPPED = {"sample": "alice_calib.txt", "sample-eval": "alice_eval.txt"}
DATASETS = ("wikitext2", "c4")


def shipped_path(name: str) -> Path:
    return Path(str(resources.files("prunella") / "data" / SHIPPED[name]))


def describe(source: str | Path) -> str:
    """A stable, human-readable name for a source, for reports."""
    source = str(source)
    if source in SHIPPED:
        return f"{source} (shipped: {SHIPPED[source]})"
    if source in DATASETS:
        return source
    return str(Path(source).resolve())


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # silence "longer than model_max_length"
    try:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    finally:
        hf_logging.set_verbosity(verbosity)
    return torch.tensor(ids, dtype=torch.long)


def _load_dataset(name: str, *args, **kwargs):
    """``datasets.load_dataset(*args, **kwargs)`` with one-line errors naming ``name``."""
    try:
        import datasets
    except ImportError:
        raise PrunellaError(
            f"the named dataset {name!r} needs the 'datasets' package: "
            "pip install 'prunella[datasets]', or pass a local text file"
        ) from None
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as exc:  # offline, not cached, renamed on the hub ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PrunellaError(
            f"could not load dataset {name!r} (no network and not cached?): {first}; "
            "pass a local text file instead"
        ) from None


def check_source(source: str | Path) -> None:
    """Fail early, with one line, on a source that is neither a file nor a known name."""
    if str(source) in SHIPPED or str(source) in DATASETS:
        return
    path = Path(source)
    if not path.is_file():
        known = ", ".join([*SHIPPED, *DATASETS])
        raise PrunellaError(
            f"text source {str(source)!r} is neither a file nor a known name ({known})"
        )


def read_text(source: str | Path, split: str) -> str:
    """The text of a shipped sample, a local file, or ``wikitext2`` (split ``train``/``test``)."""
    source = str(source)
    if source in SHIPPED:
        return shipped_path(source).read_text(encoding="utf-8")
    if source == "wikitext2":
        data = _load_dataset("wikitext2", "wikitext", "wikitext-2-raw-v1", split=split)
        return ("\n\n" if split == "test" else " ").join(data["text"])
    if source == "c4":
        raise ValueError("c4 is read document by document, not as one text")
    check_source(source)
    path = Path(source)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PrunellaError(f"{source} is not UTF-8 text") from None


def _c4_documents(split: str):
    files = {
        "train": "en/c4-train.00000-of-01024.json.gz",
        "validation": "en/c4-validation.00000-of-00008.json.gz",
    }
    return _load_dataset("c4", "allenai/c4", data_files={split: files[split]}, split=split)


def calibration_windows(
    tokenizer, source: str | Path, nsamples: int, seqlen: int, seed: int
) -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens, ``LongTensor[nsamples, seqlen]``."""
    if nsamples < 1:
        raise PrunellaError(f"nsamples must be at least 1, got {nsamples}")
    if seqlen < 2:
        raise PrunellaError(f"seqlen must be at least 2, got {seqlen}")
    if str(source) == "c4":
        docs, rng, windows = _c4_documents("train"), random.Random(seed), []
        while len(windows) < nsamples:
            ids = _tokenize(tokenizer, docs[rng.randint(0, len(docs) - 1)]["text"])
            if len(ids) > seqlen:
                start = rng.randint(0, len(ids) - seqlen - 1)
                windows.append(ids[start : start + seqlen])
        return torch.stack(windows)
    tokens = _tokenize(tokenizer, read_text(source, "train"))
    if len(tokens) < seqlen:
        raise PrunellaError(
            f"calibration text {describe(source)} has {len(tokens)} tokens, "
            f"fewer than one window of seqlen={seqlen}"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - seqlen + 1, (nsamples,), generator=generator)
    return torch.stack([tokens[s : s + seqlen] for s in starts.tolist()])


def evaluation_windows(
    tokenizer, source: str | Path, seqlen: int, max_windows: int | None = None
) -> torch.Tensor:
    """Consecutive non-overlapping windows of ``seqlen`` tokens (the tail is dropped)."""
    if seqlen < 2:
        raise PrunellaError(f"seqlen must be at least 2, got {seqlen}")
    if str(source) == "c4":
        docs = _c4_documents("validation")
        text = " ".join(docs[:1100]["text"])  # SparseGPT's C4 evaluation text
    else:
        text = read_text(source, "test")
    tokens = _tokenize(tokenizer, text)
    count = len(tokens) // seqlen
    if max_windows is not None:
        count = min(count, max_windows)
    if count < 1:
        raise PrunellaError(
            f"evaluation text {describe(source)} has {len(tokens)} tokens, "
            f"fewer than one window of seqlen={seqlen}"
        )
    return tokens[: count * seqlen].view(count, seqlen)


def calibration(
    tokenizer, source, nsamples: int, seqlen: int, seed: int, max_positions: int | None = None
) -> tuple[torch.Tensor, str]:
    """Calibration windows and a description of their source.

    ``source`` is a text source (see :func:`calibration_windows`) or ready token
    windows, ``LongTensor[nsamples, seqlen]``. Windows longer than the model's
    context (``max_positions``) are refused.
    """
    if isinstance(source, torch.Tensor):
        if source.dim() != 2:
            raise PrunellaError("calibration windows must be a 2-D LongTensor [nsamples, seqlen]")
        return source.long(), "token windows given by the caller"
    check_text_input(tokenizer, seqlen, max_positions)
    return calibration_windows(tokenizer, source, nsamples, seqlen, seed), describe(source)


def check_text_input(tokenizer, seqlen: int, max_positions: int | None) -> None:
    """Reading text needs a tokenizer and windows no longer than the model's context."""
    if tokenizer is None:
        raise PrunellaError("a tokenizer is needed to read text: pass tokenizer=")
    if max_positions and seqlen > max_positions:
        raise PrunellaError(
            f"seqlen {seqlen} exceeds the model's context of {max_positions} tokens"
        )
