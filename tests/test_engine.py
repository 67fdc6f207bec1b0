"""The sequential engine on tiny random models."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import prunella
from prunella.data import calibration_windows
from prunella.engine.adapters import adapter_for, get_weight
from prunella.engine.prune import prune_blocks
from prunella.engine.stats import COL_NORMS
from prunella.engine.store import MemoryStore
from prunella.methods.rows import get_rows
from prunella.methods.sparsity import Pruner, get_solver
from prunella.methods.sparsity.patterns import NM, Unstructured
from prunella.registry import Method


def prunable_layers(model, adapter):
    return adapter.layers(model)


@pytest.fixture
def llama(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama).eval()


@pytest.fixture
def windows(tiny_llama):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    return calibration_windows(tok, "sample", nsamples=6, seqlen=48, seed=0)


HALF = Unstructured(0.5)


def pruner(solver="wanda"):
    """The sparsity axis's compressor: ``solver`` (a name or a method) with uniform rows."""
    solver = get_solver(solver) if isinstance(solver, str) else solver
    return Pruner(solver, solver.defaults(), get_rows("uniform"), {})


def sparsity_levels(patterns: dict) -> dict:
    return {name: {"sparsity": pattern} for name, pattern in patterns.items()}


def run(model, windows, solver="wanda", pattern=HALF, batch_size=2, **kw):
    adapter = adapter_for(model)
    patterns = {name: pattern for name in prunable_layers(model, adapter)}
    return prune_blocks(
        MemoryStore(model, adapter),
        windows,
        sparsity_levels(patterns),
        [pruner(solver)],
        device=torch.device("cpu"),
        dtype=torch.float32,
        batch_size=batch_size,
        progress=False,
        **kw,
    )


def test_statistics_come_from_the_pruned_model(llama, windows):
    """Block i is calibrated on the outputs of the already-pruned blocks 0..i-1."""
    seen = {}
    wanda = get_solver("wanda")

    def recording(weight, pattern, stats):
        seen.setdefault(len(seen), stats.col_norms.clone())
        return wanda.prune(weight, pattern, stats)

    module = SimpleNamespace(PAPER="", NEEDS=frozenset({COL_NORMS}), OPTIONS=(), prune=recording)
    run(llama, windows, solver=Method("solver", "recording", module))
    # q_proj is the first layer of each block; its input is input_layernorm(hidden_i)
    with torch.no_grad():
        hidden = llama(windows, output_hidden_states=True).hidden_states
    per_block = len(adapter_for(llama).linears(llama.model.layers[0]))
    for i, block in enumerate(llama.model.layers):
        x = block.input_layernorm(hidden[i])
        expected = x.reshape(-1, x.shape[-1]).norm(dim=0)
        assert torch.allclose(seen[i * per_block], expected, rtol=1e-4, atol=1e-5), i


def test_batch_size_does_not_change_the_result(llama, windows):
    a, b = copy.deepcopy(llama), copy.deepcopy(llama)
    run(a, windows, solver="sparsegpt", batch_size=1)
    run(b, windows, solver="sparsegpt", batch_size=6)
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p == 0, q == 0), name
        assert torch.allclose(p, q, atol=1e-4), name


def test_same_seed_same_model(tiny_llama):
    a, _ = prunella.prune(
        tiny_llama, sparsity=0.6, solver="sparsegpt", nsamples=4, seqlen=32, seed=3, progress=False
    )
    b, _ = prunella.prune(
        tiny_llama, sparsity=0.6, solver="sparsegpt", nsamples=4, seqlen=32, seed=3, progress=False
    )
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("solver", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", [Unstructured(0.7), NM(2, 4), NM(4, 8)])
def test_every_solver_honours_every_pattern(llama, windows, solver, pattern):
    dense = copy.deepcopy(llama)
    results, timings = run(llama, windows, solver=solver, pattern=pattern)
    adapter = adapter_for(llama)
    for i, block in enumerate(adapter.blocks(llama)):
        for local, layer in adapter.linears(block).items():
            w = get_weight(layer)
            if isinstance(pattern, NM):  # exactly M - N zeros in every group of M inputs
                zeros = (w == 0).view(w.shape[0], -1, pattern.m).sum(-1)
                assert (zeros == pattern.m - pattern.n).all(), (i, local)
                assert (w == 0).sum().item() == w.numel() * (pattern.m - pattern.n) // pattern.m
            else:
                assert (w == 0).sum().item() == round(0.7 * w.numel()), (i, local)
    assert len(results) == 3 * 7
    # each layer's error, measured again by hand: ||(W - W_hat) X|| / ||W X|| with X the
    # layer's input in the pruned model (6 x 48 tokens, fewer than error_tokens: all of them)
    inputs = layer_inputs(llama, windows)
    for r in results:
        x, w = inputs[r.name], get_weight(dense.get_submodule(r.name)).detach()
        w_hat = get_weight(llama.get_submodule(r.name)).detach()
        expected = ((x @ (w - w_hat).t()).norm() / (x @ w.t()).norm()).item()
        assert r.rel_error == pytest.approx(expected, rel=1e-4), r.name
    assert set(timings) == {"capture", "read", "statistics", "solve", "propagate"}


def layer_inputs(model, windows) -> dict[str, torch.Tensor]:
    """Every prunable layer's input tokens ``[tokens, in_features]`` when ``model`` runs
    on ``windows`` (float32, no engine involved)."""
    names = prunable_layers(model, adapter_for(model))
    inputs: dict[str, list] = {name: [] for name in names}
    hooks = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda mod, args, n=name: inputs[n].append(args[0].reshape(-1, args[0].shape[-1]))
        )
        for name in names
    ]
    with torch.no_grad():
        model(windows)
    for hook in hooks:
        hook.remove()
    return {name: torch.cat(xs).float() for name, xs in inputs.items()}


def test_only_planned_layers_are_pruned(llama, windows):
    adapter = adapter_for(llama)
    patterns = {n: Unstructured(0.5) for n in prunable_layers(llama, adapter) if "mlp" in n}
    before = {n: p.clone() for n, p in llama.named_parameters()}
    prune_blocks(
        MemoryStore(llama, adapter),
        windows,
        sparsity_levels(patterns),
        [pruner("wanda")],
        device=torch.device("cpu"),
        dtype=torch.float32,
        batch_size=3,
        progress=False,
    )
    for name, p in llama.named_parameters():
        if "self_attn" in name or "norm" in name or "embed" in name:
            assert torch.equal(p, before[name]), name


def test_bfloat16_checkpoint_pruned_in_float32_and_saved_in_bfloat16(tmp_path, tokenizer_dir):
    from conftest import build_checkpoint

    src = build_checkpoint(tmp_path / "bf16", "llama", tokenizer_dir, dtype=torch.bfloat16)
    model, report = prunella.prune(
        src, sparsity=0.5, nsamples=4, seqlen=32, compute_dtype="float32", progress=False
    )
    assert report["dtype"] == "bfloat16" and report["compute_dtype"] == "float32"
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert abs(report["sparsity"] - 0.5) < 1e-6
    out = prunella.save(model, tmp_path / "out", report)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert next(reloaded.parameters()).dtype == torch.bfloat16


@pytest.mark.parametrize("native", [True, False])
def test_auto_compute_dtype_on_cpu_follows_native_bfloat16(monkeypatch, native):
    from prunella.engine import device

    monkeypatch.setattr(device, "native_bf16", lambda: native)
    cpu = torch.device("cpu")
    expected = torch.bfloat16 if native else torch.float32
    assert device.resolve_compute_dtype(torch.float32, cpu) == expected
    assert device.resolve_compute_dtype(torch.float32, cpu, "float32") == torch.float32
    assert device.resolve_compute_dtype(torch.float16, torch.device("cuda")) == torch.float16


def test_bfloat16_forward_prunes_close_to_float32(tiny_llama):
    """The forward's dtype changes the calibration activations slightly, not the result."""
    runs = {}
    for dtype in ("float32", "bfloat16"):
        model, report = prunella.prune(
            copy.deepcopy(tiny_llama),
            sparsity=0.5,
            nsamples=8,
            seqlen=32,
            compute_dtype=dtype,
            progress=False,
        )
        assert report["compute_dtype"] == dtype
        assert next(model.parameters()).dtype == torch.float32  # the weights stay float32
        masks = {n: p == 0 for n, p in model.named_parameters() if "proj" in n}
        errors = [layer["rel_error"] for layer in report["layers"]]
        runs[dtype] = masks, sum(errors) / len(errors)
    (masks32, error32), (masks16, error16) = runs["float32"], runs["bfloat16"]
    for name, mask in masks32.items():
        assert (mask == masks16[name]).float().mean().item() > 0.9, name
    assert abs(error16 - error32) < 0.1 * error32


def test_narrow_forward_leaves_the_checkpoint_precision_alone(tiny_llama):
    """A bfloat16 forward must not round the float32 weights: magnitude (data-free)
    gives bit for bit the same model, and unpruned tensors stay untouched."""
    dense = AutoModelForCausalLM.from_pretrained(tiny_llama)
    before = {n: p.detach().clone() for n, p in dense.named_parameters()}
    runs = []
    for dtype in ("float32", "bfloat16"):
        model, _ = prunella.prune(
            copy.deepcopy(dense),
            sparsity=0.5,
            solver="magnitude",
            calibration=torch.randint(0, dense.config.vocab_size, (2, 16)),
            compute_dtype=dtype,
            progress=False,
        )
        runs.append(dict(model.named_parameters()))
    for name, weight in runs[0].items():
        assert weight.dtype == torch.float32
        assert torch.equal(weight, runs[1][name]), name
        if "proj" not in name:
            assert torch.equal(weight, before[name]), name


def test_forward_precision_narrows_only_the_matmuls_on_cpu():
    from prunella.engine.forward import forward_precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert forward_precision(torch.bfloat16, cpu) == (torch.float32, torch.bfloat16)
    assert forward_precision(torch.float32, cpu) == (torch.float32, None)
    assert forward_precision(torch.bfloat16, cuda) == (torch.bfloat16, None)


def test_autocast_forward_sees_weights_pruned_in_place():
    """Two passes prune a weight in place between two forwards: a cached bfloat16 cast
    of the dense weight would be served to the second one."""
    from prunella.engine.forward import matmuls_in

    layer = torch.nn.Linear(8, 4)  # a parameter that requires grad: autocast would cache it
    x = torch.randn(3, 8)
    with torch.no_grad(), matmuls_in(torch.bfloat16, torch.device("cpu")):
        assert layer(x).dtype == torch.bfloat16  # the product did run in bfloat16
        layer.weight.zero_()
        assert torch.equal(layer(x), layer.bias.to(torch.bfloat16).expand(3, 4))


def test_mixed_forward_keeps_statistics_in_float32(tiny_llama):
    """Under the bfloat16 forward, layer inputs stay float32 and the Hessian is summed
    in float32: block 0's q_proj reads the embeddings through RMSNorm (no product
    before it), so its Hessian is bit for bit the float32 forward's."""
    from prunella.engine.forward import visit_blocks
    from prunella.engine.stats import HESSIAN
    from prunella.io.models import load

    model, _, _, adapter = load(tiny_llama)
    windows = torch.randint(0, model.config.vocab_size, (4, 16))
    hessians = {}
    for dtype in (torch.float32, torch.bfloat16):

        def visit(prefix, layers, dtype=dtype):
            if prefix == "model.layers.0.":
                hessians[dtype] = layers["model.layers.0.self_attn.q_proj"][1].hessian

        visit_blocks(
            MemoryStore(model, adapter),
            visit,
            needs=frozenset({HESSIAN}),
            windows=windows,
            device=torch.device("cpu"),
            dtype=dtype,
            batch_size=2,
            progress=False,
        )
    assert hessians[torch.bfloat16].dtype == torch.float32
    assert torch.equal(hessians[torch.float32], hessians[torch.bfloat16])


def test_unknown_compute_dtype_is_an_error(tiny_llama):
    with pytest.raises(prunella.PrunellaError, match="compute-dtype"):
        prunella.prune(tiny_llama, sparsity=0.5, nsamples=2, seqlen=16, compute_dtype="int8")


def test_report_contents(tiny_llama):
    _, report = prunella.prune(
        tiny_llama, pattern="2:4", solver="wanda", nsamples=4, seqlen=32, progress=False
    )
    for key in (
        "solver",
        "pattern",
        "target_sparsity",
        "sparsity",
        "seed",
        "calibration",
        "wall_seconds",
        "peak_rss_mb",
        "layers",
        "seconds",
    ):
        assert key in report
    assert report["pattern"] == "2:4" and report["target_sparsity"] == 0.5
    layer = report["layers"][0]
    assert {"name", "shape", "target_sparsity", "sparsity", "rel_error"} <= set(layer)
    assert report["calibration"]["tokens"] == 4 * 32


def test_one_pass_calibrates_each_layer_on_pruned_predecessors(llama, windows):
    """One pass: q_proj (first in its block) sees the same input as in two passes, while
    o_proj sees the output of the *pruned* q/k/v projections."""
    seen = {}
    wanda = get_solver("wanda")

    def recording(weight, pattern, stats):
        seen.setdefault(len(seen), stats.col_norms.clone())
        return wanda.prune(weight, pattern, stats)

    module = SimpleNamespace(PAPER="", NEEDS=frozenset({COL_NORMS}), OPTIONS=(), prune=recording)
    solver = Method("solver", "recording", module)
    one, two = copy.deepcopy(llama), copy.deepcopy(llama)
    run(one, windows, solver=solver, one_pass=True)
    first = dict(seen)
    seen.clear()
    run(two, windows, solver=solver)
    assert torch.allclose(first[0], seen[0])  # block 0, q_proj: the same dense input
    assert not torch.allclose(first[3], seen[3])  # block 0, o_proj: pruned q/k/v upstream
    for p, q in zip(one.parameters(), two.parameters(), strict=True):
        assert (p == 0).sum() == (q == 0).sum()


def test_one_pass_equals_two_passes_for_magnitude(llama, windows):
    one, two = copy.deepcopy(llama), copy.deepcopy(llama)
    run(one, windows, solver="magnitude", one_pass=True)
    run(two, windows, solver="magnitude")
    for p, q in zip(one.parameters(), two.parameters(), strict=True):
        assert torch.equal(p, q)


def test_default_passes_depend_on_the_model_and_calibration_never_on_free_memory(
    tiny_llama, monkeypatch
):
    """The same command gives the same masks on any machine: ``passes=auto`` is decided
    from the model and the calibration size alone. (Nothing in prunella reads the free
    memory, /proc/meminfo or torch.cuda.mem_get_info: there is nothing to fake.)"""
    import prunella.engine.prune as engine

    config = AutoModelForCausalLM.from_pretrained(tiny_llama).config
    # what one pass holds, by hand: 2 x tokens x (hidden + max(ffn, 4 hidden)) float32s
    assert config.hidden_size == 64 and config.intermediate_size == 128
    assert engine.one_pass_bytes(config, 4, 32) == 2 * 4 * 32 * (64 + 256) * 4
    monkeypatch.setattr(engine, "ONE_PASS_BYTES", engine.one_pass_bytes(config, 4, 32))
    assert engine.choose_passes("auto", config, 4, 32) == 1
    assert engine.choose_passes("auto", config, 8, 32) == 2  # twice the activations
    assert engine.choose_passes("auto", config, 8, 16) == 1  # the same tokens
    assert engine.choose_passes(2, config, 4, 32) == 2
    # the pipeline asks the engine's rule, with the recipe's calibration size
    for nsamples, passes in ((4, 1), (8, 2)):
        auto, report = prunella.prune(
            tiny_llama, sparsity=0.5, nsamples=nsamples, seqlen=32, progress=False
        )
        assert report["passes"] == passes
        fixed, _ = prunella.prune(
            tiny_llama, sparsity=0.5, nsamples=nsamples, seqlen=32, passes=passes, progress=False
        )
        for p, q in zip(auto.parameters(), fixed.parameters(), strict=True):
            assert torch.equal(p, q)
