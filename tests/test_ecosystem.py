"""KL and compare, the HTML report, recipes, zero-shot tasks through lm-eval, the API."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

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
    assert json.loads(capsys.readouterr().out)["kl_to_reference"] > 1e-4


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
    assert all(r["mib"] > 0 and r["perplexity"] > 1 for r in rows)


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


def test_html_report_is_self_contained_and_renders(pruned, tmp_path):
    page = (pruned / "report.html").read_text()
    parser = _Images()
    parser.feed(page)
    assert len(parser.sources) == 2 and not parser.external  # allocation + layer figures
    for src in parser.sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    for needle in (
        "solver: sparsegpt",
        "dense perplexity",
        "pruned perplexity",
        "statistics",
        "model.layers.2.mlp.down_proj",
        "peak memory",
    ):
        assert needle in page, needle
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:  # CI installs Debian's chromium; the parse above stands without it
        return
    shot = tmp_path / "report.png"
    subprocess.run(
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
        timeout=120,
        check=True,
    )
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


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
    assert "solver: magnitude" in resolved and "nsamples: 2" in resolved
    recipe.write_text("nsamples: 2\nseqlen: [1]\n")
    assert (
        main(["prune", str(tiny_llama), "--recipe", str(recipe), "--out", str(tmp_path / "p")]) == 2
    )
    assert re.search(r"recipe .*run.yaml: seqlen: .*integer", capsys.readouterr().err)


def test_zero_shot_through_lm_eval_with_a_local_task(pruned, tmp_path, capsys):
    pytest.importorskip("lm_eval", reason="the lm-eval extra is not installed")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "alice_cloze.yaml").write_text(
        "task: alice_cloze\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {TASK}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n    aggregation: mean\n'
        "    higher_is_better: true\nmetadata:\n  version: 1.0\n"
    )
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
                "--json",
                "--quiet",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0.0 <= result["tasks"]["alice_cloze"]["acc"] <= 1.0
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
        tiny_llama,
        sparsity=0.7,
        solver="sparsegpt",
        allocation="owl",
        nsamples=4,
        seqlen=64,
        progress=False,
    )
    assert abs(report["sparsity"] - 0.7) < 1e-4 and report["allocation"]["method"] == "owl"
    out = prunella.save(model, tmp_path / "out", report)
    assert (out / "report.html").is_file()
    result = prunella.evaluate(
        model,
        "sample-eval",
        seqlen=64,
        max_windows=2,
        tokenizer=prunella.load(out)[1],
        progress=False,
    )
    assert result["perplexity"] > 1
