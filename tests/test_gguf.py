"""GGUF output: the file transformers' GGUF reader (and llama.cpp) loads, with the
weights and tokenizer of the checkpoint it came from."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import build_checkpoint, tiny_config
from gguf import GGMLQuantizationType, GGUFReader, dequantize, quants
from transformers import AutoModelForCausalLM, AutoTokenizer

import prunella
from prunella.cli import main
from prunella.io.gguf_file import write_gguf

TEXT = "The quick brown fox jumps over the lazy dog 12345, and then it rests."


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def gguf_model(file):
    return AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name,
                                                dtype=torch.float32)  # fmt: skip


def round_trip(weight: torch.Tensor, kind: str) -> torch.Tensor:
    """What GGML type ``kind`` holds of ``weight`` (the gguf package's own quantizer)."""
    qtype = GGMLQuantizationType[kind.upper()]
    data = quants.quantize(weight.float().numpy(), qtype)
    return torch.from_numpy(np.array(dequantize(data, qtype))).reshape(weight.shape)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_an_f32_file_loads_with_the_checkpoints_logits_and_tokenizer(family, tmp_path,
                                                                      tokenizer_dir):  # fmt: skip
    """F32 keeps every weight: the logits are the checkpoint's, so the names, the q/k
    permutation (llama) and the hyper-parameters are right; the tokenizer in the file
    splits text as the checkpoint's does."""
    src = build_checkpoint(tmp_path / "src", family, tokenizer_dir)
    if family == "qwen3":  # transformers' GGUF reader takes Qwen3's head_dim as 128, the
        # released models' (llama.cpp reads attention.key_length, which the file has)
        config = json.loads((src / "config.json").read_text())
        model = AutoModelForCausalLM.from_config(tiny_config("qwen3").__class__(
            **{**config, "head_dim": 128}))  # fmt: skip
        model.save_pretrained(src)
    file = tmp_path / "model.gguf"
    summary = write_gguf(src, file, "f32")
    assert set(summary["types"].values()) == {"f32"}
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    reference = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    torch.testing.assert_close(logits(gguf_model(file), ids), logits(reference, ids),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    ours = AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    theirs = AutoTokenizer.from_pretrained(src)
    assert ours(TEXT)["input_ids"] == theirs(TEXT)["input_ids"]
    fields = GGUFReader(file).fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    # llama.cpp's own name of GPT-2's split (llama-vocab.cpp): it stops at "gpt2"
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert fields["general.architecture"].contents() == {"llama": "llama"}.get(family, family)


@pytest.mark.parametrize("kind", ["q8_0", "q4_0", "q5_1"])
def test_quantized_types_hold_what_ggml_rounds_to(kind, tiny_llama, tmp_path):
    """Each block weight in ``kind``, the embeddings and head in Q8_0: the loaded model's
    logits are those of the checkpoint with each weight rounded through that type."""
    file = tmp_path / "model.gguf"
    summary = write_gguf(tiny_llama, file, kind)
    types = summary["types"]
    assert types["blk.0.attn_q.weight"] == kind and types["token_embd.weight"] == "q8_0"
    assert types["blk.0.attn_norm.weight"] == "f32" and summary["f16_fallbacks"] == 0
    expected = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with torch.no_grad():
        for name, param in expected.named_parameters():
            if param.dim() == 2:
                edge = "embed_tokens" in name or "lm_head" in name
                param.copy_(round_trip(param, "q8_0" if edge else kind))
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits(gguf_model(file), ids), logits(expected, ids),
                               rtol=1e-4, atol=1e-4)  # fmt: skip
    bytes_per_weight = {"q8_0": 34 / 32, "q4_0": 18 / 32, "q5_1": 24 / 32}[kind]
    reader = GGUFReader(file)
    q = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    assert q.n_bytes == q.n_elements * bytes_per_weight


def test_prune_writes_gguf_that_eval_inspect_and_compare_read(tiny_llama, tmp_path, capsys):
    """``--format gguf``: one model.gguf (F16 keeps the zeros), the report with each
    tensor's type; eval gives the perplexity of the same prune written dense, within
    F16's rounding; inspect sees 50% zeros in every block weight."""
    common = ["--sparsity", "0.5", "--nsamples", "8", "--seqlen", "32", "--quiet"]
    dense, out = tmp_path / "dense", tmp_path / "gguf"
    assert main(["prune", str(tiny_llama), "--out", str(dense), *common]) == 0
    assert main(["prune", str(tiny_llama), "--out", str(out), "--format", "gguf",
                 *common]) == 0  # fmt: skip
    assert (out / "model.gguf").is_file() and not (out / "config.json").exists()
    assert not list(out.glob("*.safetensors"))
    report = json.loads((out / "prune_report.json").read_text())
    assert report["gguf"]["types"]["blk.1.ffn_down.weight"] == "f16"
    capsys.readouterr()

    def perplexity(path):
        assert main(["eval", str(path), "--data", "sample-eval", "--seqlen", "32",
                     "--max-windows", "8", "--json", "--quiet"]) == 0  # fmt: skip
        return json.loads(capsys.readouterr().out)["perplexity"]

    assert perplexity(out) == pytest.approx(perplexity(dense), rel=2e-3)
    assert main(["inspect", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == "gguf" and len(summary["layers"]) == 3 * 7
    assert all(layer["sparsity"] == 0.5 for layer in summary["layers"])
    assert main(["compare", str(dense), str(out), "--data", "sample-eval", "--seqlen", "32",
                 "--max-windows", "4", "--json", "--quiet"]) == 0  # fmt: skip
    rows = json.loads(capsys.readouterr().out)
    assert rows[1]["kl_to_first"] < 1e-3


@pytest.mark.parametrize(
    ("family", "extra", "message"),
    [
        ("llama", ["--bits", "3"], "gguf holds 4 bits (q4_0), 5 bits (q5_0), 8 bits (q8_0)"),
        ("opt", [], "GGUF output is written for llama, mistral, qwen2, qwen3 models"),
    ],
)
def test_what_gguf_cannot_hold_is_one_line_and_writes_nothing(family, extra, message, tmp_path,
                                                               tokenizer_dir, capsys):  # fmt: skip
    src = build_checkpoint(tmp_path / "src", family, tokenizer_dir)
    capsys.readouterr()  # building the checkpoint may draw a progress bar
    out = tmp_path / "out"
    code = main(["prune", str(src), "--out", str(out), "--sparsity", "0.5", "--format",
                 "gguf", *extra, "--nsamples", "8", "--seqlen", "32", "--quiet"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code != 0 and message in err and len(err.splitlines()) == 1, err
    assert not out.exists() and not (tmp_path / "out.partial").exists()


@pytest.mark.parametrize(
    ("bits", "symmetric", "kind", "observer"),
    [(4, True, "q4_0", "minmax"), (5, True, "q5_0", "minmax"), (8, True, "q8_0", "minmax"),
     (4, False, "q4_1", "minmax"), (5, False, "q5_1", "minmax"), (4, True, "q4_0", "mse"),
     (4, False, "q4_1", "mse")],
)  # fmt: skip
def test_gptq_on_ggmls_grid_is_written_unchanged(bits, symmetric, kind, observer, tiny_llama,
                                                 tmp_path):  # fmt: skip
    """With --bits and gguf, GPTQ quantizes on GGML's grid (blocks of 32, float16 scales,
    and float16 minimums with --symmetric false; shrunk ranges with the MSE observer):
    every block weight in the file de-quantizes to the in-memory model's weight exactly,
    and the loaded model's logits are the in-memory model's."""
    common = {"bits": bits, "symmetric": symmetric, "format": "gguf", "nsamples": 8,
              "seqlen": 32, "quantizer_options": {"observer": observer}}  # fmt: skip
    model, report = prunella.prune(tiny_llama, progress=False, **common)
    assert {layer["ggml"] for layer in report["layers"]} == {kind}
    if observer == "mse":  # the ranges it chose are not min-max's
        plain, _ = prunella.prune(tiny_llama, progress=False, **common | {"quantizer_options": {}})
        assert not torch.equal(model.model.layers[0].mlp.down_proj.weight,
                               plain.model.layers[0].mlp.down_proj.weight)  # fmt: skip
    assert report["axes"]["bits"]["layers_in_smaller_groups"] == 0
    out = tmp_path / "out"
    prunella.prune_to_dir(
        model=str(tiny_llama), out=str(out), progress=False, gguf_type="f32", **common
    )  # fmt: skip (f32 embeddings and head: the logits exactly)
    written = json.loads((out / "prune_report.json").read_text())["gguf"]["types"]
    assert written["blk.0.ffn_down.weight"] == kind
    tensors = {t.name: t for t in GGUFReader(out / "model.gguf").tensors}
    for i, block in enumerate(model.model.layers):
        for gguf_name, weight in (("ffn_down", block.mlp.down_proj.weight),
                                  ("attn_v", block.self_attn.v_proj.weight)):  # fmt: skip
            tensor = tensors[f"blk.{i}.{gguf_name}.weight"]
            assert tensor.tensor_type.name == kind.upper()
            values = torch.from_numpy(np.array(dequantize(tensor.data, tensor.tensor_type)))
            assert torch.equal(values.reshape(weight.shape), weight.detach()), (i, gguf_name)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(logits(gguf_model(out / "model.gguf"), ids), logits(model, ids),
                               rtol=1e-4, atol=1e-4)  # fmt: skip


def test_ggmls_grids_with_a_minimum_are_llama_cpps_blocks():
    """q4_1 and q5_1 on GGML's grid: d = (max - min) / (2^b - 1) and m = min, both float16
    values, codes round((w - m) / d); packed in GGML's layout, the gguf package's reader
    gives back q d + m exactly; 5.0 and 6.0 bits per weight."""
    from prunella.io.gguf_file import _pack_ggml
    from prunella.methods.bits import bits_per_weight
    from prunella.methods.bits.grid import Grid, fake_quantize, qparams
    from prunella.methods.bits.grid import quantize as to_codes

    w = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    for bits, kind in ((4, "q4_1"), (5, "q5_1")):
        grid = Grid(bits, 32, False, kind)
        scale, minimum = qparams(w, grid)
        blocks = w.reshape(6, 2, 32)
        assert torch.equal(minimum, blocks.amin(-1).half().float())
        span = (blocks.amax(-1) - blocks.amin(-1)) / (2**bits - 1)
        assert torch.equal(scale, span.half().float())
        s, m = (t.repeat_interleave(32, dim=1) for t in (scale, minimum))
        q = to_codes(w, s, m, grid)
        assert q.min() >= 0 and q.max() <= 2**bits - 1
        w_hat = fake_quantize(w, scale, minimum, grid)
        assert torch.equal(w_hat, q * s + m)
        packed = _pack_ggml(q, scale, kind, minimum)
        back = dequantize(packed, getattr(GGMLQuantizationType, kind.upper()))
        assert torch.equal(torch.from_numpy(np.array(back)).reshape(w.shape), w_hat)
        assert bits_per_weight(bits, 32, False, ggml=True) == bits + 1.0


def test_sparsity_on_a_grid_with_a_minimum_is_one_line(tiny_llama, tmp_path, capsys):
    """Pruned weights cannot stay zero on q4_1/q5_1: refused; and a plan file's grids
    must have the recipe's symmetry (else its q4_1 layers would go with --sparsity)."""
    out = tmp_path / "out"
    common = ["--nsamples", "8", "--seqlen", "32", "--quiet"]
    code = main(["prune", str(tiny_llama), "--out", str(out), "--sparsity", "0.5", "--bits",
                 "4", "--symmetric", "false", "--format", "gguf", *common])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and "q4_1/q5_1" in err, err
    plan = tmp_path / "plan.json"
    assert main(["allocate", str(tiny_llama), "--bits", "5.5", "--allocation", "owl",
                 "--symmetric", "false", "--format", "gguf", "--json", str(plan),
                 *common]) == 0  # fmt: skip
    assert "q4_1" in plan.read_text() and "q5_1" in plan.read_text()
    capsys.readouterr()
    code = main(["prune", str(tiny_llama), "--out", str(out), "--bits", "5.5",
                 "--allocation-file", str(plan), "--format", "gguf", *common])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1, err
    assert "symmetry must be the recipe's (--symmetric true)" in err
    data = json.loads(plan.read_text())  # without its symmetry, under --symmetric false
    bits = data["axes"]["bits"]
    (bits.get("detail") or bits).pop("symmetric")
    plan.write_text(json.dumps(data))
    code = main(["prune", str(tiny_llama), "--out", str(out), "--bits", "5.5", "--symmetric",
                 "false", "--allocation-file", str(plan), "--format", "gguf", *common])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code != 0 and "'symmetric' must name every layer" in err, err
    assert not out.exists()


def test_the_api_writes_gguf(tiny_llama, tmp_path):
    out = tmp_path / "o"
    prunella.prune_to_dir(model=str(tiny_llama), out=str(out), sparsity=0.5, format="gguf",
                          gguf_type="q8_0", nsamples=8, seqlen=32, progress=False)  # fmt: skip
    report = json.loads((out / "prune_report.json").read_text())
    assert report["gguf"]["types"]["blk.2.ffn_up.weight"] == "q8_0"
    assert "gguf_type: q8_0" in (out / "recipe.yaml").read_text()


def test_allocated_widths_mix_ggml_types_in_one_file(tiny_llama, tmp_path):
    """--bits 6 --allocation owl --format gguf: GGML types (q4_0: 4.5 bits per weight,
    q5_0: 5.5, q8_0: 8.5) mixed, averaging at most 6; each tensor holds its layer's type
    and the file loads with the in-memory model's logits."""
    common = {"bits": 6, "allocation": "owl", "format": "gguf", "nsamples": 8, "seqlen": 32}
    model, report = prunella.prune(tiny_llama, progress=False, **common)
    kinds = {layer["name"]: layer["ggml"] for layer in report["layers"]}
    assert len(set(kinds.values())) > 1 and set(kinds.values()) <= {"q4_0", "q5_0", "q8_0"}
    assert 5.5 < report["axes"]["bits"]["bits_per_weight"] <= 6
    out = tmp_path / "out"
    prunella.prune_to_dir(model=str(tiny_llama), out=str(out), progress=False,
                          gguf_type="f32", **common)  # fmt: skip
    tensors = {t.name: t.tensor_type.name for t in GGUFReader(out / "model.gguf").tensors}
    for i in range(len(model.model.layers)):
        for gguf_name, layer in (("ffn_down", "mlp.down_proj"), ("attn_q", "self_attn.q_proj")):
            kind = kinds[f"model.layers.{i}.{layer}"]
            assert tensors[f"blk.{i}.{gguf_name}.weight"] == kind.upper(), (i, layer)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(logits(gguf_model(out / "model.gguf"), ids), logits(model, ids),
                               rtol=1e-4, atol=1e-4)  # fmt: skip


def test_a_plan_of_ggml_types_needs_gguf_output(tiny_llama, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    assert main(["allocate", str(tiny_llama), "--bits", "6", "--allocation", "owl", "--format",
                 "gguf", "--nsamples", "8", "--seqlen", "32", "--json", str(plan),
                 "--quiet"]) == 0  # fmt: skip
    assert "q5_0" in plan.read_text() or "q4_0" in plan.read_text()
    capsys.readouterr()
    out = tmp_path / "out"
    code = main(["prune", str(tiny_llama), "--out", str(out), "--bits", "6",
                 "--allocation-file", str(plan), "--nsamples", "8", "--seqlen", "32",
                 "--quiet"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1, err
    assert "its GGML types need --format gguf" in err and not out.exists()
