"""The structure axis: blocks removed, MLP channels and KV groups cut, a smaller model
that transformers loads; each step checked against what it claims to compute."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import FAMILIES, MOE_FAMILIES, build_checkpoint, tiny_config
from transformers import AutoConfig, AutoModelForCausalLM

from prunella.cli import main
from prunella.errors import PrunellaError
from prunella.methods import structure
from prunella.methods.structure import cut, evopress, layout, reap, shortgpt, slimgpt, tpe

CPU = torch.device("cpu")


def tiny(family: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(family)).eval()


def windows(n: int = 8, length: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 384, (n, length), generator=torch.Generator().manual_seed(seed))


def recipe(**kw):
    base = dict(params=0.7, cut="auto", width_method="slimgpt", fitness_tokens=64)
    return SimpleNamespace(**{**base, **kw})


def ls_error(w: torch.Tensor, x: torch.Tensor, keep: torch.Tensor) -> float:
    """The least-squares error of reproducing ``w @ x`` from the rows ``keep`` of ``x``."""
    solution = torch.linalg.lstsq(x[keep].T, (w @ x).T).solution.T
    return float(((w @ x - solution @ x[keep]) ** 2).sum())


def test_obs_removes_the_column_whose_loss_least_squares_can_best_make_up():
    """SlimGPT's first removal is the column whose removal, with the others refit, costs
    least (exact OBS), and the refit is the least-squares solution."""
    torch.manual_seed(0)
    x = torch.randn(12, 400, dtype=torch.float64)
    x[3] = x[5] * 0.9 + 0.01 * x[3]  # a nearly redundant column: cheap to remove
    w = torch.randn(7, 12, dtype=torch.float64)
    h = x @ x.T
    errors = [ls_error(w, x, torch.tensor([c for c in range(12) if c != j])) for j in range(12)]
    first = slimgpt.removal_order(w, h, group=1, stop=11)
    assert first == [min(range(12), key=errors.__getitem__)]
    keep = torch.tensor([c for c in range(12) if c not in first])
    direct = torch.linalg.lstsq(x[keep].T, (w @ x).T).solution.T
    assert torch.allclose(slimgpt.refit(w, h, keep, percdamp=1e-12).double(), direct, atol=1e-4)
    # with the paper's 1% dampening: between the exact refit and no refit at all
    damped = slimgpt.refit(w, h, keep).double()
    error = float(((w @ x - damped @ x[keep]) ** 2).sum())
    assert errors[first[0]] < error < float(((w @ x - w[:, keep] @ x[keep]) ** 2).sum())


def test_obs_groups_remove_whole_heads_and_beat_magnitude_on_correlated_inputs():
    torch.manual_seed(0)
    x = torch.randn(16, 600, dtype=torch.float64)
    x[8:12] = x[0:4] + 0.05 * torch.randn(4, 600, dtype=torch.float64)  # group 2 ~ group 0
    w = torch.randn(6, 16, dtype=torch.float64)
    w[:, 8:12] *= 3  # and it is large: magnitude keeps it
    h = x @ x.T
    obs = slimgpt.removal_order(w, h, group=4, stop=3)
    mag = structure.magnitude.removal_order(w, h, group=4, stop=3)

    def error(order):
        keep = layout.Layout(0, 4, 1, 4, ()).keep_index("kv", cut.kept_units(order, 4, 3))
        return ls_error(w, x, keep)

    assert obs == [min(range(4), key=lambda g: error([g]))]  # the exact best group
    assert obs[0] in (0, 2) and error(obs) < 0.2 * error(mag)


def test_block_influence_is_one_minus_the_mean_cosine():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    y = torch.tensor([[1.0, 1.0], [0.0, -3.0]])
    sums = shortgpt.token_cosines(x, y)
    assert float(sums) == pytest.approx(2**-0.5 - 1.0)
    assert float(shortgpt.block_influence(sums, 2)) == pytest.approx(1 - (2**-0.5 - 1) / 2)
    assert shortgpt.lowest_influence(torch.tensor([0.3, 0.1, 0.2, 0.1]), 2) == [1, 3]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_a_cut_without_refit_is_the_dense_model_with_those_units_zeroed(family):
    """Removing channels and a KV group (magnitude, no refit) gives the logits of the
    dense model whose down_proj / o_proj columns of those units are zero; removing a
    block gives the logits of the dense model that skips it."""
    model = tiny(family)
    ids = windows(2)
    lay = layout.layout_of(model, model.model.layers[0])
    stats = cut.gather(model, windows(), lay, CPU, 4, progress=False)
    orders = cut.removal_orders(model, lay, stats, "magnitude", 100, 1)
    shape = cut.Shape((1,), 100, 1)
    smaller = cut.build(model, shape, lay, stats, orders, reconstruct=False)
    assert smaller.config.num_hidden_layers == 2
    assert smaller.config.intermediate_size == 100 and smaller.config.num_key_value_heads == 1
    assert smaller.config.num_attention_heads == 2

    dense = tiny(family)
    for i, block in enumerate(dense.model.layers):
        removed = torch.ones(lay.width, dtype=torch.bool)
        removed[cut.kept_units(orders[i]["channel"], lay.width, 100)] = False
        block.mlp.down_proj.weight.data[:, removed] = 0
        kept_kv = cut.kept_units(orders[i]["kv"], lay.kv_groups, 1)
        columns = lay.keep_index("query", kept_kv)
        keep_cols = torch.zeros(block.self_attn.o_proj.in_features, dtype=torch.bool)
        keep_cols[columns] = True
        block.self_attn.o_proj.weight.data[:, ~keep_cols] = 0
    dense.model.layers[1].forward = lambda hidden_states, *a, **k: hidden_states
    with torch.no_grad():
        assert torch.allclose(smaller(ids).logits, dense(ids).logits, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma2", "opt", "cohere"])
def test_the_dense_reference_is_its_last_hidden_states_and_its_kl_to_itself_is_zero(family):
    """In memory the dense model's reference is the hidden states leaving its last
    block (not ``seqlen x vocab`` log-probabilities); its own head on them gives the
    log-probabilities of its forward (softcapping, logit scales), so its KL to itself is
    0, and a model with one block removed is not."""
    from prunella.methods.structure.sources import InMemory

    model, calib = tiny(family), windows(2)
    source = InMemory(model, CPU, 4, False)
    reference = source.reference(calib)
    assert [r.shape for r in reference] == [(1, calib.shape[1], 64)] * 2
    assert source.result_kl(model, reference, calib) == pytest.approx(0.0, abs=1e-6)
    shorter = cut.assemble(model, cut.Shape((1,), 0, 0), None, {})
    assert source.result_kl(shorter, reference, calib) > 1e-7


def test_refit_brings_the_cut_model_closer_to_the_dense_one():
    model = tiny()
    calib = windows(16)
    kl = {}
    for method in ("slimgpt", "magnitude"):
        asked = recipe(cut="width", width_method=method)
        _, report = structure.shrink(model, calib, asked, CPU, 4, progress=False)
        kl[method] = report["kl"]
    assert kl["slimgpt"] < 0.7 * kl["magnitude"]


@pytest.mark.parametrize("params", [0.9, 0.7, 0.45])
def test_the_budget_is_met_from_below_to_one_channel_per_block(params):
    model = tiny()
    sizes = cut.block_params(model)
    lay = layout.layout_of(model, model.model.layers[0])
    per_unit = lay.per_unit(model.model.layers[0])
    influence = torch.tensor([0.5, 0.2, 0.3])
    shapes = structure.candidates(sizes, influence, lay, per_unit, params, "auto")
    target = params * sum(sizes)
    for shape in shapes:
        kept = structure.kept_params(shape, sizes, lay, per_unit)
        assert kept <= target
        blocks = len(sizes) - len(shape.removed)
        if shape.width < lay.width:  # a width cut: within one channel per block
            assert kept > target - blocks * per_unit[0]
        smaller = cut.build(model, shape, lay, None, _no_orders(model, lay), False)
        assert sum(cut.block_params(smaller)) == kept
    assert [s.removed for s in shapes][:1] == [()]
    deepest = shapes[-1].removed
    assert deepest == tuple(shortgpt.lowest_influence(influence, len(deepest)))


def _no_orders(model, lay):
    n = model.config.num_hidden_layers
    return [{"channel": list(range(lay.width)), "kv": list(range(lay.kv_groups))}] * n


@pytest.mark.parametrize(
    "family", ["llama", "mistral", "qwen2", "qwen3", "gemma", "granite", "olmo2", "helium"]
)
def test_families_cut_save_and_reload_with_the_same_logits(family, tmp_path):
    model = tiny(family)
    smaller, report = structure.shrink(model, windows(), recipe(params=0.6), CPU, 4, False)
    assert report["kept_params"] <= 0.6 * report["block_params"]
    smaller.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = windows(2)
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, smaller(ids).logits, atol=1e-5)
    assert loaded.generate(ids[:1, :4], max_new_tokens=3, do_sample=False).shape == (1, 7)


@pytest.mark.parametrize("family", ["opt", "gpt2", "phi3", "mixtral"])
def test_depth_only_families_remove_blocks_and_refuse_a_width_cut(family, tmp_path):
    """Blocks without separate q/k/v/o and MLP projections (a mixture of experts: its
    experts go instead, below) lose whole blocks."""
    model = tiny(family)
    with pytest.raises(PrunellaError, match="cannot be cut"):
        structure.shrink(model, windows(), recipe(cut="width"), CPU, 4, False)
    smaller, report = structure.shrink(model, windows(), recipe(cut="depth"), CPU, 4, False)
    assert report["blocks"] == 2 and report["intermediate_size"] is None
    smaller.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = windows(2)
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, smaller(ids).logits, atol=1e-5)


def test_prune_params_writes_a_smaller_checkpoint(tmp_path, tokenizer_dir, capsys):
    source = build_checkpoint(tmp_path / "m", "llama", tokenizer_dir)
    out = tmp_path / "out"
    flags = ["--nsamples", "8", "--seqlen", "32", "--fitness-tokens", "64", "--quiet"]
    assert main(["prune", str(source), "--out", str(out), "--params", "0.7", *flags]) == 0
    assert "structure: " in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    report = json.loads((out / "prune_report.json").read_text())
    assert report["structure"]["kept_fraction"] <= 0.7
    assert config["intermediate_size"] == report["structure"]["intermediate_size"]
    assert config["num_hidden_layers"] == report["structure"]["blocks"]
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert sum(cut.block_params(loaded)) == report["structure"]["kept_params"]
    # evaluated in the same run: the dense model before the cut, the smaller one after
    evaluated = tmp_path / "evaluated"
    assert main(["prune", str(source), "--out", str(evaluated), "--params", "0.7", *flags,
                 "--eval-data", "sample-eval", "--eval-max-windows", "2"]) == 0  # fmt: skip
    evaluation = json.loads((evaluated / "prune_report.json").read_text())["evaluation"]
    assert evaluation["perplexity"] != evaluation["dense_perplexity"]
    # composed: the smaller model is then pruned to 50%
    both = tmp_path / "both"
    assert main(["prune", str(source), "--out", str(both), "--params", "0.9",
                 "--sparsity", "0.5", *flags]) == 0  # fmt: skip
    report = json.loads((both / "prune_report.json").read_text())
    assert report["sparsity"] == pytest.approx(0.5, abs=1e-3)
    loaded = AutoModelForCausalLM.from_pretrained(both)
    assert loaded.config.intermediate_size == report["structure"]["intermediate_size"] < 128
    weight = loaded.model.layers[0].mlp.down_proj.weight
    assert weight.shape[1] == loaded.config.intermediate_size
    assert 0.3 < float((weight == 0).float().mean()) < 0.7


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--params", "0"], "--params: params is the fraction"),
        (["--params", "1.5"], "--params: params is the fraction"),
        (
            ["--params", "0.8", "--offload", "disk", "--eval-data", "sample-eval"],
            "cannot run with --offload disk",
        ),
        (["--params", "0.01", "--cut", "width", "--offload", "disk"], "no structure keeps"),
        (["--params", "0.8", "--allocation", "owl"], "has nothing to allocate"),
        (["--params", "0.01", "--cut", "width"], "no structure keeps"),
    ],
)
def test_bad_structure_input_is_one_line_and_writes_nothing(
    flags, message, tmp_path, tokenizer_dir, capsys
):
    source = build_checkpoint(tmp_path / "m", "llama", tokenizer_dir)
    capsys.readouterr()  # (the checkpoint's own progress bar)
    out = tmp_path / "out"
    code = main(["prune", str(source), "--out", str(out), *flags, "--nsamples", "4",
                 "--seqlen", "32", "--quiet"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code != 0 and message in err and len(err.splitlines()) == 1
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_block_by_block_cut_matches_the_one_pass_cut_where_their_inputs_agree():
    """SlimGPT's sequential cut sees the dense model's activations in block 0 (so it cuts
    it exactly as the one-pass cut does) and the cut blocks' activations after it."""
    model = tiny()
    calib = windows(16)
    lay = layout.layout_of(model, model.model.layers[0])
    shape = cut.Shape((), 80, lay.kv_groups)
    stats = cut.gather(model, calib, lay, CPU, 4, progress=False)
    orders = cut.removal_orders(model, lay, stats, "slimgpt", 80, lay.kv_groups)
    one_pass = cut.build(model, shape, lay, stats, orders, reconstruct=True)
    sequential = cut.build_sequential(model, shape, lay, "slimgpt", calib, CPU, 4, False)
    first = (one_pass.model.layers[0], sequential.model.layers[0])
    pairs = zip(first[0].parameters(), first[1].parameters(), strict=True)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in pairs)
    later = sequential.model.layers[2].mlp.down_proj.weight
    assert not torch.allclose(one_pass.model.layers[2].mlp.down_proj.weight, later, atol=1e-4)


def test_allocate_prints_the_structure_candidates_and_the_choice(tmp_path, tokenizer_dir, capsys):
    source = build_checkpoint(tmp_path / "m", "llama", tokenizer_dir)
    flags = ["--nsamples", "8", "--seqlen", "32", "--fitness-tokens", "64", "--quiet"]
    assert main(["allocate", str(source), "--params", "0.7", *flags]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:2] == ["removed", "blocks"] and len(out) >= 4
    assert out[-1].startswith("structure: ") and "of the blocks' parameters kept" in out[-1]


def test_a_plan_file_holds_the_structure_per_block_and_prune_applies_it(
    tmp_path, tokenizer_dir, capsys
):
    """``allocate --params --json``: the structure per block of the dense model and the
    other axes over the smaller model's layers; ``prune --allocation-file`` then cuts that
    structure without searching (``--params`` taken from the plan) and writes what the
    search-and-cut run writes; an edited plan is cut as edited."""
    from safetensors.torch import load_file

    source = build_checkpoint(tmp_path / "m", "llama", tokenizer_dir)
    flags = ["--nsamples", "8", "--seqlen", "32", "--fitness-tokens", "64", "--quiet"]
    plan_file = tmp_path / "plan.json"
    assert main(["allocate", str(source), "--params", "0.7", "--sparsity", "0.5", "--json",
                 str(plan_file), *flags]) == 0  # fmt: skip
    plan = json.loads(plan_file.read_text())
    blocks = plan["structure"]["blocks"]
    assert [b["block"] for b in blocks] == [0, 1, 2] and plan["structure"]["params"] == 0.7
    kept = [b for b in blocks if b["kept"]]
    assert len({(b["intermediate_size"], b["kv_groups"]) for b in kept}) == 1
    layers = plan["axes"]["sparsity"]["sparsity"]
    assert f"model.layers.{len(kept) - 1}.mlp.down_proj" in layers
    assert f"model.layers.{len(kept)}.mlp.down_proj" not in layers

    direct, applied = tmp_path / "direct", tmp_path / "applied"
    assert main(["prune", str(source), "--out", str(direct), "--params", "0.7",
                 "--sparsity", "0.5", *flags]) == 0  # fmt: skip
    assert main(["prune", str(source), "--out", str(applied), "--allocation-file",
                 str(plan_file), "--sparsity", "0.5", *flags]) == 0  # fmt: skip
    report = json.loads((applied / "prune_report.json").read_text())["structure"]
    assert report["cut"] == "given" and report["candidates"] == []
    a, b = load_file(direct / "model.safetensors"), load_file(applied / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # edited: block 0 removed, the others at MLP 96 and one KV group
    plan["structure"]["blocks"] = [
        {"block": 0, "kept": False},
        *({"block": i, "kept": True, "intermediate_size": 96, "kv_groups": 1, "experts": None}
          for i in (1, 2)),
    ]  # fmt: skip
    del plan["axes"]["sparsity"]
    plan_file.write_text(json.dumps(plan))
    edited = tmp_path / "edited"
    assert main(["prune", str(source), "--out", str(edited), "--allocation-file",
                 str(plan_file), *flags]) == 0  # fmt: skip
    config = AutoModelForCausalLM.from_pretrained(edited).config
    assert (config.num_hidden_layers, config.intermediate_size) == (2, 96)
    assert config.num_key_value_heads == 1
    capsys.readouterr()


@pytest.mark.parametrize(
    "flags",
    [["--params", "0.6", "--cut", "depth"], ["--cut", "width", "--width-method", "magnitude"]],
    ids=["depth", "magnitude"],
)
def test_a_plan_applied_writes_what_its_search_wrote(flags, tmp_path, tokenizer_dir):
    from safetensors.torch import load_file

    source = build_checkpoint(tmp_path / "m", "llama", tokenizer_dir)
    common = ["--nsamples", "8", "--seqlen", "32", "--fitness-tokens", "64", "--quiet"]
    flags = flags if "--params" in flags else ["--params", "0.7", *flags]
    plan_file = tmp_path / "plan.json"
    assert main(["allocate", str(source), *flags, "--json", str(plan_file), *common]) == 0
    direct, applied = tmp_path / "direct", tmp_path / "applied"
    assert main(["prune", str(source), "--out", str(direct), *flags, *common]) == 0
    assert main(["prune", str(source), "--out", str(applied), "--allocation-file",
                 str(plan_file), *common]) == 0  # fmt: skip
    a, b = load_file(direct / "model.safetensors"), load_file(applied / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda p: p["structure"].update(width_method="foo"), "width_method must be one of"),
        (lambda p: p["structure"]["blocks"][1].update(intermediate_size=64),
         "the configs cut here hold one of each"),
        (lambda p: p["structure"].update(params=0.5), "is for params 0.5"),
        (lambda p: p["structure"]["blocks"].pop(), "is for another model"),
        (lambda p: [b.update(intermediate_size=128, kv_groups=2)
                    for b in p["structure"]["blocks"]], "more than --params 0.7"),
        (lambda p: p.pop("structure"), "which holds no structure"),
    ],
    ids=["method", "uneven", "params", "blocks", "over", "none"],
)  # fmt: skip
def test_a_bad_structure_plan_is_one_line_and_writes_nothing(
    edit, message, tmp_path, tokenizer_dir, capsys
):
    source = build_checkpoint(tmp_path / "m", "llama", tokenizer_dir)
    capsys.readouterr()  # (the checkpoint's own progress bar)
    blocks = [{"block": i, "kept": True, "intermediate_size": 80, "kv_groups": 2,
               "experts": None} for i in range(3)]  # fmt: skip
    structure_ = {"params": 0.7, "width_method": "slimgpt", "blocks": blocks}
    plan = {"format": "prunella-plan/2", "axes": {}, "structure": structure_}
    edit(plan)
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    out = tmp_path / "out"
    code = main(["prune", str(source), "--out", str(out), "--params", "0.7", "--allocation-file",
                 str(tmp_path / "plan.json"), "--nsamples", "4", "--seqlen", "32",
                 "--quiet"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code != 0 and message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_reap_saliency_is_the_router_weight_times_the_expert_output_norm():
    """REAP's S_j on Mixtral's first block, written out from the router's top-k weights
    and the fused expert matrices: mean over the tokens routed to j of g_tj ||f_j(x_t)||."""
    model = tiny("mixtral")
    calib = windows(4)
    moe = model.model.layers[0].mlp
    seen = []
    handle = moe.register_forward_pre_hook(lambda m, args: seen.append(args[0].reshape(-1, 64)))
    experts = {0: reap.experts_of(model, model.model.layers[0])}
    stats = cut.gather(model, calib, None, CPU, 4, progress=False, experts=experts)
    handle.remove()
    x = torch.cat(seen).detach()
    probs = torch.softmax(x @ moe.gate.weight.detach().T, -1)
    top, index = torch.topk(probs, 2, dim=-1)
    top = top / top.sum(-1, keepdim=True)
    expected = []
    for j in range(4):
        token, slot = (index == j).nonzero(as_tuple=True)
        gate, up = (x[token] @ moe.experts.gate_up_proj[j].detach().T).chunk(2, dim=-1)
        out = (torch.nn.functional.silu(gate) * up) @ moe.experts.down_proj[j].detach().T
        expected.append(float((top[token, slot] * out.norm(dim=-1)).mean()))
    assert stats.saliency[0].tolist() == pytest.approx(expected, rel=1e-4)
    assert reap.removal_order(torch.tensor(expected), 3) == [
        min(range(4), key=expected.__getitem__)
    ]


def test_reap_saliency_of_llama4_is_the_norm_of_what_the_expert_adds():
    """Llama 4's experts take router-scaled inputs: S_j is the mean over the tokens
    routed to j of ||f_j(g_tj x_t)||, written out from the router's sigmoid top-k and
    the fused expert matrices."""
    model = tiny("llama4_text")
    calib = windows(4)
    block = next(b for b in model.model.layers if hasattr(b.feed_forward, "router"))
    moe = block.feed_forward
    seen = []
    handle = moe.register_forward_pre_hook(lambda m, args: seen.append(args[0].reshape(-1, 64)))
    index = list(model.model.layers).index(block)
    experts = {index: reap.experts_of(model, block)}
    stats = cut.gather(model, calib, None, CPU, 4, progress=False, experts=experts)
    handle.remove()
    x = torch.cat(seen).detach()
    logits = x @ moe.router.weight.detach().T
    top, chosen = torch.topk(logits, moe.router.top_k, dim=-1)
    count = moe.experts.num_experts
    expected = []
    for j in range(count):
        token, slot = (chosen == j).nonzero(as_tuple=True)
        scaled = x[token] * torch.sigmoid(top[token, slot])[:, None]
        gate, up = (scaled @ moe.experts.gate_up_proj[j].detach()).chunk(2, dim=-1)
        out = (up * torch.nn.functional.silu(gate)) @ moe.experts.down_proj[j].detach()
        expected.append(float(out.norm(dim=-1).mean()) if len(token) else 0.0)
    assert stats.saliency[index].tolist() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe", "granitemoe", "gpt_oss"])
def test_experts_removed_with_their_router_rows_and_the_config_count(family, tmp_path):
    model = tiny(family)
    calib = windows()
    smaller, report = structure.shrink(model, calib, recipe(params=0.75, cut="experts"), CPU,
                                       4, False)  # fmt: skip
    assert report["experts"] == 2 and report["dense_experts"] == 4
    assert report["kept_params"] <= 0.75 * report["block_params"]
    assert sum(cut.block_params(smaller)) == report["kept_params"]
    assert (
        smaller.config.to_dict()[reap.experts_of(model, model.model.layers[0]).config_keys[0]] == 2
    )
    retained = report["retained_experts"]
    for i, block in enumerate(smaller.model.layers):
        kept = torch.tensor(
            next(v for k, v in retained.items() if k.startswith(f"model.layers.{i}."))
        )
        dense = model.model.layers[i]
        moe = reap.experts_of(model, dense)
        held = {**dict(block.named_parameters()), **dict(block.named_buffers())}
        for name, tensor in moe.tensors(dense).items():
            assert torch.equal(held[name], tensor.index_select(0, kept))
    smaller.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(calib[:2]).logits, smaller(calib[:2]).logits, atol=1e-5)


def test_experts_that_a_token_needs_are_never_removed():
    model = tiny("mixtral")
    with pytest.raises(PrunellaError, match="more experts than a token is routed to"):
        structure.shrink(model, windows(), recipe(params=0.2, cut="experts"), CPU, 4, False)
    with pytest.raises(PrunellaError, match="has no routed experts"):
        structure.shrink(tiny(), windows(), recipe(cut="experts"), CPU, 4, False)


def test_evopress_finds_the_blocks_whose_removal_costs_least():
    """On a fitness that is the sum of known per-block costs, EvoPress's depth search,
    started from the worst set, ends at the cheapest set; every child keeps the size."""
    costs = [5.0, 0.3, 4.0, 0.1, 6.0, 3.0, 0.2, 7.0, 2.5, 8.0, 4.5, 9.0]
    rng = __import__("random").Random(1)
    for _ in range(50):
        assert len(evopress.mutate((0, 4, 7), 12, rng)) == 3
    seen = []

    def fitness(removed, count):
        seen.append(count)
        return sum(costs[i] for i in removed)

    worst = (7, 9, 11)
    found, facts = evopress.depth_search(fitness, worst, 12, (1, 4), minutes=1.0, evaluations=400)
    assert found == (1, 3, 6) and facts["kl"] == pytest.approx(0.6)
    assert set(seen) == {1, 4} and facts["evaluations"] >= 400


def test_prune_params_with_evopress_searches_which_blocks_go(tmp_path, tokenizer_dir, capsys):
    source = build_checkpoint(tmp_path / "m", "llama", tokenizer_dir)
    out = tmp_path / "out"
    flags = ["--nsamples", "8", "--seqlen", "32", "--fitness-tokens", "128", "--quiet"]
    assert main(["prune", str(source), "--out", str(out), "--params", "0.6", "--cut", "depth",
                 "--allocation", "evopress", "--allocation-opt", "evaluations=30",
                 *flags]) == 0  # fmt: skip
    assert "then EvoPress" in capsys.readouterr().out
    report = json.loads((out / "prune_report.json").read_text())["structure"]
    assert report["search"]["evaluations"] >= 30 and len(report["removed_blocks"]) == 2
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 1


def test_a_cut_then_quantized_keeps_a_width_that_a_group_divides(tmp_path, tokenizer_dir):
    """With --bits the MLP width is a multiple of 32 (128 * 0.7 would leave 70 channels,
    which no quantization group divides), and the compressed-tensors checkpoint loads."""
    source = build_checkpoint(tmp_path / "m", "llama", tokenizer_dir)
    out = tmp_path / "out"
    flags = ["--nsamples", "8", "--seqlen", "32", "--fitness-tokens", "64", "--quiet"]
    assert main(["prune", str(source), "--out", str(out), "--params", "0.7", "--cut", "width",
                 "--bits", "4", "--group-size", "32", *flags]) == 0  # fmt: skip
    report = json.loads((out / "prune_report.json").read_text())
    assert report["structure"]["intermediate_size"] == 64
    assert report["structure"]["kept_fraction"] <= 0.7
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.intermediate_size == 64


def test_the_joint_search_trades_depth_for_width_and_stays_in_range():
    """Depth and width together: from the full-depth start the joint search finds the
    one block whose removal (with the wider MLP it buys) costs least, and the best KV
    count; every mutation keeps at least one block and the KV groups in range."""
    rng = __import__("random").Random(3)
    genome = ((), 4)
    for _ in range(300):
        genome = evopress.mutate_joint(genome, 6, (2, 4), rng)
        assert len(genome[0]) < 6 and 2 <= genome[1] <= 4
        assert list(genome[0]) == sorted(set(genome[0]))
    costs = [5.0, 3.0, 0.5, 4.0, 6.0, 2.0]

    def fitness(genome, count):
        removed, kv = genome
        width_cost = 10.0 if not removed else 0.0  # a block removed buys back the width
        return sum(costs[i] for i in removed) + width_cost + abs(kv - 3)

    found, facts = evopress.joint_search(fitness, ((), 4), 6, (2, 4), 2, (1, 4), 1.0, 300)
    assert found == ((2,), 3) and facts["kl"] == pytest.approx(0.5)
    assert facts["started_from"] == {"removed_blocks": [], "kv_groups": 4}
    # a space with fewer genomes within reach of the parent than children wanted ends
    for start, blocks, kvs in [(((), 2), 5, (2, 2)), (((), 32), 3, (16, 32))]:
        found, _ = evopress.joint_search(fitness, start, blocks, kvs, 2, (1, 4), 0.01, 100)
        assert len(found[0]) < blocks


def test_tpe_searches_the_joint_genome_from_its_start():
    """TPE's trials decode to (removed blocks, KV groups) in range; the first is the
    start, every genome is scored once and the best scored is returned, better than the
    start; a fixed depth stays fixed, and a space of three genomes ends without
    spinning."""
    params = tpe.start_params(((1, 4), 3), 6)
    assert tpe.genome_of(params, 6) == ((1, 4), 3)
    costs = [5.0, 3.0, 0.5, 4.0, 6.0, 2.0]
    seen = {}

    def fitness(genome, count):
        removed, kv = genome
        assert count == 4 and 0 <= len(removed) <= 2 and 2 <= kv <= 4 and genome not in seen
        seen[genome] = sum(costs[i] for i in removed) + 10.0 * (not removed) + abs(kv - 3)
        return seen[genome]

    found, facts = tpe.search(fitness, ((0, 4), 4), 6, (2, 4), (0, 2), 4, 1.0, 120, seed=1)
    assert next(iter(seen)) == ((0, 4), 4) and len(seen) == facts["evaluations"] > 10
    assert facts["kl"] == seen[found] == min(seen.values()) < seen[((0, 4), 4)]
    assert facts["method"] == "tpe" and facts["started_from"]["kv_groups"] == 4
    seen.clear()
    found, facts = tpe.search(fitness, ((4,), 3), 6, (3, 3), (1, 1), 4, 1.0, 100)
    assert all(len(g[0]) == 1 for g in seen) and seen[found] == min(seen.values()) < 6.0
    seen.clear()
    found, facts = tpe.search(fitness, ((2,), 3), 3, (3, 3), (1, 1), 4, 1.0, 50)
    assert facts["evaluations"] == 3 and found == ((2,), 3)
    seen.clear()  # no time at all: the start is still scored, and returned
    found, facts = tpe.search(fitness, ((2,), 3), 3, (3, 3), (1, 1), 4, 1e-9)
    assert found == ((2,), 3) and facts["evaluations"] == 1 and list(seen) == [((2,), 3)]


def test_prune_params_with_tpe_searches_depth_and_width(tmp_path, tokenizer_dir, capsys):
    """--allocation tpe with --params: TPE searches on from the winning candidate, the
    report says so, and the choice meets the budget."""
    source = build_checkpoint(tmp_path / "m", "llama", tokenizer_dir)
    out = tmp_path / "out"
    flags = ["--nsamples", "8", "--seqlen", "32", "--fitness-tokens", "128", "--quiet"]
    assert main(["prune", str(source), "--out", str(out), "--params", "0.75", "--allocation",
                 "tpe", "--allocation-opt", "evaluations=12", *flags]) == 0  # fmt: skip
    shown = capsys.readouterr().out
    report = json.loads((out / "prune_report.json").read_text())["structure"]
    assert f"then TPE: {report['search']['evaluations']} evaluations" in shown
    assert report["search"]["method"] == "tpe" and report["search"]["joint"]
    assert report["candidate_kl"] <= min(c["kl"] for c in report["candidates"]) + 1e-9
    assert report["kept_fraction"] <= 0.75 and any("TPE" in p for p in report["papers"])
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.intermediate_size == report["intermediate_size"]


def test_evopress_on_a_width_cut_searches_depth_and_width_together():
    """With --cut auto and --allocation evopress the search may change the depth; its
    choice meets the budget, and its KL is at most the best candidate's."""
    model, calib = tiny(), windows(8)
    asked = recipe(params=0.75, fitness_tokens=128)
    search = {"minutes": 1.0, "evaluations": 70}  # the 65 initial genomes, then generations
    smaller, report = structure.shrink(model, calib, asked, CPU, 4, False, search)
    assert report["search"]["joint"] and report["search"]["generations"] >= 1
    best_candidate = min(c["kl"] for c in report["candidates"])
    assert report["candidate_kl"] <= best_candidate + 1e-9
    assert report["kept_fraction"] <= 0.75
    assert sum(cut.block_params(smaller)) == report["kept_params"]
    assert smaller.config.intermediate_size == report["intermediate_size"]


def tensor_bytes(folder) -> int:
    """The bytes of every tensor in the folder's safetensors files."""
    from safetensors import safe_open

    total = 0
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                tensor = f.get_slice(name)
                size = torch.tensor([], dtype=getattr(torch, _dtype(tensor.get_dtype())))
                total += math.prod(tensor.get_shape()) * size.element_size()
    return total


def _dtype(name: str) -> str:
    return {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "I32": "int32",
            "I64": "int64", "I8": "int8", "U8": "uint8"}[name]  # fmt: skip


@pytest.mark.parametrize(
    "fraction, flags",
    [(0.8, []), (0.9, ["--bits", "4", "--group-size", "32"])],
    ids=["hf", "compressed-tensors"],
)
def test_params_as_a_size_keeps_the_weights_within_it(tmp_path, tokenizer_dir, fraction, flags):
    """--params 300KB: the checkpoint's tensors take at most that (plain float32 weights,
    or 4-bit codes with their scales), the report's count is the file's, and the cut is
    no deeper than the size needs (one more unit of width would not fit)."""
    source = build_checkpoint(tmp_path / "m", "llama", tokenizer_dir)
    common = ["--nsamples", "8", "--seqlen", "32", "--fitness-tokens", "64", "--quiet"]
    dense_out = tmp_path / "dense"
    assert main(["prune", str(source), "--out", str(dense_out), *flags, *common,
                 *(["--sparsity", "0"] if not flags else [])]) == 0  # fmt: skip
    size = int(fraction * tensor_bytes(dense_out))
    out = tmp_path / "out"
    assert main(["prune", str(source), "--out", str(out), "--params", f"{size}B", "--cut",
                 "width", *flags, *common]) == 0  # fmt: skip
    written = tensor_bytes(out)
    report = json.loads((out / "prune_report.json").read_text())["structure"]
    assert written <= size and report["weight_bytes"] == written
    assert report["size_target"] == size and report["params_target"] < 1
    step = 32 if flags else 1  # channels: with --bits a group's worth
    per_channel = 3 * 64 * (0.5625 if flags else 4)  # gate and up rows, a down column
    assert written > size - 3 * step * per_channel - 3 * 2 * 16 * 64 * (0.5625 if flags else 4)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.intermediate_size == report["intermediate_size"]


def test_a_size_that_cannot_be_met_or_needs_nothing_is_one_line(tmp_path, tokenizer_dir, capsys):
    source = build_checkpoint(tmp_path / "m", "llama", tokenizer_dir)
    capsys.readouterr()  # (the checkpoint's own progress bar)
    common = ["--nsamples", "8", "--seqlen", "32", "--quiet"]
    for size, problem in [("1GB", "nothing to cut"), ("100KB", "outside the blocks' linear"),
                          ("12XB", "a size with its unit")]:  # fmt: skip
        out = tmp_path / "out"
        assert main(["prune", str(source), "--out", str(out), "--params", size, *common]) == 2
        err = capsys.readouterr().err.strip()
        assert problem in err and len(err.splitlines()) == 1 and not out.exists()


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_atomic_experts_narrow_every_expert_as_heapr_does(family, tmp_path):
    """--cut atomic: every expert keeps the same atomic experts as ``prunella heapr
    --uniform`` at the same ratio (HEAPr's scores), the config's expert width shrinks, the
    budget is met to one unit of width, and the saved model loads with the same logits."""
    import copy

    from prunella.methods.heapr import heapr

    model = tiny(family)
    calib = windows()
    smaller, report = structure.shrink(model, calib, recipe(params=0.8, cut="atomic"), CPU,
                                       4, False)  # fmt: skip
    width, dense = report["expert_width"], report["dense_expert_width"]
    assert 0 < width < dense and report["kept_fraction"] <= 0.8
    atomic = structure.heapr.atomic_of(model, {0: reap.experts_of(model, model.model.layers[0])})
    moe_blocks = model.config.num_hidden_layers
    step = structure.EXPERT_WIDTH_MULTIPLE  # (16-byte strides)
    assert (
        report["kept_params"] > 0.8 * report["block_params"] - moe_blocks * atomic.per_unit * step
    )
    assert sum(cut.block_params(smaller)) == report["kept_params"]
    assert smaller.config.to_dict()[atomic.key] == width
    reference = copy.deepcopy(model)
    heapr(reference, calib, ratio=1 - width / dense, uniform=True, batch_size=4, progress=False)
    ours, theirs = smaller.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    smaller.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(loaded(calib[:2]).logits, smaller(calib[:2]).logits, atol=1e-5)
    section = structure.plan_section(report)
    assert {b["expert_width"] for b in section["blocks"] if b["kept"]} == {width}


def test_auto_on_a_mixture_of_experts_weighs_whole_experts_against_narrower_ones():
    model = tiny("qwen3_moe")
    _, report = structure.shrink(model, windows(), recipe(params=0.8), CPU, 4, False)
    kinds = {("experts" if c["experts"] else "atomic" if c["expert_width"] else "depth")
             for c in report["candidates"]}  # fmt: skip
    assert {"experts", "atomic"} <= kinds
    best = min(report["candidates"], key=lambda c: c["kl"])
    assert report["candidate_kl"] == best["kl"]


@pytest.mark.parametrize(
    "family, flags",
    [
        ("llama", []),
        ("qwen2", ["--sparsity", "0.5"]),
        ("gemma", ["--cut", "width", "--width-method", "magnitude"]),
        ("opt", ["--cut", "depth"]),
        ("mixtral", ["--cut", "experts"]),
    ],
)
def test_a_streamed_cut_writes_what_the_in_memory_cut_writes(
    family, flags, tmp_path, tokenizer_dir
):
    """--offload disk: the dense model read one block at a time, the cut written block
    by block and streamed on (here pruned too): the same checkpoint as in memory."""
    source = build_checkpoint(tmp_path / "m", family, tokenizer_dir)
    common = ["--params", "0.7", "--nsamples", "8", "--seqlen", "32", "--fitness-tokens",
              "64", "--quiet", *flags]  # fmt: skip
    models, reports = {}, {}
    for offload in ("none", "disk"):
        out = tmp_path / offload
        assert main(["prune", str(source), "--out", str(out), "--offload", offload,
                     *common]) == 0  # fmt: skip
        reports[offload] = json.loads((out / "prune_report.json").read_text())
        models[offload] = AutoModelForCausalLM.from_pretrained(out).eval()
        assert not (tmp_path / f"{offload}.partial").exists()
    assert reports["disk"]["offload"] == "disk"
    memory, disk = (reports[k]["structure"] for k in ("none", "disk"))
    for key in ("removed_blocks", "intermediate_size", "kv_groups", "experts", "kept_params"):
        assert memory[key] == disk[key], key
    assert memory["kl"] == pytest.approx(disk["kl"], rel=0.05, abs=1e-4)
    a, b = (models[k].state_dict() for k in ("none", "disk"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_is_cut_alike_in_memory_and_streamed(family, tmp_path, tokenizer_dir):
    """The family matrix: ``--params 0.7`` cuts every family (depth and width where its
    blocks have them, whole experts in a mixture of experts) to the same structure in
    memory and streamed; the checkpoint loads with the smaller config and generates. A
    mixture of experts is cut by whole experts: in memory ``auto`` would also weigh
    HEAPr's atomic experts, which a streamed cut cannot score (a backward pass)."""
    source = build_checkpoint(tmp_path / "m", family, tokenizer_dir)
    moe = family in MOE_FAMILIES  # (a shared expert or a dense block stays whole)
    cut_flags = ["--params", "0.9", "--cut", "experts"] if moe else ["--params", "0.7"]
    common = ["--nsamples", "4", "--seqlen", "16", "--fitness-tokens",
              "32", "--quiet", *cut_flags]  # fmt: skip
    reports = {}
    for offload in ("none", "disk"):
        out = tmp_path / offload
        assert main(["prune", str(source), "--out", str(out), "--offload", offload,
                     *common]) == 0  # fmt: skip
        reports[offload] = json.loads((out / "prune_report.json").read_text())["structure"]
    memory, disk = reports["none"], reports["disk"]
    for key in ("removed_blocks", "intermediate_size", "kv_groups", "experts", "kept_params"):
        assert memory[key] == disk[key], key
    assert memory["kept_fraction"] <= (0.9 if moe else 0.7)
    dense = AutoConfig.from_pretrained(source)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "disk").eval()
    assert loaded.config.num_hidden_layers == memory["blocks"] <= dense.num_hidden_layers
    assert sum(cut.block_params(loaded)) == memory["kept_params"]
    if moe:
        assert loaded.config.num_hidden_layers == dense.num_hidden_layers
        assert memory["experts"] < memory["dense_experts"]
    ids = windows(1)[:, :4]
    grown = loaded.generate(ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert grown.shape == (1, 7)


def test_a_streamed_search_and_a_streamed_plan(tmp_path, tokenizer_dir):
    """EvoPress over depth and width, and a plan file applied, both with --offload disk:
    the search's evaluations are block-by-block forwards; the plan gives the checkpoint
    it gives in memory."""
    from safetensors.torch import load_file

    source = build_checkpoint(tmp_path / "m", "llama", tokenizer_dir)
    common = ["--nsamples", "8", "--seqlen", "32", "--fitness-tokens", "64", "--quiet"]
    searched = tmp_path / "searched"
    assert main(["prune", str(source), "--out", str(searched), "--params", "0.7",
                 "--allocation", "evopress", "--allocation-opt", "evaluations=70",
                 "--offload", "disk", *common]) == 0  # fmt: skip
    report = json.loads((searched / "prune_report.json").read_text())["structure"]
    assert report["search"]["joint"] and report["kept_fraction"] <= 0.7
    plan_file = tmp_path / "plan.json"
    assert main(["allocate", str(source), "--params", "0.7", "--json", str(plan_file),
                 *common]) == 0  # fmt: skip
    outs = {}
    for offload in ("none", "disk"):
        outs[offload] = tmp_path / f"plan-{offload}"
        assert main(["prune", str(source), "--out", str(outs[offload]), "--allocation-file",
                     str(plan_file), "--offload", offload, *common]) == 0  # fmt: skip
    a = load_file(outs["none"] / "model.safetensors")
    b = AutoModelForCausalLM.from_pretrained(outs["disk"]).state_dict()
    assert a.keys() <= b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


def test_qwen2_keeps_its_heads_since_vllm_derives_their_size_from_the_hidden_size():
    """vLLM's Qwen2 computes head_dim = hidden_size // num_attention_heads and never reads
    the config's head_dim, so a Qwen2 cut keeps every KV group (and query head); its MLP
    and depth are cut; Qwen3 (whose vLLM model reads head_dim) loses KV groups."""
    for family, heads_cut in (("qwen2", False), ("qwen3", True)):
        model = tiny(family)
        smaller, report = structure.shrink(model, windows(), recipe(params=0.6), CPU, 4, False)
        kvs = {c["kv_groups"] for c in report["candidates"]}
        assert (len(kvs) > 1) == heads_cut, (family, kvs)
        if not heads_cut:
            config = smaller.config
            assert config.num_attention_heads == model.config.num_attention_heads
            assert config.hidden_size // config.num_attention_heads == layout.head_dim_of(config)


def test_kv_counts_the_config_refuses_are_not_candidates():
    """Llama's config wants a hidden size its head count divides (even with head_dim
    given): with 8 heads of 8 (no grouping) on 64, 7, 6 and 5 KV groups are refused."""
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=8,
                         head_dim=8, max_position_embeddings=512)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    _, report = structure.shrink(model, windows(), recipe(params=0.8, cut="width"), CPU, 4, False)
    assert {c["kv_groups"] for c in report["candidates"]} <= {8, 4}
    assert len(report["candidates"]) > 0
