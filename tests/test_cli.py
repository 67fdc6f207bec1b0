"""The command line: a real run, and one clear line for every bad input."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import hand_evaluation
from transformers import AutoModelForCausalLM, AutoTokenizer

from prunella.cli import main


def tree_hash(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def test_prune_then_eval(tiny_llama, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        [
            "prune",
            str(tiny_llama),
            "--out",
            str(out),
            "--pattern",
            "2:4",
            "--solver",
            "wanda",
            "--nsamples",
            "4",
            "--seqlen",
            "32",
            "--quiet",
        ]
    )
    assert code == 0
    assert "50.00% sparsity" in capsys.readouterr().out
    report = json.loads((out / "prune_report.json").read_text())
    assert report["pattern"] == "2:4" and report["solver"] == "wanda"
    code = main(["eval", str(out), "--seqlen", "64", "--max-windows", "3", "--json", "--quiet"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == 3 * 63
    assert result["perplexity"] == pytest.approx(hand_evaluation(out, 64, 3)[0], rel=1e-5)


def test_entry_point_runs_as_a_module():
    done = subprocess.run(
        [sys.executable, "-m", "prunella", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "prune" in done.stdout


@pytest.fixture
def inputs(tiny_llama, tmp_path):
    """Bad-input variants of one valid command, keyed by case name."""
    short = tmp_path / "short.txt"
    short.write_text("Too short to hold a window.")
    unsupported = tmp_path / "t5"
    unsupported.mkdir()
    (unsupported / "config.json").write_text(json.dumps({"model_type": "t5"}))
    noconfig = tmp_path / "noconfig"
    noconfig.mkdir()
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("precious")
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_llama, truncated)
    weights = truncated / "model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    nan = tmp_path / "nan"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    model.save_pretrained(nan)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(nan)
    plan = json.loads((Path(__file__).parent / "data" / "plan_llama3.json").read_text())
    off = {**plan, "sparsity": dict.fromkeys(plan["sparsity"], 0.1)}
    (tmp_path / "plan_off.json").write_text(json.dumps(off))
    unknown = {**plan, "sparsity": {**plan["sparsity"], "model.layers.7.mlp.up_proj": 0.5}}
    (tmp_path / "plan_unknown.json").write_text(json.dumps(unknown))
    (tmp_path / "recipe_key.yaml").write_text("sparsity: 0.5\nsolvr: wanda\n")
    (tmp_path / "recipe_type.yaml").write_text("nsamples: many\n")
    return {
        "model": str(tiny_llama),
        "short": str(short),
        "unsupported": str(unsupported),
        "noconfig": str(noconfig),
        "full": str(full),
        "tmp": tmp_path,
        "truncated": str(truncated),
        "nan": str(nan),
    }


CASES = {
    "missing model": (["prune", "{tmp}/nope", "--out", "{tmp}/o"], "not found"),
    "no config": (["prune", "{noconfig}", "--out", "{tmp}/o"], "no config.json"),
    "unsupported": (
        ["prune", "{unsupported}", "--out", "{tmp}/o"],
        "unsupported architecture 't5'",
    ),
    "sparsity -0.1": (["prune", "{model}", "--out", "{tmp}/o", "--sparsity", "-0.1"], "[0, 1)"),
    "sparsity 1.0": (["prune", "{model}", "--out", "{tmp}/o", "--sparsity", "1.0"], "[0, 1)"),
    "sparsity 1.5": (["prune", "{model}", "--out", "{tmp}/o", "--sparsity", "1.5"], "[0, 1)"),
    "sparsity abc": (["prune", "{model}", "--out", "{tmp}/o", "--sparsity", "abc"], "'--sparsity'"),
    "pattern 4:2": (["prune", "{model}", "--out", "{tmp}/o", "--pattern", "4:2"], "4:2"),
    "pattern 0:4": (["prune", "{model}", "--out", "{tmp}/o", "--pattern", "0:4"], "0:4"),
    "pattern 2:0": (["prune", "{model}", "--out", "{tmp}/o", "--pattern", "2:0"], "2:0"),
    "pattern 2-4": (["prune", "{model}", "--out", "{tmp}/o", "--pattern", "2-4"], "2-4"),
    "unknown solver": (["prune", "{model}", "--out", "{tmp}/o", "--solver", "obc"], "'obc'"),
    "short text": (
        ["prune", "{model}", "--out", "{tmp}/o", "--calib", "{short}", "--seqlen", "64"],
        "fewer than one window",
    ),
    "missing text": (
        ["prune", "{model}", "--out", "{tmp}/o", "--calib", "{tmp}/none.txt"],
        "neither a file",
    ),
    "nsamples 0": (["prune", "{model}", "--out", "{tmp}/o", "--nsamples", "0"], "--nsamples"),
    "non-empty out": (["prune", "{model}", "--out", "{full}"], "--overwrite"),
    "out is model": (["prune", "{model}", "--out", "{model}", "--overwrite"], "overlaps"),
    "seqlen too long": (
        ["prune", "{model}", "--out", "{tmp}/o", "--seqlen", "4096"],
        "exceeds the model's context",
    ),
    "truncated weights": (["prune", "{truncated}", "--out", "{tmp}/o"], "corrupt safetensors"),
    "nan weights": (
        ["prune", "{nan}", "--out", "{tmp}/o", "--seqlen", "32", "--nsamples", "2"],
        "model.layers.1.mlp.up_proj.weight has NaN",
    ),
    "unwritable out": (["prune", "{model}", "--out", "/proc/prunella-out"], "cannot write"),
    "plan off target": (
        [
            "prune",
            "{model}",
            "--out",
            "{tmp}/o",
            "--allocation-file",
            "{tmp}/plan_off.json",
            "--seqlen",
            "32",
        ],
        "not the target",
    ),
    "plan unknown layer": (
        [
            "prune",
            "{model}",
            "--out",
            "{tmp}/o",
            "--allocation-file",
            "{tmp}/plan_unknown.json",
            "--seqlen",
            "32",
        ],
        "does not have",
    ),
    "recipe unknown key": (
        ["prune", "{model}", "--out", "{tmp}/o", "--recipe", "{tmp}/recipe_key.yaml"],
        "unknown key 'solvr'",
    ),
    "recipe wrong type": (
        ["prune", "{model}", "--out", "{tmp}/o", "--recipe", "{tmp}/recipe_type.yaml"],
        "nsamples",
    ),
    "offload value": (["prune", "{model}", "--out", "{tmp}/o", "--offload", "ram"], "--offload"),
    "eval missing data": (["eval", "{model}", "--data", "{tmp}/none.txt"], "neither a file"),
    "eval short data": (
        ["eval", "{model}", "--data", "{short}", "--seqlen", "64"],
        "fewer than one window",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_one_line_nothing_written(case, inputs, capsys):
    argv, needle = CASES[case]
    argv = [a.format(**inputs) for a in argv]
    before = tree_hash(Path(inputs["model"]))
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert lines and lines[-1].startswith("error: ") and needle in lines[-1], err
    assert "Traceback" not in err
    assert not (inputs["tmp"] / "o").exists()
    assert not (inputs["tmp"] / "o.partial").exists()
    assert (Path(inputs["full"]) / "keep.txt").read_text() == "precious"
    assert tree_hash(Path(inputs["model"])) == before


def test_named_dataset_without_network_is_a_clear_error(tiny_llama, tmp_path, capsys):
    code = main(
        [
            "prune",
            str(tiny_llama),
            "--out",
            str(tmp_path / "o"),
            "--calib",
            "wikitext2",
            "--seqlen",
            "32",
            "--nsamples",
            "2",
            "--quiet",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "wikitext2" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
