"""Long prunes that survive: resume after SIGKILL, streaming from disk, atomic outputs."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_checkpoint, tiny_config
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from prunella.cli import main

KILL_AFTER_BLOCK = """
import os, signal, sys
import prunella.resume as resume
original = resume.WorkDir.save_block
def save_block(self, index, *args):
    original(self, index, *args)
    if index == {block}:
        os.kill(os.getpid(), signal.SIGKILL)
resume.WorkDir.save_block = save_block
from prunella.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory, tokenizer_dir) -> Path:
    """A tiny Llama with 6 blocks, so a run can be cut in the middle."""
    from transformers import AutoTokenizer

    config = tiny_config("llama")
    config.num_hidden_layers = 6
    path = tmp_path_factory.mktemp("deep")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    return path


def tree_hash(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + file.read_bytes())
    return digest.hexdigest()


def weights(path: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def args(model: Path, out: Path, *extra: str) -> list[str]:
    return [
        "prune",
        str(model),
        "--out",
        str(out),
        "--solver",
        "sparsegpt",
        "--allocation",
        "owl",
        "--sparsity",
        "0.6",
        "--nsamples",
        "6",
        "--seqlen",
        "48",
        "--batch-size",
        "2",
        "--quiet",
        *extra,
    ]


def run_killed(argv: list[str], block: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", KILL_AFTER_BLOCK.format(block=block), *argv],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def reference(deep_llama, tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("ref") / "out"
    assert main(args(deep_llama, out)) == 0
    return weights(out)


@pytest.mark.parametrize("first, second", [("none", "none"), ("disk", "disk"), ("none", "disk")])
def test_sigkill_then_resume_gives_the_same_model(deep_llama, reference, tmp_path, first, second):
    before = tree_hash(deep_llama)
    out = tmp_path / "out"
    killed = run_killed(args(deep_llama, out, "--offload", first), block=2)
    assert killed.returncode == -9, killed.stderr
    partial = tmp_path / "out.partial"
    assert not out.exists(), "no half-written output folder"
    assert json.loads((partial / "state.json").read_text())["next_block"] == 3
    assert len(list((partial / "blocks").glob("*.safetensors"))) == 3

    assert main(args(deep_llama, out, "--offload", second, "--resume")) == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert report["resumed_from_block"] == 3
    assert len(report["layers"]) == 6 * 7
    resumed = weights(out)
    assert resumed.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(resumed[name], tensor), name
    assert not partial.exists()
    assert tree_hash(deep_llama) == before


def test_resume_with_different_arguments_is_refused(deep_llama, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_killed(args(deep_llama, out), block=0).returncode == -9
    argv = args(deep_llama, out)
    argv[argv.index("sparsegpt")] = "wanda"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "solver was 'sparsegpt'" in err and "now 'wanda'" in err and "--restart" in err
    assert main([*argv, "--restart"]) == 0


def test_resume_without_a_partial_run_is_an_error(deep_llama, tmp_path, capsys):
    assert main(args(deep_llama, tmp_path / "out", "--resume")) == 2
    assert "nothing to resume" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "opt"])
def test_streamed_prune_equals_in_memory_prune(family, tmp_path, tokenizer_dir):
    src = build_checkpoint(tmp_path / "src", family, tokenizer_dir)
    common = ["--nsamples", "4", "--seqlen", "32", "--quiet"]
    assert (
        main(["prune", str(src), "--out", str(tmp_path / "mem"), "--offload", "none", *common]) == 0
    )
    assert (
        main(["prune", str(src), "--out", str(tmp_path / "disk"), "--offload", "disk", *common])
        == 0
    )
    mem, disk = weights(tmp_path / "mem"), weights(tmp_path / "disk")
    assert mem.keys() == disk.keys()
    for name, tensor in mem.items():
        assert torch.equal(disk[name], tensor), name
    index = json.loads((tmp_path / "disk" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3 + 1  # one shard per block, one for the rest


def test_streamed_run_keeps_one_block_in_memory(deep_llama, tmp_path, monkeypatch):
    """While block i is pruned, no other block has its parameters in memory."""
    import prunella.engine as engine

    seen = []
    original = engine.BlockPruner.__call__

    def spy(self, *a, **k):
        model_blocks = spy.blocks
        seen.append([i for i, b in enumerate(model_blocks) if not next(b.parameters()).is_meta])
        return original(self, *a, **k)

    import prunella.streaming as streaming

    real_empty = streaming.empty_model

    def empty_model(path, dtype=None):
        model = real_empty(path, dtype)
        spy.blocks = model.model.layers
        return model

    monkeypatch.setattr(streaming, "empty_model", empty_model)
    monkeypatch.setattr(engine.BlockPruner, "__call__", spy)
    for passes in ("1", "2"):
        out = tmp_path / f"out{passes}"
        assert main(args(deep_llama, out, "--offload", "disk", "--passes", passes)) == 0
    assert len(seen) == 12 and all(len(loaded) == 1 for loaded in seen), seen


def test_block_files_hold_checkpoint_keys(deep_llama, tmp_path):
    out = tmp_path / "out"
    assert run_killed(args(deep_llama, out), block=1).returncode == -9
    keys = load_file(tmp_path / "out.partial" / "blocks" / "block-00001.safetensors").keys()
    assert all(k.startswith("model.layers.1.") for k in keys) and len(keys) == 9


def test_short_disk_is_refused_before_writing(deep_llama, tmp_path, monkeypatch, capsys):
    import shutil as real_shutil

    import prunella.export as export

    usage = real_shutil.disk_usage(tmp_path)
    monkeypatch.setattr(export.shutil, "disk_usage", lambda path: usage._replace(free=10_000))
    assert main(args(deep_llama, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "not enough disk space" in err and "GiB" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_short_disk_at_the_end_keeps_the_finished_work(deep_llama, tmp_path, monkeypatch, capsys):
    import prunella.export as export

    real = export.save, export.save_streamed

    def full_disk(*a, **k):
        raise export.PrunellaError("not enough disk space in /x: the checkpoint needs 1 GiB")

    monkeypatch.setattr(export, "save", full_disk)  # in memory
    monkeypatch.setattr(export, "save_streamed", full_disk)  # streamed (the default)
    assert main(args(deep_llama, tmp_path / "out")) == 2
    assert "re-run the same command" in capsys.readouterr().err
    assert (tmp_path / "out.partial" / "state.json").is_file()
    monkeypatch.setattr(export, "save", real[0])
    monkeypatch.setattr(export, "save_streamed", real[1])
    assert main(args(deep_llama, tmp_path / "out")) == 0
    report = json.loads((tmp_path / "out" / "prune_report.json").read_text())
    assert report["resumed_from_block"] == 6


def test_recipe_round_trip(deep_llama, tmp_path):
    """The recipe written with the output reproduces the run exactly."""
    assert main(args(deep_llama, tmp_path / "a")) == 0
    recipe = (tmp_path / "a" / "recipe.yaml").read_text()
    assert "sparsity: 0.6" in recipe and "solver: sparsegpt" in recipe
    assert (
        main(
            [
                "prune",
                "--recipe",
                str(tmp_path / "a" / "recipe.yaml"),
                "--out",
                str(tmp_path / "b"),
                "--quiet",
            ]
        )
        == 0
    )
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
