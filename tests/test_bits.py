"""The bits axis: grids, round to nearest and GPTQ against a plain reference, composition
with sparsity, and compressed-tensors checkpoints that transformers loads."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import prunella
from prunella.cli import main
from prunella.engine.stats import HESSIAN, LayerStats
from prunella.errors import PrunellaError
from prunella.io.quantized import codes
from prunella.methods import AXES
from prunella.methods.bits import Spec, bits_per_weight, fit, gptq, rtn
from prunella.methods.bits.grid import Grid, fake_quantize, layer_group, qparams
from prunella.methods.plan import Budget
from prunella.methods.sparsity.patterns import Unstructured
from prunella.recipe import build


def layer_problem(rows=24, cols=64, tokens=512, seed=0):
    """A weight and correlated inputs (so that GPTQ's error feedback matters)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    X = torch.randn(tokens, cols, generator=g) @ mix
    W = torch.randn(rows, cols, generator=g)
    stats = LayerStats(cols, {HESSIAN}, torch.device("cpu"))
    stats.add(X)
    return W, X, stats


def output_error(W, W_hat, X) -> float:
    return ((W - W_hat) @ X.T).square().sum().item()


def plain_gptq(W, H, grid, percdamp=0.01):
    """The paper's algorithm written out column by column: no blocks, no act-order, no
    transposes; the group scales from the weights before the sweep."""
    W = W.double().clone()
    H = H.double().clone()
    H.diagonal().add_(percdamp * H.diagonal().mean())
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    scale, zero = qparams(W, grid)
    Q = torch.zeros_like(W)
    for j in range(W.shape[1]):
        s, z = scale[:, j // grid.group].double(), zero[:, j // grid.group].double()
        q = ((W[:, j] / s).round() + z).clamp(grid.qmin, grid.qmax)
        Q[:, j] = (q - z) * s
        err = (W[:, j] - Q[:, j]) / U[j, j]
        W[:, j:] -= torch.outer(err, U[j, j:])
    return Q


def test_symmetric_and_asymmetric_grids_are_compressed_tensors():
    W = torch.tensor([[-1.0, 0.5, 0.25, 2.0], [0.0, 0.0, 0.0, 0.0]])
    scale, zero = qparams(W, Grid(4, 4, symmetric=True))
    assert scale[0, 0].item() == pytest.approx(2.0 / 7.5, rel=2**-8)  # absmax / 7.5
    assert zero.abs().sum() == 0 and scale[1, 0] > 0  # an all-zero group: no zero scale
    scale, zero = qparams(W, Grid(4, 4, symmetric=False))
    assert scale[0, 0].item() == pytest.approx(3.0 / 15, rel=2**-8)  # (max - min) / 15
    assert -8 <= zero[0, 0] <= 7 and (scale.to(torch.bfloat16).float() == scale).all()
    for grid in (Grid(4, 4, True), Grid(3, 2, False), Grid(8, 4, True), Grid(2, 4, False)):
        Q, s, z, _ = rtn.quantize(W, grid, observer="minmax")
        assert Q[1].abs().sum() == 0  # zeros stay zero
        q, _ = codes(Q, s, z, grid)
        assert q.min() >= grid.qmin and q.max() <= grid.qmax


def test_group_size_falls_back_for_narrow_layers_in_one_line():
    assert layer_group(576, 128) == 64 and layer_group(1536, 128) == 128
    assert layer_group(96, 128) == 32
    with pytest.raises(PrunellaError, match="100 columns wide"):
        layer_group(100, 128)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_equals_the_plain_algorithm_and_beats_round_to_nearest(bits):
    W, X, stats = layer_problem()
    grid = Grid(bits, 32, symmetric=bits != 3)
    Q, scale, zero, _facts = gptq.quantize(
        W, grid, stats, blocksize=16, percdamp=0.01, actorder=False, observer="minmax"
    )
    reference = plain_gptq(W, stats.hessian, grid)
    # the same codes (float rounding may move a weight lying on a rounding boundary)
    assert (Q.double() - reference).abs().gt(1e-4).float().mean() < 0.01
    codes(Q, scale, zero, grid)  # every weight on its group's grid
    rtn_error = output_error(W, rtn.quantize(W, grid, observer="minmax")[0], X)
    assert output_error(W, Q, X) < 0.8 * rtn_error
    ordered = gptq.quantize(
        W, grid, stats, blocksize=16, percdamp=0.01, actorder=True, observer="minmax"
    )[0]
    codes(ordered, scale, zero, grid)
    assert output_error(W, ordered, X) < rtn_error


def shrunk_params(w: torch.Tensor, p: float, grid: Grid) -> tuple[float, float]:
    """The scale and zero point (GGML q4_1: minimum) of one group whose range is shrunk
    by ``p``, from the grid formulas written out (stored-dtype scales)."""
    lo, hi = p * w.min().item(), p * w.max().item()
    bf16 = lambda x: torch.tensor(x).to(torch.bfloat16).item()  # noqa: E731
    f16 = lambda x: torch.tensor(x).to(torch.float16).item()  # noqa: E731
    if grid.ggml == "q4_1":
        return f16((hi - lo) / 15), f16(lo)
    if grid.ggml == "q8_0":
        return f16(max(abs(lo), abs(hi)) / 127), 0.0
    if grid.ggml == "q4_0":
        m = w.flatten()[w.abs().argmax()].item()
        return f16(p * m / -8), 0.0
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    span = 2**grid.bits - 1
    if grid.symmetric:
        return bf16(max(-lo, hi) / (span / 2)), 0.0
    s = bf16((hi - lo) / span)
    return s, float(min(max(round(grid.qmin - lo / s), grid.qmin), grid.qmax))


def test_the_mse_observer_is_the_reference_grid_search():
    """Each group's range shrunk to ``p [lo, hi]``, ``p = 1, 0.99, ..., 0.21``, keeping
    the first ``p`` of least ``sum |w_hat - w|^2.4`` (the GPTQ reference's
    ``Quantizer(mse=True)``), written out group by group; never worse than min-max, and
    at 2 bits far better on Gaussian weights."""
    W = torch.randn(6, 64, generator=torch.Generator().manual_seed(3))
    W[0, :32] = W[0, :32].abs() + 0.1  # a group of one sign
    for grid in (Grid(2, 32), Grid(3, 16, symmetric=False), Grid(4, 32, ggml="q4_0"),
                 Grid(4, 32, symmetric=False, ggml="q4_1"), Grid(8, 32, ggml="q8_0")):  # fmt: skip
        scale, zero = qparams(W, grid, "mse")
        for r, g in itertools.product(range(6), range(64 // grid.group)):
            w = W[r : r + 1, g * grid.group : (g + 1) * grid.group]
            best, chosen = float("inf"), None
            for i in range(80):
                s, z = shrunk_params(w, 1 - i / 100, grid)
                q = (w / s).round() + z if not grid.has_min else ((w - z) / s).round()
                q = q.clamp(grid.qmin, grid.qmax)
                w_hat = q * s + z if grid.has_min else (q - z) * s
                err = (w_hat - w).abs().pow(2.4).sum().item()
                if err < best:
                    best, chosen = err, (s, z)
            assert (scale[r, g].item(), zero[r, g].item()) == pytest.approx(chosen, rel=1e-5)
        minmax = fake_quantize(W, *qparams(W, grid), grid)
        mse = fake_quantize(W, scale, zero, grid)
        per_group = [(q - W).abs().pow(2.4).reshape(6, -1, grid.group).sum(-1)
                     for q in (mse, minmax)]  # fmt: skip
        assert (per_group[0] <= per_group[1] * (1 + 1e-6)).all()
    W = torch.randn(64, 256, generator=torch.Generator().manual_seed(4))
    errors = {o: (fake_quantize(W, *qparams(W, Grid(2, 64), o), Grid(2, 64)) - W).square().sum()
              for o in ("minmax", "mse")}  # fmt: skip
    assert errors["mse"] < 0.7 * errors["minmax"]


def test_gptq_with_the_mse_observer_writes_a_checkpoint_that_loads(tiny_llama, tmp_path):
    """``--quantizer-opt observer=mse``: GPTQ starts from shrunk ranges (weights beyond
    them are clamped), has less output error at 3 bits than from min-max ranges, and the
    compressed-tensors checkpoint loads with the in-memory model's logits."""
    W, X, stats = layer_problem(cols=128)
    grid = Grid(3, 64)
    error = {o: output_error(W, gptq.quantize(W, grid, stats, blocksize=32, percdamp=0.01,
                                              actorder=True, observer=o)[0], X)
             for o in ("minmax", "mse")}  # fmt: skip
    assert error["mse"] < error["minmax"]
    out = tmp_path / "out"
    argv = ["prune", str(tiny_llama), "--out", str(out), "--bits", "3", "--nsamples", "8",
            "--seqlen", "32", "--quantizer-opt", "observer=mse", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert report["axes"]["bits"]["quantizer_options"]["observer"] == "mse"
    model, _ = prunella.prune(tiny_llama, bits=3, nsamples=8, seqlen=32, progress=False,
                              quantizer_options={"observer": "mse"})  # fmt: skip
    plain, _ = prunella.prune(tiny_llama, bits=3, nsamples=8, seqlen=32, progress=False)
    weight = model.model.layers[0].mlp.down_proj.weight
    assert not torch.equal(weight, plain.model.layers[0].mlp.down_proj.weight)
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), rtol=1e-4, atol=1e-4)


def test_too_little_data_falls_back_to_rtn_with_the_same_observer():
    """A layer quantized without statistics (too few calibration tokens) is rounded to
    nearest from the ranges the recipe's observer chooses."""
    from prunella.methods.bits import Quantizer
    from prunella.methods.bits.quantizers import QUANTIZERS

    W = torch.randn(8, 64, generator=torch.Generator().manual_seed(5))
    grid = Grid(2, 32)
    options = QUANTIZERS.get("gptq").defaults() | {"observer": "mse"}
    new, _ = Quantizer(QUANTIZERS.get("gptq"), options)(W, grid, None, data_free=True)
    assert torch.equal(new, rtn.quantize(W, grid, observer="mse")[0])
    assert not torch.equal(new, rtn.quantize(W, grid, observer="minmax")[0])


def test_gptq_keeps_pruned_weights_zero():
    W, _X, stats = layer_problem()
    W[torch.rand(W.shape, generator=torch.Generator().manual_seed(1)) < 0.5] = 0.0
    grid = Grid(4, 32)
    Q, scale, zero, _ = gptq.quantize(
        W, grid, stats, blocksize=16, percdamp=0.01, actorder=True, observer="minmax"
    )
    assert (Q[W == 0] == 0).all()
    codes(Q, scale, zero, grid)


def test_bits_outside_the_widths_is_one_line():
    with pytest.raises(PrunellaError, match=r"bits must be a width \(2, 3, 4, 8\) or an av"):
        build(None, model="m", bits=9)
    with pytest.raises(PrunellaError, match=r"--bits 3\.5 is not a width .* needs an --alloc"):
        AXES.budgets(build(None, model="m", bits=3.5))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--bits", "5"], "--bits 5 is not a width (2, 3, 4, 8); an average of widths"),
        (["--bits", "1.5"], "bits must be a width (2, 3, 4, 8) or an average of widths"),
        (
            ["--bits", "2.1", "--allocation", "owl"],
            "--bits 2.1 (an average, scales and zero points counted) is below the smallest "
            "width's 2.125 bits per weight at group 128",
        ),
        (["--bits", "4", "--symmetric", "false"], "asymmetric grids written as compressed"),
        (["--bits", "4", "--format", "sparse-bitmask"], "holds no quantized weights"),
        (["--format", "compressed-tensors"], "--format compressed-tensors needs --bits"),
        (
            ["--bits", "4", "--group-size", "4"],
            "--group-size: Input should be greater than or equal to 8",
        ),
    ],
)
def test_bad_bits_input_is_one_line_and_writes_nothing(tiny_llama, tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert main(["prune", str(tiny_llama), "--out", str(out), *argv, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_an_asymmetric_grid_written_dense_gives_the_same_logits(tiny_llama, tmp_path):
    out = tmp_path / "out"
    argv = ["prune", str(tiny_llama), "--out", str(out), "--bits", "4", "--symmetric", "false",
            "--format", "hf", "--nsamples", "8", "--seqlen", "32", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    model, _ = prunella.prune(tiny_llama, bits=4, symmetric=False, format="hf",
                              nsamples=8, seqlen=32, progress=False)  # fmt: skip
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), rtol=1e-4, atol=1e-4)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("bits", [4, 3, 8])
def test_a_compressed_tensors_checkpoint_loads_with_the_same_logits(tiny_llama, tmp_path, bits):
    out, symmetric = tmp_path / "out", True
    argv = ["prune", str(tiny_llama), "--out", str(out), "--bits", str(bits),
            "--nsamples", "8", "--seqlen", "32", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    quant = config["quantization_config"]
    assert quant["format"] == "pack-quantized" and quant["quant_method"] == "compressed-tensors"
    report = json.loads((out / "prune_report.json").read_text())
    assert report["axes"]["bits"]["bits"] == bits
    # 64-wide layers take group 64, the 128-wide down_proj keeps 128: one config group each
    group_of = {layer["name"]: layer["group"] for layer in report["layers"]}
    assert group_of == {n: layer_group(layer["shape"][1], 128)
                        for n, layer in zip(group_of, report["layers"], strict=True)}  # fmt: skip
    assert set(group_of.values()) == {64, 128}
    assert report["axes"]["bits"]["layers_in_smaller_groups"] == 18
    for scheme in quant["config_groups"].values():
        weights = scheme["weights"]
        assert weights["num_bits"] == bits and weights["symmetric"] == symmetric
        assert {group_of[t] for t in scheme["targets"]} == {weights["group_size"]}
    assert sum(len(s["targets"]) for s in quant["config_groups"].values()) == len(group_of)
    # the same model in memory (the engine is deterministic)
    model, _ = prunella.prune(tiny_llama, bits=bits, symmetric=symmetric, nsamples=8,
                              seqlen=32, progress=False)  # fmt: skip
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), rtol=1e-4, atol=1e-4)
    packed = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    dense = sum(f.stat().st_size for f in tiny_llama.glob("*.safetensors"))
    assert packed < dense
    # a float32 checkpoint: its scales in bfloat16, which holds them exactly (the logits
    # above are the model's), and the plan's bytes count them so
    from safetensors import safe_open

    layers = tuple(layer["name"] + "." for layer in report["layers"])
    with safe_open(out / "model.safetensors", framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k.startswith(layers)}  # noqa: SIM118
    scales = [t for k, t in tensors.items() if k.endswith("weight_scale")]
    assert len(scales) == len(layers) and all(s.dtype == torch.bfloat16 for s in scales)
    written = sum(t.numel() * t.element_size() for t in tensors.values())
    assert report["plan"]["cost"]["layer_bytes"] == written


def test_joint_sparsity_and_bits_keep_the_zeros(tiny_llama):
    """Quantizing after pruning keeps every pruned weight exactly zero and rounds the kept
    ones to the grid (not to zero). Block 0's q/k/v see the same inputs with and without
    bits, so SparseGPT prunes them the same: the joint run's zeros are those zeros, plus
    only the few kept weights that round to zero."""
    common = {"sparsity": 0.5, "nsamples": 8, "seqlen": 32, "progress": False}
    joint, report = prunella.prune(tiny_llama, bits=4, **common)
    pruned, _ = prunella.prune(tiny_llama, **common)
    for layer in report["layers"]:
        assert layer["bits"] == 4 and 0.5 <= layer["sparsity"] < 0.6, layer
    assert set(report["axes"]) == {"sparsity", "bits"}
    for name in ("q_proj", "k_proj", "v_proj"):
        zero = getattr(pruned.model.layers[0].self_attn, name).weight == 0
        weight = getattr(joint.model.layers[0].self_attn, name).weight
        assert zero.float().mean().item() == 0.5
        assert (weight[zero] == 0).all(), name
        kept = weight[~zero]
        assert (kept != 0).float().mean().item() > 0.8, name
        # on the 4-bit grid: at most 16 distinct values per group of each row
        assert all(row.unique().numel() <= 16 for row in weight.reshape(-1, 32)), name


def test_streamed_and_resumed_runs_write_the_same_quantized_checkpoint(tiny_llama, tmp_path):
    from safetensors.torch import load_file
    from test_resume import run_killed

    def tensors(out):
        return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}

    common = ["--bits", "4", "--nsamples", "8", "--seqlen", "32", "--quiet"]
    memory, streamed = tmp_path / "memory", tmp_path / "streamed"
    assert main(["prune", str(tiny_llama), "--out", str(memory), *common]) == 0
    argv = ["prune", str(tiny_llama), "--out", str(streamed), "--offload", "disk", *common]
    assert run_killed(argv, block=0).returncode == -9  # the scales of block 0 in the work folder
    assert main(argv) == 0
    a, b = tensors(memory), tensors(streamed)
    assert a.keys() == b.keys() and any(k.endswith("weight_packed") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt2"])
def test_layers_compressed_tensors_cannot_hold_are_one_line_before_any_work(
    family, tmp_path, tokenizer_dir, capsys
):
    from conftest import build_checkpoint

    model = build_checkpoint(tmp_path / "model", family, tokenizer_dir)
    out = tmp_path / "out"
    assert main(["prune", str(model), "--out", str(out), "--bits", "4", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "compressed-tensors quantizes linear layers" in err
    assert not out.exists() and not out.with_name("out.partial").exists()
    # written dense, they are quantized in place
    assert main(["prune", str(model), "--out", str(out), "--bits", "4", "--format",
                 "hf", "--nsamples", "8", "--seqlen", "32", "--quiet"]) == 0  # fmt: skip
    report = json.loads((out / "prune_report.json").read_text())
    assert {layer["bits"] for layer in report["layers"]} == {4}


def test_inspect_reads_a_quantized_checkpoint(tiny_llama, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["prune", str(tiny_llama), "--out", str(out), "--bits", "3", "--sparsity", "0.5",
            "--nsamples", "8", "--seqlen", "32", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "prune_report.json").read_text())
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["format"] == "compressed-tensors"
    rows = {r["name"]: r for r in summary["layers"]}
    assert rows.keys() == {r["name"] for r in report["layers"]}
    for layer in report["layers"]:  # zeros counted from the packed codes, as in memory
        assert rows[layer["name"]]["bits"] == 3
        assert rows[layer["name"]]["sparsity"] == pytest.approx(layer["sparsity"], abs=1e-9)


def test_a_bfloat16_checkpoint_keeps_bfloat16_scales(tmp_path, tokenizer_dir):
    from conftest import build_checkpoint
    from safetensors import safe_open

    model = build_checkpoint(tmp_path / "bf16", "llama", tokenizer_dir, dtype=torch.bfloat16)
    out = tmp_path / "out"
    argv = ["prune", str(model), "--out", str(out), "--bits", "4", "--group-size", "64",
            "--nsamples", "8", "--seqlen", "32", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    with safe_open(out / "model.safetensors", framework="pt") as f:
        scales = [f.get_tensor(k) for k in f.keys() if k.endswith("weight_scale")]  # noqa: SIM118
    assert scales and all(s.dtype == torch.bfloat16 for s in scales)
    report = json.loads((out / "prune_report.json").read_text())
    cost = report["plan"]["cost"]  # 4 bits and a 16-bit scale per 64 weights: 0.266x
    assert cost["layer_bytes"] / cost["dense_layer_bytes"] < 0.28
    reference, _ = prunella.prune(model, bits=4, group_size=64, nsamples=8, seqlen=32,
                                  progress=False)  # fmt: skip
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(loaded, ids), logits(reference, ids), rtol=0, atol=0)


def library_writer(dense, folder, grids, tensors):
    """The compressed-tensors library's own way to write the checkpoint, from the whole
    model: the reference the one-tensor-at-a-time writer must equal."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config

    from prunella.io.quantized import quantization_config, scale_dtype

    model = AutoModelForCausalLM.from_pretrained(dense, dtype="auto")
    apply_quantization_config(model, quantization_config(grids), show_progress=False)
    dtypes = {name: model.get_submodule(name).weight.dtype for name in grids}
    with torch.no_grad():
        for name, grid in grids.items():
            module = model.get_submodule(name)
            scale = tensors[f"{name}.weight_scale"]
            zero = tensors.get(f"{name}.weight_zero_point", torch.zeros_like(scale))
            module.weight_scale.copy_(scale.to(module.weight_scale.dtype))
            module.weight_zero_point.copy_(zero.to(module.weight_zero_point.dtype))
            module.weight.data = codes(module.weight, scale, zero, grid)[1].float()
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    for name in grids:
        module = model.get_submodule(name)
        module.weight_scale.data = module.weight_scale.data.to(scale_dtype(dtypes[name]))
    model.save_pretrained(folder)
    compressor.update_config(folder)


@pytest.mark.parametrize(
    "dtype, flags",
    [
        (torch.float32, ["--bits", "4", "--group-size", "32"]),
        (torch.float32, ["--bits", "2", "--group-size", "64"]),
        (torch.float32, ["--bits", "3.5", "--allocation", "owl", "--group-size", "64"]),
        (torch.bfloat16, ["--bits", "8", "--group-size", "64"]),
    ],
    ids=["4-bit", "2-bit", "mixed", "bfloat16"],
)
def test_the_checkpoint_is_the_one_the_library_writes_from_the_whole_model(
    tmp_path, tokenizer_dir, monkeypatch, dtype, flags
):
    """The compressed-tensors checkpoint, written one tensor at a time, holds exactly the
    tensors and the config that the library writes from the whole model (its
    ``apply_quantization_config``, ``compress_model`` and ``save_pretrained``)."""
    import shutil

    from conftest import build_checkpoint
    from safetensors.torch import load_file

    import prunella.io.export as export

    source = build_checkpoint(tmp_path / "m", "llama", tokenizer_dir, dtype=dtype)
    seen = {}

    def keep(dense, folder, grids, tensors):
        shutil.copytree(dense, tmp_path / "dense")
        seen.update(grids=grids, tensors=tensors)
        return write(dense, folder, grids, tensors)

    write = export.write_compressed_tensors
    monkeypatch.setattr(export, "write_compressed_tensors", keep)
    out = tmp_path / "out"
    assert main(["prune", str(source), "--out", str(out), *flags, "--nsamples", "8",
                 "--seqlen", "32", "--quiet"]) == 0  # fmt: skip
    library = tmp_path / "library"
    library_writer(tmp_path / "dense", library, seen["grids"], seen["tensors"])
    ours, theirs = (load_file(f / "model.safetensors") for f in (out, library))
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
    assert any(k.endswith("weight_packed") for k in ours)
    config = json.loads((out / "config.json").read_text())
    assert config == json.loads((library / "config.json").read_text())


def test_a_checkpoint_whose_keys_lack_the_model_prefix_is_quantized_whole(
    tmp_path, tokenizer_dir, capsys
):
    """Keys as the input names them (``layers.0...`` without ``model.``, which transformers
    loads): every quantized layer is packed under the checkpoint's naming, and the
    checkpoint loads with the logits of the same run on the prefixed input."""
    import shutil

    from conftest import build_checkpoint
    from safetensors.torch import load_file, save_file

    source = build_checkpoint(tmp_path / "m", "llama", tokenizer_dir)
    bare = tmp_path / "bare"
    shutil.copytree(source, bare)
    state = load_file(bare / "model.safetensors")
    save_file({k.removeprefix("model."): v for k, v in state.items()}, bare / "model.safetensors",
              metadata={"format": "pt"})  # fmt: skip
    outs = {}
    for name, model in (("bare", bare), ("prefixed", source)):
        outs[name] = tmp_path / f"out-{name}"
        assert main(["prune", str(model), "--out", str(outs[name]), "--bits", "4",
                     "--nsamples", "8", "--seqlen", "32", "--quiet"]) == 0  # fmt: skip
    written = load_file(outs["bare"] / "model.safetensors")
    report = json.loads((outs["bare"] / "prune_report.json").read_text())
    for layer in report["layers"]:
        assert layer["name"].removeprefix("model.") + ".weight_packed" in written, layer["name"]
    assert not any(k.endswith("proj.weight") for k in written)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    a, b = (AutoModelForCausalLM.from_pretrained(outs[n], dtype=torch.float32) for n in outs)
    torch.testing.assert_close(logits(a, ids), logits(b, ids), rtol=1e-5, atol=1e-5)
    capsys.readouterr()  # inspect finds each packed layer's group under either naming
    assert main(["inspect", str(outs["bare"]), "--json"]) == 0
    found = json.loads(capsys.readouterr().out)["layers"]  # groups 64 and 128: two groups
    assert sorted(r["group"] for r in found) == sorted(r["group"] for r in report["layers"])
    assert {r["group"] for r in found} == {64, 128} and {r["bits"] for r in found} == {4}


def test_sized_shards_are_named_and_indexed_as_save_pretrained_does(tmp_path):
    from safetensors.torch import load_file

    from prunella.io.safetensors_io import SizedShards

    tensors = {f"t{i}": torch.full((100,), float(i)) for i in range(5)}  # 400 bytes each
    shards = SizedShards(tmp_path, limit=1000)
    for name, tensor in tensors.items():
        shards.add(name, tensor)
    shards.close()
    files = sorted(f.name for f in tmp_path.iterdir())
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)] + [
        "model.safetensors.index.json"
    ]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["t4"] == "model-00003-of-00003.safetensors"
    loaded = {k: v for f in files[:3] for k, v in load_file(tmp_path / f).items()}
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)


def widths_mean(values, shapes, group=64, ggml=False):
    sizes = {n: r * c for n, (r, c) in shapes.items()}
    total = sum(bits_per_weight(int(values[n]), group, True, ggml) * sizes[n] for n in sizes)
    return total / sum(sizes.values())


@pytest.mark.parametrize("target", [2.3, 2.5, 3.0, 3.5, 4.2, 6.0, 8.0])
def test_an_average_is_met_from_below_within_one_layers_step(target):
    """The fitted widths average at most the target (scales counted) and adding the
    cheapest further step up of any layer would pass it; of two layers of one size, the
    one with the higher raw ratio (more removed) is never the wider."""
    gen = torch.Generator().manual_seed(0)
    shapes = {f"b{i}.{k}": (64, 64 if k != "down" else 192) for i in range(8)
              for k in ("q", "v", "down")}  # fmt: skip
    raw = {n: 0.8 + 0.1 * torch.rand((), generator=gen).item() for n in shapes}
    budget = Budget("bits", target, 1 - target / 16, spec=Spec(64, True, False, True))
    values, detail = fit(raw, shapes, budget)
    mean = widths_mean(values, shapes)
    assert mean <= target + 1e-12
    steps = [(bits_per_weight(b, 64, True) - bits_per_weight(a, 64, True)) * r * c
             for n, (r, c) in shapes.items() for a, b in itertools.pairwise((2, 3, 4, 8))
             if values[n] == a]  # fmt: skip
    total = sum(r * c for r, c in shapes.values())
    assert not steps or mean + min(steps) / total > target
    for shape in set(shapes.values()):  # among layers of one size, more removed: narrower
        order = sorted((n for n in shapes if shapes[n] == shape), key=raw.get)
        assert all(values[a] >= values[b] for a, b in itertools.pairwise(order)), shape
    assert set(detail["group"].values()) == {64}


def test_equal_scores_still_meet_the_average():
    shapes = {f"l{i}": (32, 64) for i in range(10)}
    budget = Budget("bits", 3.5, 1 - 3.5 / 16, spec=Spec(64, True, False, True))
    values, _ = fit(dict.fromkeys(shapes, 1 - 3.5 / 16), shapes, budget)
    # 3 bits cost 3.25 with scales, 4 bits 4.25: two layers of ten can take 4 (3.45)
    assert sorted(values.values()) == [3.0] * 8 + [4.0] * 2
    assert widths_mean(values, shapes) == pytest.approx(3.45)


def test_an_allocated_average_writes_mixed_widths_that_load(tiny_llama, tmp_path):
    """--bits 3.5 --allocation owl: the widths mix, the report's bits per weight (scales
    counted) is at most 3.5, each width is its own config group of the compressed-tensors
    checkpoint, and transformers loads it with the in-memory model's logits."""
    out = tmp_path / "out"
    argv = ["prune", str(tiny_llama), "--out", str(out), "--bits", "3.5", "--allocation", "owl",
            "--group-size", "64", "--nsamples", "8", "--seqlen", "32", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "prune_report.json").read_text())
    bits = report["axes"]["bits"]
    widths = {layer["name"]: layer["bits"] for layer in report["layers"]}
    assert len(set(widths.values())) > 1, widths
    shapes = {layer["name"]: tuple(layer["shape"]) for layer in report["layers"]}
    mean = widths_mean(widths, shapes)
    assert bits["bits_per_weight"] == pytest.approx(mean) and 3.3 < mean <= 3.5
    assert report["plan"]["axes"]["bits"]["method"] == "owl"
    assert "with scales" in bits["summary"]
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    groups = quant["config_groups"].values()
    by_width = {s["weights"]["num_bits"]: set(s["targets"]) for s in groups}
    for name, width in widths.items():
        assert name in by_width[width], name
    model, _ = prunella.prune(tiny_llama, bits=3.5, allocation="owl", group_size=64,
                              nsamples=8, seqlen=32, progress=False)  # fmt: skip
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), rtol=1e-4, atol=1e-4)


def test_a_plan_file_over_the_average_is_one_line(tiny_llama, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    assert main(["allocate", str(tiny_llama), "--bits", "3", "--allocation", "owl",
                 "--group-size", "64", "--nsamples", "8", "--seqlen", "32", "--json",
                 str(plan), "--quiet"]) == 0  # fmt: skip
    data = json.loads(plan.read_text())
    assert len(set(data["axes"]["bits"]["bits"].values())) > 1
    data["axes"]["bits"]["bits"] = dict.fromkeys(data["axes"]["bits"]["bits"], 4)
    plan.write_text(json.dumps(data))
    out = tmp_path / "out"
    code = main(["prune", str(tiny_llama), "--out", str(out), "--bits", "3",
                 "--allocation-file", str(plan), "--group-size", "64", "--nsamples", "8",
                 "--seqlen", "32", "--quiet"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "average 4.25 bits per weight (scales counted), above the recipe's 3" in err
    assert not out.exists()


def test_lwq_scores_each_block_by_how_much_it_modifies_its_input(tiny_llama):
    """LWQ's LIM of every block equals minus the mean cosine between the hidden states
    entering and leaving it (transformers' own hidden states, by hand); at 3 bits on
    average (2 and 3 bits mixed) the block that modifies its input most keeps 3 bits in
    every layer, the one that modifies it least has the fewest bits."""
    from prunella.methods.allocation.lwq import layer_input_modification, lwq_ratios

    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    assert layer_input_modification(x, x).item() == pytest.approx(-2.0)
    assert layer_input_modification(x, x.flip(-1)).item() == pytest.approx(0.0)
    ratios = lwq_ratios(torch.tensor([0.3, -0.2, 0.9]), 0.8, torch.ones(3), spread=0.01)
    torch.testing.assert_close(ratios, torch.tensor([0.8, 0.81, 0.79], dtype=ratios.dtype))

    windows = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    plan = prunella.allocate(tiny_llama, calibration=windows, bits=3, allocation="lwq",
                             group_size=64, compute_dtype="float32", progress=False)  # fmt: skip
    bits = plan["bits"]
    assert bits.method == "lwq" and bits.metric_name == "lim"
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with torch.no_grad():
        hidden = model(windows, output_hidden_states=True).hidden_states
    blocks = len(model.model.layers)
    for i in range(blocks - 1):  # the last entry is after the final norm
        cos = torch.nn.functional.cosine_similarity(hidden[i], hidden[i + 1], dim=-1)
        assert bits.metric[f"model.layers.{i}"] == pytest.approx(-cos.mean().item(), abs=1e-5)
    width = {i: [w for n, w in bits.values.items() if n.startswith(f"model.layers.{i}.")]
             for i in range(blocks)}  # fmt: skip
    order = sorted(range(blocks), key=lambda i: bits.metric[f"model.layers.{i}"])
    mean = {i: sum(w) / len(w) for i, w in width.items()}
    assert set(width[order[-1]]) == {3.0} and 2.0 in width[order[0]], width
    assert mean[order[0]] == min(mean.values()), width


# --- SparseGPT's joint sparsification and quantization ------------------------------------


def plain_joint(W, H, grid, sparsity, percdamp=0.01):
    """The paper's joint sweep written out column by column (one block: the mask from
    the OBS saliency at the start), in float64."""
    W = W.double().clone()
    H = H.double().clone()
    H.diagonal().add_(percdamp * H.diagonal().mean())
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    scale, zero = qparams(W.float(), grid)
    saliency = W.square() / U.diagonal().square()
    k = round(sparsity * W.numel())
    mask = torch.zeros(W.numel(), dtype=torch.bool)
    mask[saliency.flatten().argsort()[:k]] = True
    mask = mask.view_as(W)
    Q = torch.zeros_like(W)
    for j in range(W.shape[1]):
        s, z = scale[:, j // grid.group].double(), zero[:, j // grid.group].double()
        q = (((W[:, j] / s).round() + z).clamp(grid.qmin, grid.qmax) - z) * s
        Q[:, j] = q.masked_fill(mask[:, j], 0.0)
        err = (W[:, j] - Q[:, j]) / U[j, j]
        W[:, j:] -= torch.outer(err, U[j, j:])
    return Q


def test_the_joint_sweep_is_the_papers_algorithm():
    from prunella.methods.sparsity import sparsegpt

    W, X, stats = layer_problem(cols=64)
    grid = Grid(4, 32)
    new, facts = sparsegpt.prune(W, Unstructured(0.5), stats, blocksize=64, percdamp=0.01,
                                 grid=grid)  # fmt: skip
    expected = plain_joint(W, stats.hessian, grid, 0.5)
    torch.testing.assert_close(new.double(), expected, rtol=0, atol=1e-4)
    # half pruned, and a few kept weights that round to zero
    assert W.numel() // 2 < (new == 0).sum().item() < W.numel() // 2 + W.numel() // 20
    codes(new, facts["scale"], facts["zero"], grid)  # every weight on its grid
    # at 2 bits, where rounding matters: below pruning and then quantizing with feedback
    # (SparseGPT, then GPTQ; at 3-4 bits the two are within 2% here), and below rounding
    # the pruned weights without it
    grid = Grid(2, 32)
    new, _ = sparsegpt.prune(W, Unstructured(0.5), stats, blocksize=64, percdamp=0.01,
                             grid=grid)  # fmt: skip
    pruned, _ = sparsegpt.prune(W, Unstructured(0.5), stats, blocksize=64, percdamp=0.01)
    two_step = gptq.quantize(
        pruned, grid, stats, blocksize=64, percdamp=0.01, actorder=False, observer="minmax"
    )
    rounded = rtn.quantize(pruned, grid, observer="minmax")[0]
    assert output_error(W, new, X) < output_error(W, two_step[0], X)
    assert output_error(W, new, X) < 0.95 * output_error(W, rounded, X)


def test_the_sparsegpt_quantizer_alone_is_gptq_in_column_order():
    from prunella.methods.bits import sparsegpt as joint

    W, _X, stats = layer_problem()
    grid = Grid(3, 32)
    Q, scale, zero, _ = joint.quantize(W, grid, stats, blocksize=16, percdamp=0.01)
    torch.testing.assert_close(Q.double(), plain_gptq(W, stats.hessian, grid), rtol=0,
                               atol=1e-4)  # fmt: skip
    W[torch.rand(W.shape, generator=torch.Generator().manual_seed(1)) < 0.5] = 0.0
    Q, scale, zero, _ = joint.quantize(W, grid, stats, blocksize=16, percdamp=0.01)
    assert (Q[W == 0] == 0).all()  # after another solver: its zeros kept
    codes(Q, scale, zero, grid)


def test_sparsity_and_sparsegpt_quantizer_run_one_sweep_and_load(tiny_llama, tmp_path):
    """``--sparsity 0.5 --bits 4 --quantizer sparsegpt``: each layer pruned and quantized
    in SparseGPT's one sweep (the weights are the joint sweep's, not those of pruning
    then quantizing), 50% zeros, and the checkpoint loads with the in-memory logits."""
    out = tmp_path / "out"
    argv = ["prune", str(tiny_llama), "--out", str(out), "--sparsity", "0.5", "--bits", "4",
            "--quantizer", "sparsegpt", "--nsamples", "8", "--seqlen", "32", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert report["axes"]["bits"]["quantizer"] == "sparsegpt"
    for layer in report["layers"]:
        assert layer["bits"] == 4 and layer["target_sparsity"] == 0.5
        assert layer["sparsity"] >= 0.5 and layer["sweep"] == "joint"
    common = dict(sparsity=0.5, bits=4, nsamples=8, seqlen=32, progress=False)
    joint, _ = prunella.prune(tiny_llama, quantizer="sparsegpt", **common)
    _, apart = prunella.prune(tiny_llama, quantizer="sparsegpt", solver="wanda", **common)
    assert all("sweep" not in layer for layer in apart["layers"])  # Wanda, then the sweep
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(loaded, ids), logits(joint, ids), rtol=1e-4, atol=1e-4)


def test_the_joint_sweeps_options_are_the_solvers(tiny_llama, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["prune", str(tiny_llama), "--out", str(out), "--sparsity", "0.5", "--bits",
                 "4", "--quantizer", "sparsegpt", "--quantizer-opt", "percdamp=0.1",
                 "--nsamples", "8", "--seqlen", "32", "--quiet"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1, err
    assert "runs inside --solver sparsegpt's sweep" in err
    assert not out.exists() and not (tmp_path / "out.partial").exists()
