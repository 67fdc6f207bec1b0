"""KL and compare, the HTML report, recipes, zero-shot tasks through lm-eval, the API."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml
from conftest import hand_evaluation

import prunella
from prunella.cli import main

TASK = Path(__file__).parent / "data" / "lmeval_task" / "alice_cloze.jsonl"


@pytest.fixture(scope="module")
def pruned(tiny_llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eco") / "pruned"
    assert (
        main(
            [
                "prune",
                str(tiny_llama),
                "--out",
                str(out),
                "--sparsity",
                "0.7",
                "--allocation",
                "owl",
                "--nsamples",
                "4",
                "--seqlen",
                "64",
                "--eval-data",
                "sample-eval",
                "--eval-max-windows",
                "4",
                "--quiet",
            ]
        )
        == 0
    )
    return out


def test_kl_to_itself_is_zero_and_grows_with_pruning(tiny_llama, pruned, capsys):
    assert (
        main(
            [
                "eval",
                str(tiny_llama),
                "--reference",
                str(tiny_llama),
                "--seqlen",
                "64",
                "--max-windows",
                "3",
                "--json",
                "--quiet",
            ]
        )
        == 0
    )
    same = json.loads(capsys.readouterr().out)
    assert same["kl_to_reference"] == pytest.approx(0.0, abs=1e-6)
    assert (
        main(
            [
                "eval",
                str(pruned),
                "--reference",
                str(tiny_llama),
                "--seqlen",
                "64",
                "--max-windows",
                "3",
                "--json",
                "--quiet",
            ]
        )
        == 0
    )
    kl = json.loads(capsys.readouterr().out)["kl_to_reference"]
    assert kl == pytest.approx(hand_evaluation(pruned, 64, 3, reference=tiny_llama)[1], rel=1e-4)


def test_compare_prints_one_table(tiny_llama, pruned, capsys):
    assert (
        main(
            [
                "compare",
                str(tiny_llama),
                str(pruned),
                "--seqlen",
                "64",
                "--max-windows",
                "2",
                "--json",
                "--quiet",
            ]
        )
        == 0
    )
    rows = json.loads(capsys.readouterr().out)
    assert [r["model"] for r in rows] == [str(tiny_llama), str(pruned)]
    assert rows[0]["kl_to_first"] == 0.0 and rows[1]["kl_to_first"] > 0
    assert rows[0]["sparsity"] == 0.0 and rows[1]["sparsity"] == pytest.approx(0.7, abs=1e-4)
    assert all(r["mib"] > 0 for r in rows)
    for row, path in zip(rows, (tiny_llama, pruned), strict=True):
        ppl, kl = hand_evaluation(path, 64, 2, reference=tiny_llama)
        assert row["perplexity"] == pytest.approx(ppl, rel=1e-5)
        assert row["kl_to_first"] == pytest.approx(kl, rel=1e-4, abs=1e-9)


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources: list[str] = []
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.sources.append(attrs.get("src", ""))
        for key in ("href", "src"):
            if attrs.get(key) and not attrs[key].startswith("data:"):
                self.external.append(attrs[key])


def _rgb(png: bytes):
    """A PNG as an ``(height, width, 3)`` array of 0-255 integers."""
    import matplotlib.image
    import numpy as np

    pixels = matplotlib.image.imread(io.BytesIO(png), format="png")
    if pixels.dtype != np.uint8:
        pixels = np.round(pixels * 255)
    return pixels[..., :3].astype(int)


def _main_colour(pixels) -> tuple[tuple[int, int, int], int]:
    """A figure's commonest colour that is not white or near it, and its pixel count: the
    colour of its bars."""
    import numpy as np

    flat = pixels.reshape(-1, 3)
    colours, counts = np.unique(flat[flat.min(axis=1) < 230], axis=0, return_counts=True)
    return tuple(int(c) for c in colours[counts.argmax()]), int(counts.max())


def test_html_report_is_self_contained_and_renders(pruned, tmp_path):
    import numpy as np

    page = (pruned / "report.html").read_text()
    parser = _Images()
    parser.feed(page)
    assert len(parser.sources) == 2 and not parser.external  # allocation + layer figures
    figures = []
    for src in parser.sources:
        assert src.startswith("data:image/png;base64,")
        figures.append(base64.b64decode(src.split(",", 1)[1]))
        assert figures[-1][:8] == b"\x89PNG\r\n\x1a\n"
    for needle in (
        "name: sparsegpt",
        "dense perplexity",
        "pruned perplexity",
        "statistics",
        "model.layers.2.mlp.down_proj",
        "peak memory",
    ):
        assert needle in page, needle
    # CI (.ci/run) installs Debian's chromium and stops if it cannot: no Chromium is a failure.
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "no chromium on PATH: install it (apt-get install chromium), as .ci/run does"
    shot = tmp_path / "report.png"
    run = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1200,1600",
            (pruned / "report.html").as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = _rgb(shot.read_bytes())
    assert pixels.shape[:2] == (1600, 1200)
    flat = pixels.reshape(-1, 3)
    # not blank: text, tables and figures, many colours, a good share of non-white pixels
    assert len(np.unique(flat, axis=0)) > 200
    assert (flat.min(axis=1) < 230).mean() > 0.05
    # both figures were decoded and drawn whole: each one's bar colour covers at least as
    # many pixels of the screenshot as it does in the embedded PNG (the figures are shown at
    # their own size, 720 px wide, in a 1200 px window)
    for name, figure in zip(("allocation", "per-layer"), figures, strict=True):
        colour, count = _main_colour(_rgb(figure))
        shown = int((np.abs(flat - colour).max(axis=1) <= 3).sum())
        assert shown >= 0.9 * count, f"{name} figure: {shown} of {count} px of {colour}"


def test_recipe_flags_override_and_keys_are_checked(tiny_llama, tmp_path, capsys):
    recipe = tmp_path / "run.yaml"
    recipe.write_text(
        f"model: {tiny_llama}\nsparsity: 0.6\nsolver: wanda\nnsamples: 2\nseqlen: 32\n"
    )
    assert (
        main(
            [
                "prune",
                "--recipe",
                str(recipe),
                "--out",
                str(tmp_path / "o"),
                "--solver",
                "magnitude",
                "--quiet",
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "o" / "prune_report.json").read_text())
    assert report["solver"] == "magnitude" and report["target_sparsity"] == 0.6
    resolved = (tmp_path / "o" / "recipe.yaml").read_text()
    loaded = yaml.safe_load(resolved)
    assert loaded["solver"] == {"name": "magnitude", "options": {}} and loaded["nsamples"] == 2
    recipe.write_text("nsamples: 2\nseqlen: [1]\n")
    assert (
        main(["prune", str(tiny_llama), "--recipe", str(recipe), "--out", str(tmp_path / "p")]) == 2
    )
    assert re.search(r"recipe .*run.yaml: seqlen: .*integer", capsys.readouterr().err)


def _choice_loglikelihoods(checkpoint: Path, docs: list[dict]) -> list[list[float]]:
    """log p(choice | context) summed over the choice's tokens, for every choice of every
    document: the model and tokenizer straight from ``transformers``, no lm-eval."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    scores = []
    for doc in docs:
        context = tokenizer(doc["context"], add_special_tokens=False).input_ids
        row = []
        for choice in doc["choices"]:
            continuation = tokenizer(choice, add_special_tokens=False).input_ids
            ids = torch.tensor([context + continuation])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
            # the token at position i is predicted from the logits at position i - 1
            row.append(
                sum(logp[len(context) + i - 1, t].item() for i, t in enumerate(continuation))
            )
        scores.append(row)
    return scores


def _accuracy(scores: list[list[float]], docs: list[dict], *, per_char: bool = False) -> float:
    """lm-eval's multiple-choice ``acc`` (argmax of the log-likelihoods), or ``acc_norm``
    with ``per_char`` (argmax of the log-likelihoods per character of the choice)."""
    hits = 0
    for row, doc in zip(scores, docs, strict=True):
        keyed = [s / len(c) for s, c in zip(row, doc["choices"], strict=True)] if per_char else row
        ranked = sorted(keyed, reverse=True)
        # a near tie would make the expected value depend on float rounding, not the bridge
        assert ranked[0] - ranked[1] > 1e-4, f"near tie in {doc['context']!r}: {row}"
        hits += keyed.index(ranked[0]) == doc["answer"]
    return hits / len(docs)


def test_zero_shot_through_lm_eval_with_a_local_task(pruned, tmp_path, capsys, monkeypatch):
    # Imported plainly: CI installs the eval extra, so a missing or broken lm-eval must fail
    # this test, not skip it.
    from lm_eval.models.huggingface import HFLM

    docs = [json.loads(line) for line in TASK.read_text().splitlines()]
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    # The choices carry their own leading space, so no delimiter between context and choice.
    (tasks / "alice_cloze.yaml").write_text(
        "task: alice_cloze\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {TASK}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\ntarget_delimiter: ""\nmetric_list:\n'
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n"
    )
    # What the bridge's model scored: {(context, continuation): log-likelihood}.
    scored: dict[tuple[str, str], float] = {}
    original = HFLM.loglikelihood

    def recording(self, requests, *args, **kwargs):
        results = original(self, requests, *args, **kwargs)
        for request, (loglikelihood, _) in zip(requests, results, strict=True):
            scored[tuple(request.args)] = loglikelihood
        return results

    monkeypatch.setattr(HFLM, "loglikelihood", recording)
    assert (
        main(
            [
                "eval",
                str(pruned),
                "--tasks",
                "alice_cloze",
                "--task-path",
                str(tasks),
                "--seqlen",
                "64",
                "--max-windows",
                "1",
                "--device",
                "cpu",
                "--json",
                "--quiet",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    metrics = result["tasks"]["alice_cloze"]
    expected = _choice_loglikelihoods(pruned, docs)
    # every (context, choice) pair was scored, formatted as the task defines it, and to the
    # same log-likelihood as the pruned checkpoint gives through transformers directly
    assert sorted(scored) == sorted((d["context"], c) for d in docs for c in d["choices"])
    for doc, row in zip(docs, expected, strict=True):
        for choice, want in zip(doc["choices"], row, strict=True):
            got = scored[doc["context"], choice]
            assert got == pytest.approx(want, abs=1e-4), (doc["context"], choice)
    # and the accuracies are those of these log-likelihoods, exactly (k of 6 documents)
    assert metrics["acc"] == pytest.approx(_accuracy(expected, docs), abs=1e-9)
    assert metrics["acc_norm"] == pytest.approx(_accuracy(expected, docs, per_char=True), abs=1e-9)
    assert (
        main(
            [
                "eval",
                str(pruned),
                "--tasks",
                "no_such_task",
                "--task-path",
                str(tasks),
                "--seqlen",
                "64",
                "--max-windows",
                "1",
                "--quiet",
            ]
        )
        == 2
    )
    assert "unknown lm-eval task" in capsys.readouterr().err


def test_readme_python_example(tiny_llama, tmp_path):
    """The README's API example, on the tiny model."""
    model, report = prunella.prune(
        tiny_llama, sparsity=0.5, solver="sparsegpt", nsamples=4, seqlen=64, progress=False
    )
    out = prunella.save(model, tmp_path / "api-50", report)
    assert (out / "report.html").is_file() and abs(report["sparsity"] - 0.5) < 1e-4
    plan = prunella.allocate(
        tiny_llama, sparsity=0.7, allocation="owl", nsamples=4, seqlen=64, progress=False
    )
    plan.save(tmp_path / "owl-70.json")
    assert plan["sparsity"].method == "owl" and plan.cost["bytes"] == plan.cost["dense_bytes"]
    report = prunella.prune_to_dir(
        model=str(tiny_llama), out=str(tmp_path / "api-70"), allocation=tmp_path / "owl-70.json",
        nsamples=4, seqlen=64, progress=False,
    )  # fmt: skip
    assert abs(report["sparsity"] - 0.7) < 1e-4
    assert report["plan"]["axes"]["sparsity"]["sparsity"] == plan["sparsity"].values
    result = prunella.evaluate(
        tmp_path / "api-70", "sample-eval", seqlen=64, max_windows=2, progress=False
    )
    assert result["perplexity"] == pytest.approx(hand_evaluation(tmp_path / "api-70", 64, 2)[0],
                                                 rel=1e-5)  # fmt: skip
