"""Calibration and evaluation tokens.

A *source* is a local corpus (a text file, a JSON Lines or Parquet file, or a
folder written by ``datasets.save_to_disk``: see :mod:`prunella.data.corpus`), a named
dataset, or one of the texts shipped with Prunella:

* ``sample`` (the default for calibration) -- chapters I-VIII of Lewis Carroll's
  *Alice's Adventures in Wonderland* (public domain), ~25k tokens;
* ``sample-eval`` (the default for evaluation) -- chapters IX-XII, held out;
* ``wikitext2`` and ``c4`` -- the papers' datasets, through the optional
  ``datasets`` library, when it can reach the Hugging Face hub or has them cached.

Calibration windows are ``nsamples`` random windows of ``seqlen`` tokens drawn with
a generator seeded with ``seed``. A text of at most ``WHOLE_TEXT_BYTES`` (the shipped
samples, wikitext2) is tokenized whole and the windows' start tokens are drawn
uniformly (SparseGPT's protocol); c4 follows SparseGPT's C4 protocol (a random
document longer than a window, a random window in it). Any larger corpus is never
read whole: the windows' positions are drawn first (byte offsets, or records) and
only the text from each position on is read and tokenized, so that drawing 128
windows costs the same from a 2 MB file as from a 2 GB one. Documents inside a
window are joined by the tokenizer's end-of-text token.

Evaluation windows are the consecutive non-overlapping windows from the start of
the text; of a large corpus, only as much is read as ``max_windows`` windows need.
"""

from __future__ import annotations

import random
from importlib import resources
from pathlib import Path

import torch

from ..errors import PrunellaError
from .corpus import open_corpus

# a text file of at most this many bytes is tokenized whole (as the shipped samples);
# tokenizing costs about 150 bytes of memory per byte of text
WHOLE_TEXT_BYTES = 1 << 20
EVAL_PIECE_BYTES = 1 << 20  # a large evaluation text is tokenized in pieces of this size
SHIPPED = {"sample": "alice_calib.txt", "sample-eval": "alice_eval.txt"}
DATASETS = ("wikitext2", "c4")
GIVEN_WINDOWS = "token windows given by the caller"


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


def _token_ids(tokenizer, text: str) -> list[int]:
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # silence "longer than model_max_length"
    try:
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    finally:
        hf_logging.set_verbosity(verbosity)


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(_token_ids(tokenizer, text), dtype=torch.long)


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


def check_source(source: str | Path, text_field: str = "text", split: str = "train") -> None:
    """Fail early, with one line, on a source that is neither a readable corpus nor a
    known name (a local corpus is opened and its first record checked, nothing more).
    ``split``: ``train`` for calibration, ``test`` for evaluation (a ``datasets`` folder)."""
    if str(source) in SHIPPED or str(source) in DATASETS:
        return
    if not str(source) or not Path(source).exists():  # (an empty name is not the folder .)
        known = ", ".join([*SHIPPED, *DATASETS])
        raise PrunellaError(
            f"text source {str(source)!r} is neither a file nor a known name ({known})"
        )
    open_corpus(source, text_field, split)


def read_text(source: str | Path, split: str) -> str:
    """The text of a shipped sample, a text file, or ``wikitext2`` (split ``train``/``test``)."""
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


def _whole_text(source: str | Path, text_field: str, split: str, tokenizer):
    """``(text, None, info)`` for a source read whole (shipped, wikitext2, a small text
    file), else ``(None, corpus, {})`` for a corpus read piece by piece."""
    if str(source) == "wikitext2":
        return read_text(source, split), None, {"format": "dataset"}
    path = shipped_path(str(source)) if str(source) in SHIPPED else source
    corpus = open_corpus(path, text_field, split, tokenizer)
    if corpus.format == "text" and corpus.size <= WHOLE_TEXT_BYTES:
        return corpus.text(), None, {"format": "text", "bytes": corpus.size}
    return None, corpus, {}


def _too_short(kind: str, source, tokens: int | None, seqlen: int) -> PrunellaError:
    has = f"has {tokens} tokens" if tokens is not None else "has too few tokens"
    return PrunellaError(
        f"{kind} text {describe(source)} {has}, fewer than one window of seqlen={seqlen}"
    )


def draw_calibration(
    tokenizer, source: str | Path, nsamples: int, seqlen: int, seed: int, text_field: str = "text"
) -> tuple[torch.Tensor, dict]:
    """``nsamples`` random windows of ``seqlen`` tokens, ``LongTensor[nsamples, seqlen]``,
    and what was read to draw them (format, bytes, documents and tokens read)."""
    if nsamples < 1:
        raise PrunellaError(f"nsamples must be at least 1, got {nsamples}")
    if seqlen < 2:
        raise PrunellaError(f"seqlen must be at least 2, got {seqlen}")
    info = {"source": describe(source), "text_field": text_field}
    if str(source) == "c4":
        docs, rng, windows, read = _c4_documents("train"), random.Random(seed), [], 0
        while len(windows) < nsamples:
            ids = _tokenize(tokenizer, docs[rng.randint(0, len(docs) - 1)]["text"])
            read += 1
            if len(ids) > seqlen:
                start = rng.randint(0, len(ids) - seqlen - 1)
                windows.append(ids[start : start + seqlen])
        info.update(format="dataset", sampling="documents (SparseGPT's C4 protocol)")
        return torch.stack(windows), {**info, "documents_read": read}
    generator = torch.Generator().manual_seed(seed)
    text, corpus, whole = _whole_text(source, text_field, "train", tokenizer)
    if corpus is None:
        tokens = _tokenize(tokenizer, text)
        if len(tokens) < seqlen:
            raise _too_short("calibration", source, len(tokens), seqlen)
        starts = torch.randint(0, len(tokens) - seqlen + 1, (nsamples,), generator=generator)
        info.update(
            whole,
            documents_read=1,
            tokens_read=len(tokens),
            sampling="start tokens in the whole text",
        )
        return torch.stack([tokens[s : s + seqlen] for s in starts.tolist()]), info
    positions = corpus.draw(generator, nsamples)
    windows: list[list[int]] = [[] for _ in positions]
    read = 0
    piece_bytes = max(4096, 6 * seqlen)  # about 1.5 windows of English
    for i in sorted(range(nsamples), key=positions.__getitem__):  # in file order
        for ids in _token_stream(corpus, positions[i], tokenizer, piece_bytes):
            read += len(ids)
            windows[i] += ids
            if len(windows[i]) >= seqlen:
                break
        else:
            raise _too_short("calibration", source, None, seqlen)
        del windows[i][seqlen:]
    sampling = "byte offsets" if corpus.format in ("text", "jsonl") else "records"
    info.update(corpus.info(), tokens_read=read, sampling=sampling)
    return torch.tensor(windows, dtype=torch.long), info


def _token_stream(corpus, position, tokenizer, piece_bytes: int, wrap: bool = True):
    """Token ids of ``corpus`` read from ``position``, piece by piece, documents joined
    by the tokenizer's end-of-text token."""
    eos, started = getattr(tokenizer, "eos_token_id", None), False
    for text, new_document in corpus.read(position, wrap=wrap, piece_bytes=piece_bytes):
        ids = _token_ids(tokenizer, text)
        if new_document and started and eos is not None:
            ids.insert(0, eos)
        started = True
        yield ids


def calibration_windows(
    tokenizer, source: str | Path, nsamples: int, seqlen: int, seed: int, text_field: str = "text"
) -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens, ``LongTensor[nsamples, seqlen]``."""
    return draw_calibration(tokenizer, source, nsamples, seqlen, seed, text_field)[0]


def evaluation_windows(
    tokenizer,
    source: str | Path,
    seqlen: int,
    max_windows: int | None = None,
    text_field: str = "text",
) -> torch.Tensor:
    """Consecutive non-overlapping windows of ``seqlen`` tokens (the tail is dropped)."""
    if seqlen < 2:
        raise PrunellaError(f"seqlen must be at least 2, got {seqlen}")
    if str(source) == "c4":
        docs = _c4_documents("validation")
        tokens = _tokenize(tokenizer, " ".join(docs[:1100]["text"]))  # SparseGPT's C4 text
    else:
        text, corpus, _ = _whole_text(source, text_field, "test", tokenizer)
        if corpus is None:
            tokens = _tokenize(tokenizer, text)
        else:
            limit = max_windows * seqlen if max_windows is not None else None
            piece_bytes = EVAL_PIECE_BYTES if limit is None else max(4096, 6 * limit)
            piece_bytes = min(piece_bytes, EVAL_PIECE_BYTES)
            parts, count = [], 0
            for ids in _token_stream(corpus, corpus.start, tokenizer, piece_bytes, wrap=False):
                parts.append(torch.tensor(ids, dtype=torch.long))
                count += len(ids)
                if limit is not None and count >= limit:
                    break
            tokens = torch.cat(parts)
    count = len(tokens) // seqlen
    if max_windows is not None:
        count = min(count, max_windows)
    if count < 1:
        raise _too_short("evaluation", source, len(tokens), seqlen)
    return tokens[: count * seqlen].view(count, seqlen)


def calibration(
    tokenizer,
    source,
    nsamples: int,
    seqlen: int,
    seed: int,
    max_positions: int | None = None,
    text_field: str = "text",
) -> tuple[torch.Tensor, dict]:
    """Calibration windows and what they were drawn from (see :func:`draw_calibration`).

    ``source`` is a text source or ready token windows, ``LongTensor[nsamples, seqlen]``.
    Windows longer than the model's context (``max_positions``) are refused.
    """
    if isinstance(source, torch.Tensor):
        if source.dim() != 2:
            raise PrunellaError("calibration windows must be a 2-D LongTensor [nsamples, seqlen]")
        return source.long(), {"source": GIVEN_WINDOWS}
    check_text_input(tokenizer, seqlen, max_positions)
    return draw_calibration(tokenizer, source, nsamples, seqlen, seed, text_field)


def check_token_ids(windows: torch.Tensor, model: torch.nn.Module) -> None:
    """Refuse token ids the model has no embedding row for: the tokenizer (or the
    windows given) belong to another model, with a larger vocabulary."""
    rows = model.get_input_embeddings().weight.shape[0]
    top = int(windows.max()) if windows.numel() else -1
    if top >= rows:
        raise PrunellaError(
            f"the tokenizer gives token id {top}, but the model embeds only {rows} tokens "
            "(vocab_size): the tokenizer is not this model's"
        )


def check_text_input(tokenizer, seqlen: int, max_positions: int | None) -> None:
    """Reading text needs a tokenizer and windows no longer than the model's context."""
    if tokenizer is None:
        raise PrunellaError("a tokenizer is needed to read text: pass tokenizer=")
    if max_positions and seqlen > max_positions:
        raise PrunellaError(
            f"seqlen {seqlen} exceeds the model's context of {max_positions} tokens"
        )
