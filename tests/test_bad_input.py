"""Bad input ends in one line: the whole of stderr is one ``error:`` line that names the
fault, the exit status is 2, and nothing is written (no OUT, no OUT.partial, the input
untouched). A plan made for another model is one ``warning:`` line, and the run goes on.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from conftest import build_checkpoint, tiny_config
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import prunella.engine.store as store
from prunella.cli import main
from prunella.io.checkpoint import check_dense
from prunella.io.pack import pack

FIXTURES = Path(__file__).parent / "fixtures"
SMALL = ["--nsamples", "2", "--seqlen", "32", "--quiet"]
EVALUATED = ["--seqlen", "32", "--max-windows", "2", "--quiet"]


def command_line(command: str, model: Path, out: Path) -> list:
    """``command`` on ``model`` with small, valid settings (``--out`` where it writes)."""
    return {
        "prune": ["prune", model, "--out", out, *SMALL],
        "heapr": ["heapr", model, "--out", out, *SMALL],
        "allocate": ["allocate", model, *SMALL],
        "eval": ["eval", model, *EVALUATED],
        "compare": ["compare", model, *EVALUATED],
        "inspect": ["inspect", model],
    }[command]


@pytest.fixture(scope="module")
def model(tmp_path_factory, tokenizer_dir) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("model"), "llama", tokenizer_dir)


@pytest.fixture
def started(monkeypatch) -> list:
    """The runs that got as far as creating OUT.partial (none should, for a bad input)."""
    calls: list = []
    original = store.WorkDir.start

    def start(self, *args) -> None:
        calls.append(self.path)
        original(self, *args)

    monkeypatch.setattr(store.WorkDir, "start", start)
    return calls


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file of ``folder``: its SHA-256 and modification time, by relative path."""
    return {
        str(f.relative_to(folder)): (
            hashlib.sha256(f.read_bytes()).hexdigest(),
            f.stat().st_mtime_ns,
        )
        for f in sorted(folder.rglob("*"))
        if f.is_file()
    }


def cli(argv: list) -> int:
    """The exit status of ``prunella ARGV`` (paths given as they are)."""
    return main([str(a) for a in argv])


def one_error(capsys, argv: list[str], *needles: str) -> str:
    """Run the CLI; check that it fails with status 2 and that its whole stderr is one
    ``error:`` line holding every needle (and stdout is empty); return that line."""
    code = cli(argv)
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert captured.out == ""
    return lines[0]


def nothing_written(out: Path) -> bool:
    return not out.exists() and not out.with_name(out.name + ".partial").exists()


def copy(model: Path, to: Path) -> Path:
    shutil.copytree(model, to)
    return to


def edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))


def rewrite_header(file: Path, edit) -> None:
    """Replace the JSON header of a safetensors file by ``edit(header)`` (bytes or a
    mapping), with a valid length prefix; the data is kept."""
    raw = file.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = edit(json.loads(raw[8 : 8 + length]))
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + length :])


def last_tensor_past_the_end(header: dict) -> dict:
    key = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])
    start, end = header[key]["data_offsets"]
    header[key]["data_offsets"] = [start + 2**20, end + 2**20]
    return header


def shape_beyond_the_data(header: dict) -> dict:
    header["model.layers.1.mlp.up_proj.weight"]["shape"] = [10**6, 64]
    return header


HEADERS = {
    "not json": lambda header: b"{this is not json" + b" " * 15,
    "offsets past the end": last_tensor_past_the_end,
    "shape beyond its bytes": shape_beyond_the_data,
}


@pytest.mark.parametrize("case", list(HEADERS))
@pytest.mark.parametrize("command", ["prune", "eval"])
def test_a_corrupt_safetensors_header_is_one_line(model, tmp_path, capsys, started, case, command):
    bad = copy(model, tmp_path / "bad")
    rewrite_header(bad / "model.safetensors", HEADERS[case])
    out = tmp_path / "out"
    argv = command_line(command, bad, out)
    one_error(capsys, argv, f"corrupt safetensors file {bad / 'model.safetensors'}")
    assert nothing_written(out) and started == []


def test_a_missing_shard_is_one_line(model, tmp_path, capsys, started):
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(model).save_pretrained(sharded, max_shard_size="200KB")
    AutoTokenizer.from_pretrained(model).save_pretrained(sharded)
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    out = tmp_path / "out"
    one_error(
        capsys,
        ["prune", sharded, "--out", out, *SMALL],
        f"lists {shards[1].name}, which is missing",
    )
    assert nothing_written(out) and started == []


def test_a_missing_tokenizer_is_one_line(model, tmp_path, capsys, started):
    bare = copy(model, tmp_path / "bare")
    for file in bare.glob("tokenizer*"):
        file.unlink()
    out = tmp_path / "out"
    one_error(capsys, ["prune", bare, "--out", out, *SMALL], f"{bare} has no tokenizer")
    assert nothing_written(out) and started == []


@pytest.mark.parametrize("command", ["prune", "eval"])
def test_a_tokenizer_with_a_larger_vocabulary_is_one_line(
    tmp_path, tokenizer_dir, capsys, started, command
):
    config = tiny_config("llama")
    config.vocab_size = 256  # the tokenizer has 384 tokens
    small = tmp_path / "small"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(small)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(small)
    out = tmp_path / "out"
    argv = command_line(command, small, out)
    line = one_error(
        capsys, argv, "the model embeds only 256 tokens", "the tokenizer is not this model's"
    )
    assert int(line.split("token id ")[1].split(",")[0]) >= 256
    assert nothing_written(out) and started == []


def int8_weight(path: Path) -> None:
    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"].to(
        torch.int8
    )
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def fp8_weight(path: Path) -> None:
    tensors = load_file(path / "model.safetensors")
    weight = tensors["model.layers.2.self_attn.o_proj.weight"]
    tensors["model.layers.2.self_attn.o_proj.weight"] = weight.to(torch.float8_e4m3fn)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


QUANTIZED = {
    "int8 weight": (int8_weight, "model.layers.0.mlp.up_proj.weight is stored as I8"),
    "fp8 weight": (fp8_weight, "model.layers.2.self_attn.o_proj.weight is stored as F8_E4M3"),
    "gptq config": (
        lambda path: edit_config(
            path, quantization_config={"quant_method": "gptq", "bits": 4, "group_size": 128}
        ),
        "quant_method 'gptq'",
    ),
    "compressed-tensors config": (
        lambda path: edit_config(
            path,
            quantization_config={
                "quant_method": "compressed-tensors",
                "format": "pack-quantized",
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 4}}},
            },
        ),
        "quant_method 'compressed-tensors'",
    ),
}


@pytest.mark.parametrize("case", list(QUANTIZED))
@pytest.mark.parametrize("command", ["prune", "allocate"])
def test_an_already_quantized_checkpoint_is_one_line(
    model, tmp_path, capsys, started, case, command
):
    make, needle = QUANTIZED[case]
    bad = copy(model, tmp_path / "quantized")
    make(bad)
    out = tmp_path / "out"
    argv = command_line(command, bad, out)
    one_error(
        capsys,
        argv,
        f"{bad} is already quantized",
        needle,
        "needs a dense (unquantized) checkpoint",
    )
    assert nothing_written(out) and started == []


def test_prunellas_own_quantized_output_is_read_but_not_compressed_again(model, tmp_path, capsys):
    quantized = tmp_path / "int4"
    assert cli(["prune", model, "--out", quantized, "--bits", "4", *SMALL]) == 0
    capsys.readouterr()
    before = snapshot(quantized)
    for command in ("prune", "allocate"):
        out = tmp_path / f"again-{command}"
        argv = command_line(command, quantized, out)
        one_error(capsys, argv, "is already quantized", "quant_method 'compressed-tensors'")
        assert nothing_written(out)
    assert cli(["inspect", quantized, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "compressed-tensors"
    assert (
        cli(["eval", quantized, "--seqlen", "32", "--max-windows", "2", "--json", "--quiet"]) == 0
    )
    assert json.loads(capsys.readouterr().out)["perplexity"] > 1
    assert snapshot(quantized) == before


def test_packed_checkpoints_are_not_taken_for_quantized_ones(model, tmp_path):
    pack(model, tmp_path / "packed", progress=False)
    check_dense(tmp_path / "packed")  # Prunella's sparse-bitmask
    check_dense(FIXTURES / "legacy_sparse_bitmask")  # llm-compressor's


@pytest.mark.parametrize("command", ["prune", "allocate", "eval"])
def test_nan_in_bfloat16_weights_is_one_line(tmp_path, tokenizer_dir, capsys, started, command):
    src = build_checkpoint(tmp_path / "src", "llama", tokenizer_dir, dtype=torch.bfloat16)
    tensors = load_file(src / "model.safetensors")
    assert tensors["model.layers.1.mlp.up_proj.weight"].dtype == torch.bfloat16
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    argv = command_line(command, src, out)
    one_error(capsys, argv, "tensor model.layers.1.mlp.up_proj.weight has NaN or Inf values")
    assert nothing_written(out) and started == []


@pytest.fixture(scope="module")
def overflowing(tmp_path_factory, model) -> Path:
    """Finite weights whose activations overflow float32 in block 1: a norm scaled by
    1e30 feeds the MLP inputs whose squares (and products) are past float32's range."""
    path = tmp_path_factory.mktemp("overflowing")
    hf_model = AutoModelForCausalLM.from_pretrained(model)
    with torch.no_grad():
        hf_model.model.layers[1].post_attention_layernorm.weight.fill_(1e30)
    hf_model.save_pretrained(path)
    AutoTokenizer.from_pretrained(model).save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "solver, passes",
    [("sparsegpt", "1"), ("wanda", "2"), ("magnitude", "1"), ("magnitude", "2")],
)
def test_nan_activations_stop_the_run_naming_the_block(
    overflowing, tmp_path, capsys, solver, passes
):
    """The statistics (a Hessian, column norms) or the block's output are not finite:
    the run stops in block 1, and the work folder it had started is removed."""
    out = tmp_path / "out"
    argv = ["prune", overflowing, "--out", out, "--solver", solver, "--passes", passes, *SMALL]
    one_error(capsys, argv, "NaN or Inf activations in block 1", "numerically broken")
    assert nothing_written(out)


@pytest.mark.parametrize("command", ["prune", "eval", "inspect"])
def test_an_architecture_of_remote_code_is_one_line(model, tmp_path, capsys, started, command):
    remote = copy(model, tmp_path / "remote")
    edit_config(
        remote,
        model_type="prunella_custom",
        architectures=["CustomForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_custom.CustomConfig",
            "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM",
        },
    )
    (remote / "modeling_custom.py").write_text("raise SystemExit('this code must never run')\n")
    out = tmp_path / "out"
    argv = command_line(command, remote, out)
    one_error(
        capsys, argv, f"{remote} needs remote code", "'prunella_custom'", "--trust-remote-code"
    )
    assert nothing_written(out) and started == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
@pytest.mark.parametrize("command", ["prune", "allocate", "eval", "compare", "heapr"])
def test_device_cuda_without_a_gpu_is_one_line(model, tmp_path, capsys, started, command):
    out = tmp_path / "out"
    argv = [*command_line(command, model, out), "--device", "cuda"]
    one_error(capsys, argv, "--device cuda", "no CUDA GPU")
    assert nothing_written(out) and started == []


def test_a_plan_for_another_model_is_one_warning_line(model, tmp_path, tokenizer_dir, capsys):
    """Same layer names, other weights: the plan is used, after one warning line. A plan
    of the same model, or an older plan file without a fingerprint, says nothing."""
    other = build_checkpoint(tmp_path / "other", "llama", tokenizer_dir, seed=1)
    plan_file = tmp_path / "plan.json"
    assert cli(["allocate", model, "--json", plan_file, "--quiet"]) == 0
    capsys.readouterr()
    plan = json.loads(plan_file.read_text())
    assert len(plan["model_fingerprint"]) == 40
    old = tmp_path / "old.json"
    old.write_text(json.dumps({k: v for k, v in plan.items() if k != "model_fingerprint"}))
    for i, (src, file, warned) in enumerate(
        [(other, plan_file, True), (model, plan_file, False), (other, old, False)]
    ):
        out = tmp_path / f"out{i}"
        assert cli(["prune", src, "--out", out, "--allocation-file", file, *SMALL]) == 0
        captured = capsys.readouterr()
        assert (out / "prune_report.json").is_file()
        if warned:
            lines = captured.err.splitlines()
            assert len(lines) == 1 and lines[0].startswith("warning: "), captured.err
            assert f"allocation file {file} was made for another model than {src}" in lines[0]
        else:
            assert captured.err == ""


def test_the_input_folder_is_never_modified(model, tmp_path, tokenizer_dir, capsys):
    """pack, unpack, heapr, eval and compare read their inputs and write only OUT."""
    moe = build_checkpoint(tmp_path / "moe", "mixtral", tokenizer_dir)
    commands = [
        ["pack", model, "--out", tmp_path / "packed", "--quiet"],
        ["unpack", tmp_path / "packed", "--out", tmp_path / "unpacked", "--quiet"],
        ["heapr", moe, "--out", tmp_path / "heapr", "--ratio", "0.5", *SMALL],
        ["eval", model, *EVALUATED],
        ["compare", model, tmp_path / "packed", *EVALUATED],
    ]
    for argv in commands:
        inputs = [Path(a) for a in argv[1:] if isinstance(a, Path) and a.is_dir()]
        before = {path: snapshot(path) for path in inputs}
        assert cli(argv) == 0, capsys.readouterr().err
        for path in inputs:
            assert snapshot(path) == before[path], (argv[0], path)
    capsys.readouterr()
