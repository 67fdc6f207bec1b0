"""Local text corpora read a piece at a time: text, JSON Lines, Parquet, ``datasets`` folders.

A corpus is a sequence of *documents*: a plain text file is one document; a JSON
Lines file, a Parquet file or a folder written by ``datasets.save_to_disk`` holds
one document per record, its text in the field ``text_field`` (default ``text``).
A record whose field is a list of chat messages (``[{"role", "content"}, ...]``,
e.g. a ``messages`` column) is rendered with the model's chat template, or as
``role: content`` lines when the tokenizer has none.

Nothing here reads a corpus whole. A window starts at a *position*, drawn first:

* plain text and JSON Lines: a byte offset, uniform over the file, so every byte
  (and so, nearly, every token) is equally likely to start a window; in JSON Lines
  the window starts in the record holding that byte, at the same fraction of its text;
* Parquet and ``datasets`` folders (records found by index): a record, uniform over
  records, and a uniform fraction of its text.

From a position, :meth:`Corpus.read` yields the text that follows, piece by piece
(record by record; a plain text file in pieces of a few KiB cut at a space between
words), once around the corpus: after the last document it goes on from the first.
"""

from __future__ import annotations

import bisect
import json
import re
from collections.abc import Callable, Iterator
from itertools import accumulate, chain
from pathlib import Path

import torch

from ..errors import PrunellaError, first_line

WORD_BREAK = re.compile(r"(?<=\S) (?=\S)")
WHITESPACE = b" \t\n\r\x0b\x0c"
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zip")
MAX_RECORD_BYTES = 1 << 28  # a longer JSONL line is refused (it is parsed whole)


def open_corpus(
    source: str | Path, text_field: str = "text", split: str = "train", tokenizer=None
) -> Corpus:
    """The corpus at ``source`` (a file or a ``datasets`` folder), checked but not read.

    The format comes from the name: ``.jsonl``/``.ndjson``/``.json`` (one JSON object
    per line), ``.parquet``, a folder (``datasets.save_to_disk``), anything else is
    plain UTF-8 text. ``split`` picks the split of a saved ``DatasetDict``.
    """
    path = Path(source)
    if path.is_dir():
        return DatasetFolder(path, text_field, split, tokenizer)
    if not path.is_file():
        raise PrunellaError(f"text source {str(source)!r} is neither a file nor a folder")
    if path.stat().st_size == 0:
        raise PrunellaError(f"{path} is empty")
    suffix = path.suffix.lower()
    if suffix in COMPRESSED_SUFFIXES:
        raise PrunellaError(f"{path} is compressed ({suffix}): decompress it first")
    if suffix in JSONL_SUFFIXES:
        return JsonLines(path, text_field, tokenizer)
    if suffix == ".parquet":
        return ParquetFile(path, text_field, tokenizer)
    return TextFile(path)


class Corpus:
    """What every format has: a path, a size, a way to draw positions and read from them."""

    format = ""
    path: Path
    size: int  # bytes on disk
    documents_read = 0  # records rendered so far (a plain text file counts as one)
    chat = ""  # how chat records were rendered: "", "chat template" or "role: content lines"
    start = 0  # the position of the corpus's beginning

    def draw(self, generator: torch.Generator, n: int) -> list:
        """``n`` seeded positions (see the module docstring)."""
        raise NotImplementedError

    def read(self, position, wrap: bool = True, piece_bytes: int = 1 << 20) -> Iterator[tuple]:
        """``(text, new_document)`` pieces from ``position`` on, once around the corpus
        (``wrap=False``: up to its end)."""
        raise NotImplementedError

    def info(self) -> dict:
        return {
            "format": self.format,
            "bytes": self.size,
            "documents_read": self.documents_read,
            **({"chat": self.chat} if self.chat else {}),
        }


def pieces_of(text: str, size: int) -> Iterator[tuple[str, bool]]:
    """One document's ``(piece, new_document)`` pieces of about ``size`` characters, cut at
    single spaces between words (so that a long record is never tokenized whole)."""
    start, new_document = 0, True
    while len(text) - start > size:
        cut = _last_word_break(text, start, start + size)
        cut = cut if cut > start else start + size
        yield text[start:cut], new_document
        start, new_document = cut, False
    yield text[start:], new_document


def cut_at_fraction(text: str, fraction: float) -> str:
    """``text`` from about ``fraction`` of its length, starting at the next single space
    between two words (where a tokenizer splits them), else at that fraction."""
    if fraction <= 0:
        return text
    at = int(fraction * len(text))
    space = WORD_BREAK.search(text, at)
    return text[space.start() :] if space else text[at:]


# -- plain text ----------------------------------------------------------------------


class TextFile(Corpus):
    """A UTF-8 text file: one document, read in pieces at byte offsets."""

    format = "text"

    def __init__(self, path: Path) -> None:
        self.path, self.size = path, path.stat().st_size
        with open(path, "rb") as f:
            self._decode(f.read(1 << 16), 0, final=self.size <= 1 << 16)  # binary? fail now

    def text(self) -> str:
        """The whole text (for a small file), with universal newlines as Python's text
        mode reads it (and so as Prunella always read a small file)."""
        self.documents_read = 1
        text = self._decode(self.path.read_bytes(), 0, final=True)
        return text.replace("\r\n", "\n").replace("\r", "\n")

    def draw(self, generator: torch.Generator, n: int) -> list[int]:
        return torch.randint(0, self.size, (n,), generator=generator).tolist()

    def read(self, position: int, wrap: bool = True, piece_bytes: int = 1 << 20):
        self.documents_read = 1
        with open(self.path, "rb") as f:
            yield from self._pieces(f, position, self.size, piece_bytes)
            if wrap and position > 0:
                yield from self._pieces(f, 0, position, piece_bytes)

    def _pieces(self, f, pos: int, end: int, piece_bytes: int):
        """Pieces of ``[pos, end)``, each ending at a space between two words (so that
        tokenizing them one by one gives the tokens of the whole), the first starting at
        the first space after ``pos`` unless ``pos`` is the start of the file."""
        new_document, mid_text = pos == 0, pos > 0
        while pos < end:
            f.seek(pos)
            raw = f.read(min(max(piece_bytes, 64), end - pos))
            if not raw:
                raise PrunellaError(f"{self.path} changed while it was being read")
            if mid_text:
                skip = _first_space(raw)
                raw, pos, mid_text = raw[skip:], pos + skip, False
            last = pos + len(raw) >= end
            if not last:
                raw = raw[: _last_space(raw)]
            # the file's end is whole; a wrap ends at the window's offset, maybe mid-character
            yield self._decode(raw, pos, final=end == self.size), new_document
            new_document = False
            pos += len(raw)

    def _decode(self, raw: bytes, pos: int, final: bool) -> str:
        """``raw`` as text (``final=False``: a character cut at its end is dropped)."""
        nul = raw.find(b"\0")
        if nul >= 0:
            raise PrunellaError(
                f"{self.path} is a binary file (a NUL byte at {pos + nul}), not text"
            )
        try:
            return raw.decode("utf-8") if final else _decode_prefix(raw)
        except UnicodeDecodeError as exc:
            raise PrunellaError(
                f"{self.path} is not UTF-8 text (byte {pos + exc.start}: {exc.reason})"
            ) from None


def _decode_prefix(raw: bytes) -> str:
    """The complete characters of ``raw`` (a multi-byte character cut at its end is dropped)."""
    import codecs

    return codecs.getincrementaldecoder("utf-8")().decode(raw, final=False)


def _first_space(raw: bytes) -> int:
    """Where a piece read from a random offset starts: at its first space, else after
    any UTF-8 continuation bytes (the rest of a character cut by the offset)."""
    for sep in (b" ", b"\n"):
        at = raw.find(sep)
        if at >= 0:
            return at
    skip = 0
    while skip < len(raw) and raw[skip] & 0xC0 == 0x80:
        skip += 1
    return skip


def _last_word_break(text: str | bytes, start: int, end: int) -> int:
    """The last single space in ``text[start + 1 : end - 1]`` with a non-space on either
    side (where tokenizers split words), or -1; for text and for raw bytes alike."""
    space = b" " if isinstance(text, bytes) else " "
    at = text.rfind(space, start + 1, end - 1)
    while at > start and (text[at - 1 : at].isspace() or text[at + 1 : at + 2].isspace()):
        at = text.rfind(space, start + 1, at)
    return at if at > start else -1


def _last_space(raw: bytes) -> int:
    """Where to cut a piece (> 0): at its last single space between two non-spaces
    (tokenizers split words there), else at its last whitespace, else before its last
    character."""
    at = _last_word_break(raw, 0, len(raw))
    if at > 0:
        return at
    at = max(raw.rfind(bytes([sep])) for sep in WHITESPACE)
    if at > 0:
        return at
    cut = len(raw) - 1
    while cut > 0 and raw[cut] & 0xC0 == 0x80:  # back to the last character's first byte
        cut -= 1
    return cut if cut > 0 else len(raw)


# -- records -------------------------------------------------------------------------


class Records(Corpus):
    """Records with a text field (or chat messages), rendered one by one."""

    def __init__(self, path: Path, text_field: str, tokenizer) -> None:
        self.path, self.text_field, self.tokenizer = path, text_field, tokenizer

    def field_of(self, fields, where: Callable[[], str]) -> str:
        """The field to read: ``text_field``, or ``messages`` when the default ``text``
        is absent and the records are chat-formatted."""
        if self.text_field in fields:
            return self.text_field
        if self.text_field == "text" and "messages" in fields:
            return "messages"
        have = ", ".join(map(str, fields)) or "none"
        raise PrunellaError(
            f"{self.path}, {where()}: no field {self.text_field!r} (it has: {have}); "
            "choose one with --text-field"
        )

    def render(self, value, field: str, where: Callable[[], str]) -> str:
        """A record's text: a string as it is, chat messages through the chat template."""
        self.documents_read += 1
        if isinstance(value, str):
            return value
        if isinstance(value, list) and all(
            isinstance(m, dict) and "role" in m and "content" in m for m in value
        ):
            return self._render_chat(value, where)
        raise PrunellaError(
            f"{self.path}, {where()}: field {field!r} is {type(value).__name__}, "
            "neither text nor a list of chat messages"
        )

    def _render_chat(self, messages: list[dict], where: Callable[[], str]) -> str:
        if self.tokenizer is not None and getattr(self.tokenizer, "chat_template", None):
            self.chat = "chat template"
            try:
                return self.tokenizer.apply_chat_template(messages, tokenize=False)
            except Exception as exc:  # e.g. "roles must alternate user/assistant"
                raise PrunellaError(
                    f"{self.path}, {where()}: the chat template failed: {first_line(exc)}"
                ) from None
        self.chat = "role: content lines (the tokenizer has no chat template)"
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


class JsonLines(Records):
    """One JSON object per line; a window's record is found from a byte offset."""

    format = "jsonl"

    def __init__(self, path: Path, text_field: str, tokenizer=None) -> None:
        super().__init__(path, text_field, tokenizer)
        self.size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(1 << 16)
            nul = head.find(b"\0")
            if nul >= 0:
                raise PrunellaError(f"{path} is a binary file (a NUL byte at {nul})")
            if head.lstrip()[:1] == b"[":
                raise PrunellaError(
                    f"{path} is a JSON array, not JSON Lines: write one object per line"
                )
            f.seek(0)
            pos, record = 0, None
            while record is None and pos < self.size:  # the first record must be readable
                line = self._readline(f, pos)
                record, pos = self._parse(line, pos), pos + len(line)
        if record is None:
            raise PrunellaError(f"{path} has no records, only empty lines")
        self.field_of(record, lambda: self._where(pos - len(line)))

    def draw(self, generator: torch.Generator, n: int) -> list[int]:
        return torch.randint(0, self.size, (n,), generator=generator).tolist()

    def read(self, position: int, wrap: bool = True, piece_bytes: int = 1 << 20):
        with open(self.path, "rb") as f:
            start = self._line_start(f, position)
            f.seek(start)
            line = f.readline()
            fraction = (position - start) / max(len(line), 1)
            yield from self._records(f, start, self.size, fraction, piece_bytes)
            if wrap and start > 0:
                yield from self._records(f, 0, start, 0.0, piece_bytes)

    def _records(self, f, pos: int, end: int, fraction: float, piece_bytes: int):
        f.seek(pos)
        while pos < end:
            line = self._readline(f, pos)
            if not line:
                raise PrunellaError(f"{self.path} changed while it was being read")
            record = self._parse(line, pos)
            if record is not None:
                where = lambda at=pos: self._where(at)  # noqa: E731 (counted on error only)
                field = self.field_of(record, where)
                text = self.render(record[field], field, where)
                yield from pieces_of(cut_at_fraction(text, fraction), piece_bytes)
            fraction = 0.0
            pos += len(line)

    def _readline(self, f, pos: int) -> bytes:
        line = f.readline(MAX_RECORD_BYTES + 1)
        if len(line) > MAX_RECORD_BYTES:
            raise PrunellaError(
                f"{self.path}, {self._where(pos)}: a line over {MAX_RECORD_BYTES >> 20} MiB "
                "(is this JSON Lines?)"
            )
        return line

    def _parse(self, line: bytes, pos: int) -> dict | None:
        if not line.strip():
            return None
        if b"\0" in line:
            raise PrunellaError(f"{self.path} is a binary file (a NUL byte near byte {pos})")
        try:
            record = json.loads(line)
        except UnicodeDecodeError:
            raise PrunellaError(f"{self.path}, {self._where(pos)}: not UTF-8 text") from None
        except json.JSONDecodeError as exc:
            raise PrunellaError(f"{self.path}, {self._where(pos)}: not JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise PrunellaError(
                f"{self.path}, {self._where(pos)}: a JSON {type(record).__name__}, not an object"
            )
        return record

    def _where(self, pos: int) -> str:
        """``line N`` of the line starting at byte ``pos`` (counted only for a message)."""
        count, done = 1, 0
        with open(self.path, "rb") as f:
            while done < pos:
                block = f.read(min(1 << 20, pos - done))
                count, done = count + block.count(b"\n"), done + len(block)
        return f"line {count}"

    @staticmethod
    def _line_start(f, position: int) -> int:
        """The offset of the line holding byte ``position``."""
        end = position
        while end > 0:
            begin = max(0, end - (1 << 16))
            f.seek(begin)
            at = f.read(end - begin).rfind(b"\n")
            if at >= 0:
                return begin + at + 1
            end = begin
        return 0


class Table(Records):
    """Records found by index (Parquet, ``datasets`` folders): ``rows`` and ``row(i)``."""

    rows = 0

    def draw(self, generator: torch.Generator, n: int) -> list[tuple[int, float]]:
        index = torch.randint(0, self.rows, (n,), generator=generator).tolist()
        fraction = torch.rand(n, generator=generator, dtype=torch.float64).tolist()
        return list(zip(index, fraction, strict=True))

    start = (0, 0.0)

    def read(self, position: tuple[int, float], wrap: bool = True, piece_bytes: int = 1 << 20):
        first, fraction = position
        for i in chain(range(first, self.rows), range(first) if wrap else ()):
            text = self.render(self.row(i), self.field, lambda i=i: f"record {i + 1}")
            yield from pieces_of(cut_at_fraction(text, fraction), piece_bytes)
            fraction = 0.0

    def row(self, i: int):
        raise NotImplementedError


class ParquetFile(Table):
    """A Parquet file, read in batches of ``BATCH_ROWS`` rows through a buffered stream, so
    that memory holds one batch whatever the size of the row groups (pyarrow's default
    row group is a million rows: a gigabyte of paragraphs)."""

    format = "parquet"
    BATCH_ROWS = 256

    def __init__(self, path: Path, text_field: str, tokenizer=None) -> None:
        super().__init__(path, text_field, tokenizer)
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise PrunellaError(
                f"reading {path} needs pyarrow: pip install 'prunella[datasets]'"
            ) from None
        try:
            self.file = pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)
        except Exception as exc:
            raise PrunellaError(
                f"{path} is not a readable Parquet file: {first_line(exc)}"
            ) from None
        self.size, self.rows = path.stat().st_size, self.file.metadata.num_rows
        self.field = self.field_of(self.file.schema_arrow.names, lambda: "its columns")
        groups = range(self.file.num_row_groups)
        self.ends = list(accumulate(self.file.metadata.row_group(g).num_rows for g in groups))
        if self.rows == 0:
            raise PrunellaError(f"{path} has no rows")
        # the stream being read: its row group, the batches left, the batch at hand
        self.group, self.batches, self.batch, self.batch_start = -1, iter(()), [], 0

    def row(self, i: int):
        """Row ``i``: read on from the current batch when it lies ahead in the same row
        group (windows are read in file order), else from the start of its row group."""
        group = bisect.bisect_right(self.ends, i)
        if group != self.group or i < self.batch_start:
            self.group, self.batch, self.batch_start = (
                group,
                [],
                self.ends[group - 1] if group else 0,
            )
            self.batches = self.file.iter_batches(
                batch_size=self.BATCH_ROWS, row_groups=[group], columns=[self.field]
            )
        try:
            while i >= self.batch_start + len(self.batch):
                self.batch_start += len(self.batch)
                self.batch = next(self.batches).column(0).to_pylist()
        except Exception as exc:
            raise PrunellaError(
                f"{self.path}, row group {group}: unreadable: {first_line(exc)}"
            ) from None
        return self.batch[i - self.batch_start]


class DatasetFolder(Table):
    """A folder written by ``datasets`` (``save_to_disk``): memory-mapped Arrow, by index."""

    format = "datasets folder"

    def __init__(self, path: Path, text_field: str, split: str, tokenizer=None) -> None:
        super().__init__(path, text_field, tokenizer)
        markers = ("dataset_info.json", "state.json", "dataset_dict.json")
        if not any((path / m).is_file() for m in markers):
            raise PrunellaError(f"{path} is a folder but not one written by datasets.save_to_disk")
        try:
            import datasets
        except ImportError:
            raise PrunellaError(
                f"reading {path} needs the 'datasets' package: pip install 'prunella[datasets]'"
            ) from None
        try:
            data = datasets.load_from_disk(str(path))
        except Exception as exc:
            raise PrunellaError(
                f"could not read the dataset folder {path}: {first_line(exc)}"
            ) from None
        if isinstance(data, datasets.DatasetDict):
            data = self._split(data, split)
        self.field = self.field_of(data.column_names, lambda: "its columns")
        self.data = data.select_columns([self.field])
        self.rows = len(self.data)
        self.size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        if self.rows == 0:
            raise PrunellaError(f"{path} has no records")

    def _split(self, data, split: str):
        wanted = [split] if split == "train" else [split, "validation"]
        for name in wanted:
            if name in data:
                return data[name]
        if len(data) == 1:
            return next(iter(data.values()))
        raise PrunellaError(
            f"{self.path} has the splits {', '.join(data)}, none of them {' or '.join(wanted)}"
        )

    def row(self, i: int):
        return self.data[i][self.field]
