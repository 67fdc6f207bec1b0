"""Calibration and evaluation data from local corpora: text, JSON Lines, Parquet and
``datasets`` folders, read a piece at a time; the seed's determinism; bad input."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from prunella import data
from prunella.cli import main
from prunella.data import (
    calibration_windows,
    check_source,
    draw_calibration,
    evaluation_windows,
    read_text,
)
from prunella.data.corpus import ParquetFile
from prunella.errors import PrunellaError

PARAGRAPHS = [p for p in read_text("sample", "train").split("\n\n") if len(p) > 200]


@pytest.fixture(scope="module")
def tok(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture
def piecewise(monkeypatch):
    """Every text file is read piece by piece, however small (as a large one is)."""
    monkeypatch.setattr(data, "WHOLE_TEXT_BYTES", 0)


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def inside(window: torch.Tensor, stream: list[int]) -> bool:
    """Whether the window's tokens are a contiguous run of ``stream``."""
    return f" {' '.join(map(str, window.tolist()))} " in f" {' '.join(map(str, stream))} "


def joined(tok, texts: list[str], cycles: int = 2) -> list[int]:
    """The records' tokens joined by end-of-text, as a corpus read around twice."""
    out: list[int] = []
    for text in texts * cycles:
        out += ([tok.eos_token_id] if out else []) + ids(tok, text)
    return out


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


# -- plain text --------------------------------------------------------------------------


def test_small_text_file_gives_the_windows_it_always_gave(tok, tmp_path):
    """Up to WHOLE_TEXT_BYTES a file is tokenized whole and start tokens drawn as before."""
    path = tmp_path / "small.txt"  # with Windows line ends, read as Python's text mode does
    path.write_bytes(read_text("sample", "train").replace("\n", "\r\n").encode())
    windows, info = draw_calibration(tok, path, nsamples=6, seqlen=48, seed=3)
    tokens = torch.tensor(ids(tok, path.read_text()))
    starts = torch.randint(
        0, len(tokens) - 48 + 1, (6,), generator=torch.Generator().manual_seed(3)
    ).tolist()
    assert torch.equal(windows, torch.stack([tokens[s : s + 48] for s in starts]))
    assert info["sampling"] == "start tokens in the whole text" and info["format"] == "text"
    assert info["tokens_read"] == len(tokens) and info["bytes"] == path.stat().st_size


def test_large_text_windows_are_seeded_runs_of_the_text(tok, tmp_path, piecewise):
    path = tmp_path / "big.txt"
    path.write_text("\n\n".join(PARAGRAPHS * 3))
    a, info = draw_calibration(tok, path, nsamples=8, seqlen=40, seed=0)
    b = calibration_windows(tok, path, nsamples=8, seqlen=40, seed=0)
    c = calibration_windows(tok, path, nsamples=8, seqlen=40, seed=1)
    assert a.shape == (8, 40) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    whole = ids(tok, path.read_text())
    # pieces start and end at a space between words, so a window is a run of the whole text
    # (or, at the end of the file, goes on after end-of-text from its start)
    cyclic = [*whole, tok.eos_token_id, *whole]
    assert all(inside(w, cyclic) for w in a)
    assert info["sampling"] == "byte offsets" and info["documents_read"] == 1


def test_large_text_reads_only_around_the_windows(tok, tmp_path, piecewise):
    path = tmp_path / "big.txt"
    path.write_text("\n\n".join(PARAGRAPHS * 40))  # about 1.3 M tokens of this tokenizer
    _, info = draw_calibration(tok, path, nsamples=4, seqlen=64, seed=0)
    assert info["bytes"] == path.stat().st_size
    piece_tokens = len(ids(tok, path.read_text()[:4096]))
    assert info["tokens_read"] <= 4 * 2 * piece_tokens  # a piece of 4 KiB or two per window


def test_non_ascii_text_in_pieces_is_the_whole_text(tok, tmp_path, piecewise, monkeypatch):
    """Pieces are cut between words and never inside a multi-byte character."""
    monkeypatch.setattr(data, "EVAL_PIECE_BYTES", 4096)
    words = ["naïve", "café", "Größe", "東京", "日本語の文", "🙂🙃", "ça", "über", "Ωmega", "x"]
    text = " ".join(words[(i * 7) % len(words)] for i in range(6000))
    path = tmp_path / "utf8.txt"
    path.write_text(text, encoding="utf-8")
    windows = evaluation_windows(tok, path, seqlen=64)
    whole = ids(tok, text)
    assert windows.flatten().tolist() == whole[: len(whole) // 64 * 64]
    drawn = calibration_windows(tok, path, nsamples=16, seqlen=64, seed=0)
    assert all(inside(w, [*whole, tok.eos_token_id, *whole]) for w in drawn)


def test_windows_at_the_end_of_a_text_go_on_from_its_start(tok, tmp_path, piecewise):
    path = tmp_path / "t.txt"
    path.write_text(PARAGRAPHS[0])  # shorter than one piece
    whole = ids(tok, PARAGRAPHS[0])
    windows = calibration_windows(tok, path, nsamples=8, seqlen=len(whole) - 20, seed=0)
    assert all(inside(w, [*whole, tok.eos_token_id, *whole]) for w in windows)
    assert sum(tok.eos_token_id in w.tolist() for w in windows) >= 4  # most wrap around
    with pytest.raises(PrunellaError, match="fewer than one window"):  # once around, no more
        calibration_windows(tok, path, nsamples=1, seqlen=len(whole) + 2, seed=0)


def test_large_evaluation_text_tokenized_in_pieces_is_the_whole_text(
    tok, tmp_path, piecewise, monkeypatch
):
    monkeypatch.setattr(data, "EVAL_PIECE_BYTES", 4096)  # about a dozen pieces
    path = tmp_path / "eval.txt"
    path.write_text(read_text("sample-eval", "test"))
    windows = evaluation_windows(tok, path, seqlen=50)
    whole = ids(tok, path.read_text())
    assert windows.flatten().tolist() == whole[: len(whole) // 50 * 50]


def test_evaluation_reads_no_further_than_its_windows(tok, tmp_path, piecewise):
    """The first windows of a large file come without reading the rest: here the rest
    is binary, and only a read of the whole file finds out."""
    path = tmp_path / "eval.txt"
    path.write_bytes(("\n\n".join(PARAGRAPHS)).encode() + b"\0" * 100_000)
    windows = evaluation_windows(tok, path, seqlen=50, max_windows=3)
    assert windows.flatten().tolist() == ids(tok, "\n\n".join(PARAGRAPHS))[:150]
    with pytest.raises(PrunellaError, match="binary file"):
        evaluation_windows(tok, path, seqlen=50)


# -- records: JSON Lines, Parquet, datasets folders ----------------------------------------


def test_jsonl_windows_are_records_joined_by_end_of_text(tok, tmp_path):
    path = tmp_path / "c.jsonl"
    write_jsonl(path, [{"id": i, "text": p} for i, p in enumerate(PARAGRAPHS[:30])])
    a, info = draw_calibration(tok, path, nsamples=6, seqlen=64, seed=0)
    assert torch.equal(a, calibration_windows(tok, path, nsamples=6, seqlen=64, seed=0))
    assert not torch.equal(a, calibration_windows(tok, path, nsamples=6, seqlen=64, seed=1))
    stream = joined(tok, PARAGRAPHS[:30])
    assert all(inside(w, stream) for w in a)
    assert info["format"] == "jsonl" and info["sampling"] == "byte offsets"
    assert 6 <= info["documents_read"] <= 30 and info["bytes"] == path.stat().st_size
    evaluated = evaluation_windows(tok, path, seqlen=64, max_windows=4)
    assert evaluated.flatten().tolist() == stream[: 4 * 64]


def test_text_field_chooses_the_field(tok, tmp_path):
    path = tmp_path / "c.jsonl"
    write_jsonl(path, [{"text": "x", "content": p} for p in PARAGRAPHS[:10]])
    windows = calibration_windows(tok, path, 3, 32, seed=0, text_field="content")
    assert all(inside(w, joined(tok, PARAGRAPHS[:10])) for w in windows)


def test_chat_records_use_the_chat_template(tok, tmp_path):
    conversations = [
        [
            {"role": "user", "content": PARAGRAPHS[i]},
            {"role": "assistant", "content": PARAGRAPHS[i + 1]},
        ]
        for i in range(0, 12, 2)
    ]
    path = tmp_path / "chat.jsonl"
    write_jsonl(path, [{"messages": m} for m in conversations])
    plain = [f"user: {m[0]['content']}\nassistant: {m[1]['content']}" for m in conversations]
    windows, info = draw_calibration(tok, path, 4, 40, seed=0)
    assert all(inside(w, joined(tok, plain)) for w in windows)
    assert "no chat template" in info["chat"]

    templated = AutoTokenizer.from_pretrained(tok.name_or_path)
    templated.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    )
    rendered = [templated.apply_chat_template(m, tokenize=False) for m in conversations]
    assert rendered[0].startswith("<|user|>")
    windows, info = draw_calibration(templated, path, 4, 40, seed=0)
    assert all(inside(w, joined(templated, rendered)) for w in windows)
    assert info["chat"] == "chat template"

    templated.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(PrunellaError) as failed:
        calibration_windows(templated, path, 4, 40, seed=0)
    assert "chat.jsonl, line" in str(failed.value) and "roles must alternate" in str(failed.value)
    assert "\n" not in str(failed.value)


def test_parquet_windows_are_seeded_records(tok, tmp_path, monkeypatch):
    import pyarrow as pa  # installed with the datasets extra, as in CI
    import pyarrow.parquet as pq

    path = tmp_path / "c.parquet"
    table = pa.table({"text": PARAGRAPHS[:40], "n": list(range(40))})
    pq.write_table(table, path, row_group_size=7)  # six row groups, read in batches of 3
    monkeypatch.setattr(ParquetFile, "BATCH_ROWS", 3)
    a, info = draw_calibration(tok, path, nsamples=8, seqlen=48, seed=0)
    assert torch.equal(a, calibration_windows(tok, path, nsamples=8, seqlen=48, seed=0))
    assert not torch.equal(a, calibration_windows(tok, path, nsamples=8, seqlen=48, seed=5))
    assert all(inside(w, joined(tok, PARAGRAPHS[:40])) for w in a)
    assert info["format"] == "parquet" and info["sampling"] == "records"
    evaluated = evaluation_windows(tok, path, seqlen=48)  # every row group, in order
    stream = joined(tok, PARAGRAPHS[:40], cycles=1)
    assert evaluated.flatten().tolist() == stream[: len(stream) // 48 * 48]
    corpus = ParquetFile(path, "text")
    assert [corpus.row(i) for i in [39, 0, 13, 14, 7, 6, *range(40)]] == [
        PARAGRAPHS[i] for i in [39, 0, 13, 14, 7, 6, *range(40)]
    ]


def test_a_long_record_is_tokenized_in_pieces(tok, tmp_path):
    path = tmp_path / "book.jsonl"
    book = " ".join(PARAGRAPHS * 20)  # one record of about 1 MB
    write_jsonl(path, [{"text": "a short one"}, {"text": book}])
    windows, info = draw_calibration(tok, path, nsamples=4, seqlen=64, seed=0)
    assert all(inside(w, joined(tok, ["a short one", book])) for w in windows)
    assert info["tokens_read"] < len(ids(tok, book)) / 10


def test_datasets_folder_splits(tok, tmp_path):
    import datasets  # the datasets extra, installed in CI

    folder = tmp_path / "saved"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"text": PARAGRAPHS[:20]}),
            "test": datasets.Dataset.from_dict({"text": PARAGRAPHS[20:30]}),
        }
    ).save_to_disk(str(folder))
    windows, info = draw_calibration(tok, folder, nsamples=5, seqlen=32, seed=0)
    assert all(inside(w, joined(tok, PARAGRAPHS[:20])) for w in windows)
    assert info["format"] == "datasets folder" and info["documents_read"] >= 5
    evaluated = evaluation_windows(tok, folder, seqlen=32, max_windows=2)
    assert evaluated.flatten().tolist() == joined(tok, PARAGRAPHS[20:30])[:64]

    held_out = tmp_path / "held-out"  # no train split: evaluation reads it, calibration refuses
    datasets.DatasetDict(
        {
            "validation": datasets.Dataset.from_dict({"text": PARAGRAPHS[:5]}),
            "test": datasets.Dataset.from_dict({"text": PARAGRAPHS[5:10]}),
        }
    ).save_to_disk(str(held_out))
    check_source(held_out, split="test")
    evaluated = evaluation_windows(tok, held_out, seqlen=32, max_windows=2)
    assert evaluated.flatten().tolist() == joined(tok, PARAGRAPHS[5:10])[:64]
    with pytest.raises(PrunellaError, match="splits validation, test, none of them train"):
        check_source(held_out)


# -- bad input -----------------------------------------------------------------------------


def bad_corpus(tmp_path, case: str):
    path = tmp_path / {"binary": "b.txt", "array": "a.json", "gz": "c.jsonl.gz"}.get(
        case, "c.jsonl"
    )
    good = [json.dumps({"text": p}) for p in PARAGRAPHS[:4]]
    if case == "empty":
        path.write_text("")
    elif case == "not json":
        path.write_text("\n".join([*good[:2], "{'text': 'single quotes'}", *good[2:]]) + "\n")
    elif case == "missing field":
        path.write_text("\n".join([*good[:3], json.dumps({"body": "x"})]) + "\n")
    elif case == "not text":
        path.write_text("\n".join([*good[:1], json.dumps({"text": 5})]) + "\n")
    elif case == "binary":
        path.write_bytes(bytes(range(256)) * 64)
    elif case == "array":
        path.write_text(json.dumps([{"text": p} for p in PARAGRAPHS[:3]]))
    elif case == "gz":
        path.write_bytes(b"\x1f\x8b" + b"\0" * 64)
    return path


BAD = {
    "empty": "c.jsonl is empty",
    "not json": "c.jsonl, line 3: not JSON",
    "missing field": "c.jsonl, line 4: no field 'text' (it has: body)",
    "not text": "c.jsonl, line 2: field 'text' is int",
    "binary": "b.txt is a binary file",
    "array": "a.json is a JSON array, not JSON Lines",
    "gz": "is compressed (.gz)",
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_corpus_is_one_line_naming_the_file_and_record(tok, tmp_path, case):
    path = bad_corpus(tmp_path, case)
    with pytest.raises(PrunellaError) as info:
        check_source(path)  # most are found before any model is loaded ...
        calibration_windows(tok, path, nsamples=8, seqlen=200, seed=0)  # ... the rest here
    message = str(info.value)
    assert BAD[case] in message and "\n" not in message


def test_missing_field_names_the_fields_and_the_option(tmp_path):
    path = tmp_path / "c.jsonl"
    write_jsonl(path, [{"body": "x", "title": "y"}])
    with pytest.raises(PrunellaError, match=r"line 1: no field 'text' \(it has: body, title\)"):
        check_source(path)
    check_source(path, text_field="body")


@pytest.mark.parametrize("case", ["not json", "missing field"])
def test_prune_with_bad_records_writes_nothing(tiny_llama, tmp_path, capsys, case):
    path = bad_corpus(tmp_path, case)
    out = tmp_path / "o"
    code = main(
        ["prune", str(tiny_llama), "--out", str(out), "--calib", str(path),
         "--nsamples", "8", "--seqlen", "200"]
    )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: ") and BAD[case] in err[-1]
    assert not out.exists() and not (tmp_path / "o.partial").exists()


def test_bad_evaluation_records_write_nothing(tiny_llama, tmp_path, capsys):
    path = bad_corpus(tmp_path, "not json")
    out = tmp_path / "o"
    code = main(
        ["prune", str(tiny_llama), "--out", str(out), "--eval-data", str(path),
         "--nsamples", "2", "--seqlen", "200"]
    )  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and BAD["not json"] in err[-1], err
    assert not out.exists() and not (tmp_path / "o.partial").exists()


# -- end to end: the report says what was read ------------------------------------------------


def test_prune_from_jsonl_reports_what_it_read(tiny_llama, tmp_path, capsys):
    path = tmp_path / "calib.jsonl"
    write_jsonl(path, [{"body": p} for p in PARAGRAPHS[:30]])
    out = tmp_path / "o"
    args = ["--nsamples", "4", "--seqlen", "32", "--sparsity", "0.5", "--quiet"]
    code = main(
        ["prune", str(tiny_llama), "--out", str(out), "--calib", str(path),
         "--text-field", "body", *args]
    )  # fmt: skip
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    calib = json.loads((out / "prune_report.json").read_text())["calibration"]
    assert calib["source"] == str(path.resolve()) and calib["format"] == "jsonl"
    assert calib["bytes"] == path.stat().st_size and calib["text_field"] == "body"
    assert calib["documents_read"] >= 4 and calib["tokens_read"] >= 4 * 32
    assert "documents read" in (out / "report.html").read_text()
    code = main(
        ["eval", str(out), "--data", str(path), "--text-field", "body", "--seqlen", "32",
         "--max-windows", "2", "--json", "--quiet"]
    )  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["windows"] == 2 and result["tokens"] == 2 * 31
