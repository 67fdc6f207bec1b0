"""Packed checkpoints: exact round trips, legacy compressed-tensors files, corruption."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build_checkpoint
from safetensors.torch import load_file

import prunella
from prunella.cli import main
from prunella.errors import PrunellaError
from prunella.io.pack import pack, unpack
from prunella.report.summary import checkpoint_summary

FIXTURES = Path(__file__).parent / "fixtures"


def pruned_checkpoint(tmp_path, tokenizer_dir, dtype, pattern) -> Path:
    src = build_checkpoint(tmp_path / f"dense-{dtype}", "llama", tokenizer_dir, dtype=dtype)
    out = tmp_path / f"pruned-{dtype}-{pattern.replace(':', '')}"
    argv = [
        "prune",
        str(src),
        "--out",
        str(out),
        "--solver",
        "wanda",
        "--pattern",
        pattern,
        "--nsamples",
        "2",
        "--seqlen",
        "32",
        "--quiet",
    ]
    if pattern == "unstructured":
        argv += ["--sparsity", "0.7"]
    assert main(argv) == 0
    return out


def file_with(folder: Path, key: str) -> Path:
    """The shard of ``folder`` that holds tensor ``key``."""
    for file in sorted(folder.glob("*.safetensors")):
        if key in load_file(file):
            return file
    raise KeyError(key)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_pack_then_unpack_is_bit_exact(tmp_path, tokenizer_dir, dtype, pattern):
    pruned = pruned_checkpoint(tmp_path, tokenizer_dir, dtype, pattern)
    stats = pack(pruned, tmp_path / "packed", progress=False)
    assert stats["bytes"] < stats["dense_bytes"]
    unpack(tmp_path / "packed", tmp_path / "back", progress=False)
    before, after = tensors(pruned), tensors(tmp_path / "back")
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), name
    config = json.loads((tmp_path / "packed" / "config.json").read_text())
    sparsity = config["quantization_config"]["sparsity_config"]
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert sparsity["format"] == "sparse-bitmask"
    assert sparsity["sparsity_structure"] == ("2:4" if pattern == "2:4" else "unstructured")
    assert "quantization_config" not in json.loads((tmp_path / "back" / "config.json").read_text())


def test_packed_layout_is_compressed_tensors_sparse_bitmask(tmp_path, tokenizer_dir):
    pruned = pruned_checkpoint(tmp_path, tokenizer_dir, torch.float32, "unstructured")
    pack(pruned, tmp_path / "packed", progress=False)
    packed = tensors(tmp_path / "packed")
    prefix = "model.layers.0.mlp.up_proj"
    assert {f"{prefix}.{p}" for p in ("compressed", "bitmask", "shape", "row_offsets")} <= set(
        packed
    )
    assert f"{prefix}.weight" not in packed and "model.embed_tokens.weight" in packed
    assert packed[f"{prefix}.bitmask"].dtype == torch.uint8
    assert packed[f"{prefix}.shape"].tolist() == [128, 64]
    dense = tensors(pruned)[f"{prefix}.weight"]
    assert packed[f"{prefix}.compressed"].numel() == (dense != 0).sum()


@pytest.mark.parametrize("fmt", ["sparse_bitmask", "sparse_24_bitmask"])
def test_legacy_compressed_tensors_fixture_unpacks_to_its_weights(tmp_path, fmt):
    """Fixtures written by compressed-tensors 0.14.0.1 (tests/fixtures/make_legacy_fixtures.py)."""
    unpack(FIXTURES / f"legacy_{fmt}", tmp_path / "dense", progress=False)
    got = tensors(tmp_path / "dense")
    expected = load_file(FIXTURES / f"legacy_{fmt}.expected.safetensors")
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor), name
    summary = checkpoint_summary(FIXTURES / f"legacy_{fmt}")
    assert summary["format"] == fmt.replace("_", "-")
    assert len(summary["layers"]) == 7
    if fmt == "sparse_24_bitmask":
        assert {layer["pattern"] for layer in summary["layers"]} == {"2:4"}


def test_load_inflates_packed_checkpoints(tmp_path, tokenizer_dir):
    pruned = pruned_checkpoint(tmp_path, tokenizer_dir, torch.bfloat16, "2:4")
    pack(pruned, tmp_path / "packed", progress=False)
    model, tokenizer = prunella.load(tmp_path / "packed")
    reference, _ = prunella.load(pruned)
    for (name, p), q in zip(
        model.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        assert torch.equal(p, q), name
    assert tokenizer is not None


def corrupt(file: Path, where: str) -> None:
    data = bytearray(file.read_bytes())
    header = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8 : 8 + header])
    start, _ = meta[where]["data_offsets"]
    data[8 + header + start] ^= 0x10
    file.write_bytes(bytes(data))


def test_corrupt_packed_files_are_errors(tmp_path, tokenizer_dir):
    pruned = pruned_checkpoint(tmp_path, tokenizer_dir, torch.float32, "unstructured")
    pack(pruned, tmp_path / "packed", progress=False)
    key = "model.layers.1.mlp.down_proj.compressed"
    file = file_with(tmp_path / "packed", key)
    good = file.read_bytes()

    corrupt(file, key)  # a value byte: checksum
    with pytest.raises(PrunellaError, match="checksum"):
        unpack(tmp_path / "packed", tmp_path / "a", progress=False)

    file.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(PrunellaError, match="corrupt safetensors"):
        unpack(tmp_path / "packed", tmp_path / "b", progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_corrupt_legacy_bitmask_is_an_error(tmp_path):
    import shutil

    legacy = tmp_path / "legacy"
    shutil.copytree(FIXTURES / "legacy_sparse_bitmask", legacy)
    corrupt(legacy / "model.safetensors", "model.layers.0.mlp.up_proj.bitmask")
    with pytest.raises(PrunellaError, match="bitmask"):
        unpack(legacy, tmp_path / "out", progress=False)


def test_cli_pack_unpack_inspect(tmp_path, tokenizer_dir, capsys):
    pruned = pruned_checkpoint(tmp_path, tokenizer_dir, torch.float32, "2:4")
    assert main(["pack", str(pruned), "--out", str(tmp_path / "p"), "--quiet"]) == 0
    assert "packed" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "p"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == "sparse-bitmask" and summary["sparsity"] == pytest.approx(0.5)
    assert {layer["pattern"] for layer in summary["layers"]} == {"2:4"}
    assert main(["unpack", str(tmp_path / "p"), "--out", str(tmp_path / "d"), "--quiet"]) == 0
    assert main(["unpack", str(pruned), "--out", str(tmp_path / "e")]) == 2
    assert "not a packed checkpoint" in capsys.readouterr().err


def test_prune_can_save_packed(tmp_path, tokenizer_dir):
    src = build_checkpoint(tmp_path / "src", "llama", tokenizer_dir)
    assert (
        main(
            [
                "prune",
                str(src),
                "--out",
                str(tmp_path / "o"),
                "--save-format",  # the flag's and the value's earlier names
                "packed",
                "--nsamples",
                "2",
                "--seqlen",
                "32",
                "--quiet",
            ]
        )
        == 0
    )
    out = tmp_path / "o"
    assert json.loads((out / "config.json").read_text())["quantization_config"]
    for name in ("prune_report.json", "report.html", "recipe.yaml", "allocation.png"):
        assert (out / name).is_file(), name
    assert "format: sparse-bitmask" in (out / "recipe.yaml").read_text()


def test_a_recipe_with_the_old_save_format_key_still_reads(tmp_path):
    from prunella.recipe import build

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: m\nsparsity: 0.5\nsave_format: packed\n")
    assert build(recipe).format == "sparse-bitmask"
    assert build(model="m", save_format="dense").format == "hf"
    recipe.write_text("model: m\nsave_format: packed\nformat: hf\n")
    with pytest.raises(PrunellaError, match="give format or save_format"):
        build(recipe)
