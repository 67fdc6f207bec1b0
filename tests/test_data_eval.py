"""Calibration windows, evaluation windows and perplexity."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prunella.data import calibration_windows, evaluation_windows, read_text
from prunella.errors import PrunellaError
from prunella.report.evaluation import perplexity


@pytest.fixture(scope="module")
def tok(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


def test_calibration_windows_are_seeded_windows_of_the_text(tok):
    a = calibration_windows(tok, "sample", nsamples=8, seqlen=40, seed=0)
    b = calibration_windows(tok, "sample", nsamples=8, seqlen=40, seed=0)
    c = calibration_windows(tok, "sample", nsamples=8, seqlen=40, seed=1)
    assert a.shape == (8, 40) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    stream = tok(read_text("sample", "train"), add_special_tokens=False)["input_ids"]
    text = " ".join(map(str, stream))
    for row in a:
        assert " ".join(map(str, row.tolist())) in text


def test_evaluation_windows_are_consecutive(tok, tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(read_text("sample-eval", "test"))
    w = evaluation_windows(tok, path, seqlen=50, max_windows=5)
    stream = tok(path.read_text(), add_special_tokens=False)["input_ids"]
    assert w.shape == (5, 50)
    assert w.flatten().tolist() == stream[:250]


def test_named_dataset_error_is_one_line(tok):
    with pytest.raises(PrunellaError) as info:
        calibration_windows(tok, "c4", nsamples=1, seqlen=8, seed=0)
    assert "c4" in str(info.value) and "\n" not in str(info.value)


def test_perplexity_matches_transformers_loss(tiny_llama, tok):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    w = evaluation_windows(tok, "sample-eval", seqlen=64, max_windows=3)
    result = perplexity(model, w, batch_size=2, progress=False)
    with torch.no_grad():
        losses = [model(input_ids=row[None], labels=row[None]).loss.item() for row in w]
    assert result["tokens"] == 3 * 63
    assert result["perplexity"] == pytest.approx(math.exp(sum(losses) / 3), rel=1e-5)
