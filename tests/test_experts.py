"""Mixtures of experts: every expert's gate, up and down matrices (inside fused 3-D
parameters) are layers of their own, calibrated on the tokens routed to that expert."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from conftest import MOE_FAMILIES, build_checkpoint, tiny_config
from test_resume import KILL_AFTER_BLOCK, run_killed, weights
from transformers import AutoModelForCausalLM

import prunella
from prunella.cli import main
from prunella.engine.adapters import adapter_for, get_weight
from prunella.engine.experts import ExpertLinear, expert_of, expert_views, is_fused_experts, routed
from prunella.engine.forward import visit_blocks
from prunella.engine.stats import HESSIAN
from prunella.engine.store import MemoryStore


def fused_experts(model):
    return [(n, m) for n, m in model.named_modules() if is_fused_experts(m)]


def tiny_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family)).eval()
    for _, experts in fused_experts(model):  # some families initialise the experts to zero
        for param in experts.parameters():
            param.data.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_views_are_the_fused_parameters_and_the_routed_forward_is_the_models(family):
    model = tiny_model(family)
    _name, experts = fused_experts(model)[0]
    views = expert_views(experts)
    gated = experts.has_gate
    assert len(views) == experts.num_experts * (3 if gated else 2)
    # a write through a view lands in the fused parameter, and nowhere else
    before = {k: p.detach().clone() for k, p in experts.named_parameters()}
    view = views["1.up_proj"]
    view.weight.data.fill_(7.0)
    changed = {k: (p != before[k]).sum().item() for k, p in experts.named_parameters()}
    assert (
        changed[view.param] == view.weight.numel() and sum(changed.values()) == view.weight.numel()
    )
    for k, p in experts.named_parameters():
        p.data.copy_(before[k])
    # the model's own forward and the one through the views give the same logits
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        expected = model(ids).logits
        calls = []
        handle = view.register_forward_pre_hook(lambda module, args: calls.append(len(args[0])))
        with routed(model):
            got = model(ids).logits
        handle.remove()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert len(calls) == 1 and calls[0] < 2 * 24  # the tokens routed to expert 1 only


def test_gpt_oss_views_follow_its_interleaved_transposed_layout():
    model = tiny_model("gpt_oss")
    _, experts = fused_experts(model)[0]
    views = expert_views(experts)
    fused = experts.gate_up_proj[2]  # [hidden, 2 * intermediate], gate and up interleaved
    assert torch.equal(views["2.gate_proj"].weight, fused[:, 0::2].t())
    assert torch.equal(views["2.up_proj"].weight, fused[:, 1::2].t())
    assert torch.equal(views["2.down_proj"].weight, experts.down_proj[2].t())
    assert torch.equal(views["2.up_proj"].bias, experts.gate_up_proj_bias[2][1::2])


def test_layers_are_every_expert_matrix_but_not_the_routers():
    model = tiny_model("qwen2_moe")
    layers = adapter_for(model).layers(model)
    block0 = [n.removeprefix("model.layers.0.") for n in layers if n.startswith("model.layers.0.")]
    experts = [n for n in block0 if n.startswith("mlp.experts.")]
    assert len(experts) == 4 * 3 and "mlp.experts.3.down_proj" in experts
    assert {"mlp.shared_expert.gate_proj", "mlp.shared_expert.up_proj"} <= set(block0)
    assert "mlp.shared_expert_gate" not in block0 and "mlp.gate" not in block0
    assert expert_of("model.layers.0.mlp.experts.3.down_proj") == "model.layers.0.mlp.experts.3"
    assert expert_of("model.layers.0.mlp.shared_expert.down_proj") is None


def test_each_experts_hessian_comes_from_its_routed_tokens_only():
    model = tiny_model("qwen3_moe")
    ids = torch.randint(0, model.config.vocab_size, (3, 20))
    seen = {}

    def record(module, args):  # the experts module's input: tokens and the router's choice
        seen["x"], seen["index"] = args[0].detach().clone(), args[1].detach().clone()

    experts = model.model.layers[0].mlp.experts
    handle = experts.register_forward_pre_hook(record)
    with torch.no_grad():
        model(ids)
    handle.remove()
    stats = {}
    visit_blocks(
        MemoryStore(model, adapter_for(model)),
        lambda prefix, layers: stats.update({n: s for n, (_, s) in layers.items()}),
        needs=frozenset({HESSIAN}),
        windows=ids,
        device=torch.device("cpu"),
        dtype=torch.float32,
        batch_size=3,
        progress=False,
    )
    for e in range(experts.num_experts):
        x = seen["x"][(seen["index"] == e).any(-1)]
        got = stats[f"model.layers.0.mlp.experts.{e}.gate_proj"]
        assert got.tokens == len(x) and got is stats[f"model.layers.0.mlp.experts.{e}.up_proj"]
        torch.testing.assert_close(got.hessian, 2 / len(x) * x.t() @ x, rtol=1e-4, atol=1e-5)
        assert got.routed_weight > 0


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_half_of_every_experts_gate_up_and_down_is_zero(family, tmp_path, tokenizer_dir):
    src = build_checkpoint(tmp_path / "src", family, tokenizer_dir)
    out = tmp_path / "out"
    report = prunella.prune_to_dir(
        model=str(src), out=str(out), sparsity=0.5, nsamples=8, seqlen=64, progress=False
    )
    model = AutoModelForCausalLM.from_pretrained(out)
    for name, experts in fused_experts(model):
        fused = experts.gate_up_proj  # [E, 2I, H]: gate rows, then up rows
        half = fused.shape[1] // 2
        for e in range(experts.num_experts):
            for matrix in (fused[e, :half], fused[e, half:], experts.down_proj[e]):
                assert (matrix == 0).sum().item() == matrix.numel() // 2, (name, e)
    rows = {r["name"]: r for r in report["layers"]}
    experts_rows = [r for n, r in rows.items() if expert_of(n)]
    assert len(experts_rows) == 3 * 4 * 3  # blocks x experts x (gate, up, down)
    # each expert's reported error is its own reconstruction error: SparseGPT's update
    # makes it lower than magnitude pruning's on the same expert and tokens, layer by layer
    magnitude = prunella.prune_to_dir(
        model=str(src), out=str(tmp_path / "magnitude"), sparsity=0.5, solver="magnitude",
        nsamples=8, seqlen=64, progress=False,
    )  # fmt: skip
    baseline = {r["name"]: r["rel_error"] for r in magnitude["layers"]}
    for row in experts_rows:
        assert row["sparsity"] == 0.5
        assert 0 < row["rel_error"] < baseline[row["name"]], row["name"]
    # every calibration token reaches top_k experts in each block
    tokens = 8 * 64 * model.config.num_experts_per_tok
    block0 = [r["routed_tokens"] for n, r in rows.items() if ".0.mlp" in n and "gate_proj" in n]
    assert sum(block0) == tokens
    saved = json.loads((out / "prune_report.json").read_text())
    assert saved["sparsity"] == pytest.approx(0.5, abs=1e-3)


def test_reported_sparsity_counts_the_experts(tmp_path, tokenizer_dir):
    """50% of all prunable weights: the fused experts are most of them."""
    src = build_checkpoint(tmp_path / "src", "olmoe", tokenizer_dir)
    model, report = prunella.prune(src, sparsity=0.5, nsamples=4, seqlen=32, progress=False)
    zeros = total = 0
    for block in model.model.layers:
        for name, param in block.named_parameters():
            if name.endswith("proj.weight") or (name.endswith("_proj") and "experts" in name):
                zeros, total = zeros + (param == 0).sum().item(), total + param.numel()
    assert zeros / total == pytest.approx(0.5, abs=1e-3)
    assert report["sparsity"] == pytest.approx(zeros / total, abs=1e-6)
    assert (model.model.layers[0].mlp.gate.weight != 0).all()  # the router stays dense


def test_an_expert_with_too_few_tokens_is_pruned_by_magnitude(tmp_path, tokenizer_dir):
    src = build_checkpoint(tmp_path / "src", "mixtral", tokenizer_dir)
    model, report = prunella.prune(
        src, sparsity=0.5, nsamples=2, seqlen=16, expert_min_tokens=10**6, progress=False
    )
    expert_rows = [r for r in report["layers"] if expert_of(r["name"])]
    assert all("pruned by magnitude" in r["note"] for r in expert_rows)
    assert not any("note" in r for r in report["layers"] if not expert_of(r["name"]))
    assert any("pruned by magnitude" in note for note in report["notes"])
    dense = AutoModelForCausalLM.from_pretrained(src)
    for layer in expert_rows[:6]:
        pruned = get_weight(adapter_of(model, layer["name"]))
        original = get_weight(adapter_of(dense, layer["name"]))
        kept = original.abs() > original.abs().flatten().kthvalue(original.numel() // 2).values
        assert torch.equal(pruned != 0, kept)


def adapter_of(model, name: str) -> ExpertLinear:
    adapter = adapter_for(model)
    index = int(name.split(".")[2])
    return adapter.linears(adapter.blocks(model)[index])[name.split(".", 3)[3]]


def test_moe_resume_after_sigkill_is_the_uninterrupted_model(tmp_path, tokenizer_dir):
    src = build_checkpoint(tmp_path / "src", "qwen3_moe", tokenizer_dir)
    common = ["--nsamples", "4", "--seqlen", "32", "--batch-size", "2", "--quiet"]
    assert main(["prune", str(src), "--out", str(tmp_path / "ref"), *common]) == 0
    for first, second in (("none", "none"), ("disk", "none")):
        out = tmp_path / f"out-{first}"
        argv = ["prune", str(src), "--out", str(out), "--offload", first, *common]
        assert run_killed(argv, block=0, script=KILL_AFTER_BLOCK).returncode == -9
        assert main([*argv[:4], "--offload", second, *common, "--resume"]) == 0
        reference, resumed = weights(tmp_path / "ref"), weights(out)
        for name, tensor in reference.items():
            assert torch.equal(resumed[name], tensor), (first, name)


def test_expert_granularity_gives_each_expert_its_own_sparsity_and_usage_orders_them(
    tmp_path, tokenizer_dir
):
    """DeepSeek-V3: block 0 dense, then experts beside a shared expert."""
    src = build_checkpoint(tmp_path / "src", "deepseek_v3", tokenizer_dir)
    _, report = prunella.prune(
        src, sparsity=0.6, allocation="expert_usage", granularity="expert",
        nsamples=4, seqlen=64, progress=False,
    )  # fmt: skip
    plan = report["plan"]["axes"]["sparsity"]
    assert plan["granularity"] == "expert" and report["sparsity"] == pytest.approx(0.6, abs=1e-4)
    # one unit per expert, plus the rest of each block (attention, shared expert, router-free)
    assert set(plan["metric"]) == {
        f"model.layers.{b}.mlp.experts.{e}" for b in (1, 2) for e in range(4)
    }
    for b in (1, 2):
        experts = [f"model.layers.{b}.mlp.experts.{e}" for e in range(4)]
        usage = [plan["metric"][u] for u in experts]
        sparsity = [plan["sparsity"][f"{u}.gate_proj"] for u in experts]
        assert (
            len(
                {
                    plan["sparsity"][f"{experts[0]}.{p}"]
                    for p in ("gate_proj", "up_proj", "down_proj")
                }
            )
            == 1
        )
        # the more an expert is used, the less it loses
        order = sorted(range(4), key=usage.__getitem__)
        assert all(sparsity[i] >= sparsity[j] - 2e-3 for i, j in itertools.pairwise(order))
        assert max(sparsity) - min(sparsity) > 0.02
        rest = {plan["sparsity"][n] for n in plan["sparsity"] if n.startswith(f"model.layers.{b}.")
                and ".experts." not in n}  # fmt: skip
        assert max(rest) - min(rest) < 2e-3  # one unit: attention and the shared expert


def test_any_allocation_method_works_per_expert(tmp_path, tokenizer_dir):
    src = build_checkpoint(tmp_path / "src", "qwen3_moe", tokenizer_dir)
    for method in ("owl", "alphapruning", "erk"):
        _, report = prunella.prune(
            src, sparsity=0.5, allocation=method, granularity="expert", solver="wanda",
            nsamples=4, seqlen=32, progress=False,
        )  # fmt: skip
        sparsity = report["plan"]["axes"]["sparsity"]["sparsity"]
        assert report["sparsity"] == pytest.approx(0.5, abs=1e-4), method
        experts = {n.rsplit(".", 1)[0] for n in sparsity if expert_of(n)}
        assert len(experts) == 3 * 4
        per_expert = {
            u: {sparsity[f"{u}.{p}"] for p in ("gate_proj", "up_proj", "down_proj")}
            for u in experts
        }
        assert all(max(v) - min(v) < 2e-3 for v in per_expert.values()), method


@pytest.mark.parametrize(
    "family, extra",
    [
        ("qwen2_moe", {}),  # mlp.gate (a router module), mlp.shared_expert_gate (a Linear)
        ("afmoe", {}),  # mlp.router.gate
        ("hunyuan_v1_moe", {}),  # mlp.gate.wg
        # router.proj, the experts on the block itself
        ("gemma4_text", dict(enable_moe_block=True, top_k_experts=2)),
    ],
)
def test_routers_are_not_pruned_wherever_they_sit(family, extra):
    from conftest import GENERIC, MOE
    from transformers import AutoConfig

    config = AutoConfig.for_model(family, **GENERIC, **MOE, **extra)
    model = AutoModelForCausalLM.from_config(config)
    adapter = adapter_for(model)
    block = adapter.blocks(model)[1]
    layers = adapter.linears(block)
    routers = [
        name
        for name, module in block.named_modules()
        if isinstance(module, torch.nn.Linear) and module.out_features in (4, 1)
    ]
    assert routers and not set(routers) & set(layers), routers
    assert sum(".experts." in n or n.startswith("experts.") for n in layers) == 4 * 3


def test_views_do_not_keep_a_model_alive_and_routed_restores_the_forward():
    import gc
    import weakref

    model = tiny_model("mixtral")
    adapter_for(model).layers(model)  # builds every view
    experts = model.model.layers[0].mlp.experts
    own = lambda *args: None  # noqa: E731  (an instance forward, as accelerate's hooks set)
    experts.forward = own
    with routed(model):
        assert experts.forward.__func__.__name__ == "routed_forward"
    assert experts.forward is own
    alive = weakref.ref(experts)
    del model, experts, own
    gc.collect()
    assert alive() is None
