"""Long prunes that survive: resume after SIGKILL, streaming from disk, atomic outputs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES, build_checkpoint, tiny_config
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from prunella.cli import main

KILL_AFTER_BLOCK = """
import os, signal, sys
import prunella.engine.store as store
original = store.WorkDir.save_block
def save_block(self, index, *args):
    original(self, index, *args)
    if index == {block}:
        os.kill(os.getpid(), signal.SIGKILL)
store.WorkDir.save_block = save_block
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


def run_killed(argv: list[str], block: int, script: str = KILL_AFTER_BLOCK, **fields):
    return subprocess.run(
        [sys.executable, "-c", script.format(block=block, **fields), *argv],
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


def run_faulted(argv: list[str], fault: str) -> subprocess.CompletedProcess:
    """Run the real CLI in a child process that ``PRUNELLA_FAULT`` kills where it says."""
    return subprocess.run(
        [sys.executable, "-m", "prunella", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PRUNELLA_FAULT": fault},
    )


def assert_weights_equal(out: Path, reference: dict[str, torch.Tensor]) -> None:
    got = weights(out)
    assert got.keys() == reference.keys()
    for key, tensor in reference.items():
        assert torch.equal(got[key], tensor), key


@pytest.mark.parametrize("offload", ["none", "disk"])
@pytest.mark.parametrize("name", ["block-00002.safetensors", "hidden-00003.safetensors"])
def test_sigkill_while_writing_a_block_resumes_bit_identical(
    deep_llama, reference, tmp_path, offload, name
):
    """The process is killed by the writer itself, 1000 bytes into the file: the half file
    is on the disk under its temporary name, never under the final one."""
    out = tmp_path / "out"
    argv = args(deep_llama, out, "--offload", offload)
    killed = run_faulted(argv, f"bytes:{name}:1000")
    assert killed.returncode == -9, killed.stderr
    partial = tmp_path / "out.partial"
    folder = partial / "blocks" if name.startswith("block") else partial
    assert (folder / (name + ".tmp")).stat().st_size == 1000
    assert not (folder / name).exists()
    assert json.loads((partial / "state.json").read_text())["next_block"] == 2
    assert main([*argv, "--resume"]) == 0
    assert_weights_equal(out, reference)


@pytest.fixture(scope="module")
def previous(deep_llama, tmp_path_factory) -> Path:
    """A finished output of another recipe: what an ``--overwrite`` run replaces."""
    out = tmp_path_factory.mktemp("previous") / "out"
    assert main([*args(deep_llama, out), "--sparsity", "0.3"]) == 0
    return out


@pytest.mark.parametrize(
    "fault, whole",
    [
        ("bytes:model-00007-of-00007.safetensors:4096", "previous"),  # assembling a shard
        ("step:publish", "previous"),  # all written and flushed, not yet renamed
        ("step:published", "new"),  # renamed into place, the previous one not yet removed
    ],
)
def test_a_kill_while_publishing_leaves_one_whole_out(
    deep_llama, reference, previous, tmp_path, fault, whole
):
    """``--overwrite`` over a finished OUT, killed at each step of writing and renaming the
    output: OUT is the previous output or the new one, whole, never none; the next run
    finishes it (bit-identical) and removes what the killed one left beside OUT."""
    out = tmp_path / "out"
    shutil.copytree(previous, out)
    before = tree_hash(out)
    argv = args(deep_llama, out, "--offload", "disk", "--overwrite")
    killed = run_faulted(argv, fault)
    assert killed.returncode == -9, killed.stderr
    assert out.is_dir()
    if whole == "previous":
        assert tree_hash(out) == before
    else:
        assert tree_hash(out) != before
        assert_weights_equal(out, reference)
    assert [p.name for p in tmp_path.glob(".out.tmp-*")], "the kill left nothing to clean"
    assert main(argv) == 0
    assert_weights_equal(out, reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_files_and_folders_reach_the_disk_before_the_rename_that_publishes_them(
    deep_llama, tmp_path, monkeypatch
):
    """Every rename that publishes a file or the output folder comes after an fsync of what
    it publishes (each file, and each folder of the output tree), and is followed by an
    fsync of the folder it lands in."""
    events: list[tuple[str, ...]] = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, *a, **k):
        events.append(("rename", str(Path(src).resolve()), str(Path(dst).resolve())))
        return real_replace(src, dst, *a, **k)

    def rename(src, dst, *a, **k):
        events.append(("rename", str(Path(src).resolve()), str(Path(dst).resolve())))
        return real_rename(src, dst, *a, **k)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "rename", rename)
    out = tmp_path / "out"
    assert main(args(deep_llama, out, "--offload", "disk")) == 0
    renames = [(i, e[1], e[2]) for i, e in enumerate(events) if e[0] == "rename"]
    synced = [(i, e[1]) for i, e in enumerate(events) if e[0] == "fsync"]
    published = [r for r in renames if r[2] == str(out.resolve())]
    assert len(published) == 1, published
    at, tmp, _ = published[0]
    expected = {str(p.resolve()).replace(str(out.resolve()), tmp, 1) for p in out.rglob("*")}
    expected |= {tmp}
    assert expected <= {path for i, path in synced if i < at}
    assert (at + 1, str(out.resolve().parent)) in synced
    files = [r for r in renames if r[1].endswith(".tmp")]
    assert len(files) > 20  # every block, hidden state and JSON of the work folder
    for at, src, dst in files:
        assert any(path == src for i, path in synced if i < at), src
        assert (at + 1, str(Path(dst).parent)) in synced, dst


def test_abandoned_temporary_folders_are_removed_and_a_live_one_is_kept(deep_llama, tmp_path):
    """What a killed run left beside OUT goes at the next run; a folder that a live run
    holds the lock of stays."""
    import fcntl

    out = tmp_path / "out"
    killed_unlocked = tmp_path / ".out.tmp-killed"  # its lock file is there and free
    killed_unlocked.mkdir()
    (tmp_path / ".out.tmp-killed.lock").touch()
    killed_early = tmp_path / ".out.tmp-early"  # no lock file yet, two minutes old
    killed_early.mkdir()
    os.utime(killed_early, (time.time() - 120, time.time() - 120))
    live = tmp_path / ".out.tmp-live"
    live.mkdir()
    fd = os.open(tmp_path / ".out.tmp-live.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert main(args(deep_llama, out)) == 0
    finally:
        os.close(fd)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [".out.tmp-live", ".out.tmp-live.lock", "out"]


def test_resume_checks_the_input_weights_content(deep_llama, tmp_path, capsys):
    """A checkpoint rewritten in place (same names, shapes and sizes) is not resumed."""
    import shutil

    from safetensors.torch import save_file

    src = tmp_path / "src"
    shutil.copytree(deep_llama, src)
    out = tmp_path / "out"
    assert run_killed(args(src, out), block=1).returncode == -9
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.4.mlp.up_proj.weight"][0, 0] += 1.0
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    assert main(args(src, out)) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and ": weights was" in err, err


def test_nan_weights_stop_the_run_before_anything_is_written(
    tmp_path, tokenizer_dir, monkeypatch, capsys
):
    import prunella.engine.store as store

    src = build_checkpoint(tmp_path / "src", "llama", tokenizer_dir)
    tensors = load_file(src / "model.safetensors")
    tensors["model.layers.2.self_attn.o_proj.weight"][1, 1] = float("inf")
    from safetensors.torch import save_file

    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    started = []
    monkeypatch.setattr(store.WorkDir, "start", lambda self, *a: started.append(a))
    for offload in ("disk", "none"):
        out = tmp_path / f"out-{offload}"
        assert main(args(src, out, "--offload", offload)) == 2
        err = capsys.readouterr().err
        assert "model.layers.2.self_attn.o_proj.weight has NaN or Inf" in err, err
        assert not out.exists() and not out.with_name(out.name + ".partial").exists()
    assert started == []


def test_resume_with_different_arguments_is_refused(deep_llama, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_killed(args(deep_llama, out), block=0).returncode == -9
    argv = args(deep_llama, out)
    argv[argv.index("sparsegpt")] = "wanda"
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "solver.name was 'sparsegpt'" in err and "now 'wanda'" in err and "--restart" in err
    assert main([*argv, "--restart"]) == 0


def test_resume_without_a_partial_run_is_an_error(deep_llama, tmp_path, capsys):
    assert main(args(deep_llama, tmp_path / "out", "--resume")) == 2
    assert "nothing to resume" in capsys.readouterr().err


@pytest.mark.parametrize("family", FAMILIES)
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
    import prunella.engine.prune as engine

    seen = []
    original = engine.BlockPruner.__call__

    def spy(self, *a, **k):
        model_blocks = spy.blocks
        seen.append([i for i, b in enumerate(model_blocks) if not next(b.parameters()).is_meta])
        return original(self, *a, **k)

    import prunella.engine.store as store

    real_empty = store.empty_model

    def empty_model(path, dtype=None):
        model = real_empty(path, dtype)
        spy.blocks = model.model.layers
        return model

    monkeypatch.setattr(store, "empty_model", empty_model)
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

    import prunella.io.folders as folders

    usage = real_shutil.disk_usage(tmp_path)
    monkeypatch.setattr(folders.shutil, "disk_usage", lambda path: usage._replace(free=10_000))
    assert main(args(deep_llama, tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "not enough disk space" in err and "GiB" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_short_disk_at_the_end_keeps_the_finished_work(deep_llama, tmp_path, monkeypatch, capsys):
    import prunella.pipeline as pipeline
    from prunella.errors import PrunellaError

    real = pipeline.save_store

    def full_disk(*a, **k):
        raise PrunellaError("not enough disk space in /x: the checkpoint needs 1 GiB")

    monkeypatch.setattr(pipeline, "save_store", full_disk)
    assert main(args(deep_llama, tmp_path / "out")) == 2
    assert "re-run the same command" in capsys.readouterr().err
    assert (tmp_path / "out.partial" / "state.json").is_file()
    monkeypatch.setattr(pipeline, "save_store", real)
    assert main(args(deep_llama, tmp_path / "out")) == 0
    report = json.loads((tmp_path / "out" / "prune_report.json").read_text())
    assert report["resumed_from_block"] == 6


# After block 1 is recorded, the disk under OUT fills up (a ballast file takes every free
# byte), or its file system turns read-only: the real errors of the next write.
DISK_FAULT_AFTER_BLOCK_1 = """
import os, subprocess, sys
import prunella.engine.store as store
original = store.WorkDir.save_block
def save_block(self, index, *args):
    original(self, index, *args)
    if index == 1 and "{fault}" == "full":
        with open("{ballast}", "wb") as f:
            try:
                while True:
                    f.write(bytes(1 << 16))
                    f.flush()
            except OSError:
                pass
    if index == 1 and "{fault}" == "read-only":
        subprocess.run(["mount", "-o", "remount,ro", "{mount}"], check=True)
store.WorkDir.save_block = save_block
from prunella.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture
def small_disk(tmp_path):
    """A real 64 MiB file system (tmpfs), mounted for the test: CI runs as root."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_a_full_or_read_only_disk_is_one_line_and_keeps_the_finished_blocks(
    deep_llama, reference, small_disk, fault
):
    out = small_disk / "out"
    ballast = small_disk / "ballast"
    argv = args(deep_llama, out, "--offload", "disk")
    script = DISK_FAULT_AFTER_BLOCK_1.format(fault=fault, ballast=ballast, mount=small_disk)
    done = subprocess.run(
        [sys.executable, "-c", script, *argv], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    what = "no space left on the disk" if fault == "full" else "read-only file system"
    assert lines[0].startswith("error: ") and what in lines[0], lines[0]
    assert f"the finished blocks are kept in {small_disk / 'out.partial'}" in lines[0]
    partial = small_disk / "out.partial"
    assert json.loads((partial / "state.json").read_text())["next_block"] == 2
    assert not out.exists() and not list(partial.rglob("*.tmp"))
    if fault == "full":
        ballast.unlink()
    else:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    assert main(argv) == 0
    assert_weights_equal(out, reference)
    report = json.loads((out / "prune_report.json").read_text())
    assert report["resumed_from_block"] == 2


def test_a_read_only_output_folder_is_refused_before_any_work(deep_llama, small_disk, capsys):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    try:
        assert main(args(deep_llama, small_disk / "out")) == 2
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "Read-only file system" in err[0], err
    assert list(small_disk.iterdir()) == []


def test_recipe_round_trip(deep_llama, tmp_path):
    """The recipe written with the output reproduces the run exactly."""
    assert main(args(deep_llama, tmp_path / "a")) == 0
    recipe = (tmp_path / "a" / "recipe.yaml").read_text()
    import yaml

    loaded = yaml.safe_load(recipe)
    assert loaded["sparsity"] == 0.6
    solver = {"name": "sparsegpt", "options": {"blocksize": 128, "percdamp": 0.01}}
    assert loaded["solver"] == solver
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


def test_a_structure_cut_then_pruned_resumes_to_the_same_model(deep_llama, tmp_path):
    """--params cuts the model before the block loop; a killed run re-cuts it (the same
    cut: same windows, same statistics) and resumes the pruning of the smaller blocks."""
    extra = ("--params", "0.8", "--fitness-tokens", "96")
    reference = tmp_path / "reference"
    assert main(args(deep_llama, reference, *extra)) == 0
    out = tmp_path / "out"
    killed = run_killed(args(deep_llama, out, *extra), block=2)
    assert killed.returncode == -9, killed.stderr
    assert main(args(deep_llama, out, *extra, "--resume")) == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert report["resumed_from_block"] == 3
    assert report["structure"]["kept_fraction"] <= 0.8
    assert_weights_equal(out, weights(reference))
