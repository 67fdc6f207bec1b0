"""HEAPr: atomic experts scored in output space, removed globally or uniformly."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_checkpoint
from test_experts import fused_experts, tiny_model
from transformers import AutoModelForCausalLM

from prunella.cli import main
from prunella.engine.experts import expert_views, routed
from prunella.methods.heapr import (
    atomic_keep,
    heapr,
    heapr_stats,
    shrink_experts,
    zero_atomic_experts,
)


def windows(model, n: int = 4, length: int = 32) -> torch.Tensor:
    return torch.randint(
        0, model.config.vocab_size, (n, length), generator=torch.Generator().manual_seed(1)
    )


def loss(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return model(input_ids=ids, labels=ids).loss.item()


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_scores_are_the_papers_fisher_in_output_space(family):
    """``E[x²] · w_kᵀ G_e w_k`` with ``G_e = E[g gᵀ]`` formed explicitly from autograd's
    per-token gradients of each expert's output."""
    model = tiny_model(family)
    ids = windows(model)
    stats = heapr_stats(model, ids, batch_size=2, progress=False)

    name, experts = fused_experts(model)[1]
    views = expert_views(experts)
    outputs = {e: [] for e in range(experts.num_experts)}

    def keep(e):
        def hook(module, args, out):
            out.retain_grad()
            outputs[e].append((args[0].detach(), out))

        return hook

    handles = [views[f"{e}.down_proj"].register_forward_hook(keep(e)) for e in outputs]
    embed = model.get_input_embeddings().register_forward_hook(lambda m, a, o: o.requires_grad_())
    for param in model.parameters():
        param.requires_grad_(False)
    with routed(model), torch.enable_grad():
        for b in (0, 2):
            model(input_ids=ids[b : b + 2], labels=ids[b : b + 2]).loss.backward()
    embed.remove()
    for h in handles:
        h.remove()
    scores = stats[name].scores()
    for e, pairs in outputs.items():
        x = torch.cat([p[0] for p in pairs]).double()
        g = torch.cat([p[1].grad for p in pairs]).double()
        if len(x) == 0:
            assert (scores[e] == -1).all()
            continue
        fisher = g.t() @ g / len(g)
        w = views[f"{e}.down_proj"].weight.double()
        expected = x.square().mean(0) * torch.einsum("hk,hj,jk->k", w, fisher, w)
        torch.testing.assert_close(scores[e], expected, rtol=1e-6, atol=1e-12)


def test_removing_the_lowest_scores_costs_less_than_the_highest():
    model = tiny_model("qwen3_moe")
    ids = windows(model, 8)
    scores = {n: s.scores() for n, s in heapr_stats(model, ids, progress=False).items()}
    modules = dict(model.named_modules())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    losses = {}
    for label, signed in (("heapr", scores), ("reverse", {n: -s for n, s in scores.items()})):
        model.load_state_dict(state)
        for name, mask in atomic_keep(signed, 0.25).items():
            zero_atomic_experts(modules[name], mask)
        losses[label] = loss(model, ids)
    model.load_state_dict(state)
    dense = loss(model, ids)
    assert abs(losses["heapr"] - dense) < abs(losses["reverse"] - dense)


def test_global_ranking_zeroes_and_uniform_ranking_shrinks_to_the_same_function():
    for family in ("qwen3_moe", "gpt_oss", "mixtral"):
        ids = windows(tiny_model(family))
        zeroed, shrunk = tiny_model(family), tiny_model(family)
        report = heapr(shrunk, ids, ratio=0.25, uniform=True, progress=False)
        widths = [w for e in report["experts"].values() for w in e["width"]]
        assert (
            len(set(widths)) == 1
            and report["atomic_experts_removed"] == report["atomic_experts"] // 4
        )
        # the same atomic experts, zeroed in place instead of cut out
        scores = {n: s.scores() for n, s in heapr_stats(zeroed, ids, progress=False).items()}
        modules = dict(zeroed.named_modules())
        for name, mask in atomic_keep(scores, 0.25, uniform=True).items():
            zero_atomic_experts(modules[name], mask)
        torch.testing.assert_close(
            shrunk(ids).logits, zeroed(ids).logits, rtol=1e-4, atol=1e-5, msg=family
        )
        assert report["expert_parameters_after"] < 0.8 * report["expert_parameters_before"]


def test_shrink_keeps_each_experts_chosen_rows_in_the_models_layout():
    model = tiny_model("gpt_oss")  # interleaved gate/up, transposed, with biases
    _, experts = fused_experts(model)[0]
    views = expert_views(experts)
    before = {k: views[f"1.{k}"].weight.clone() for k in ("gate_proj", "up_proj", "down_proj")}
    bias = views["1.up_proj"].bias.clone()
    width = before["down_proj"].shape[1]
    keep = torch.zeros(experts.num_experts, width, dtype=torch.bool)
    keep[:, ::2] = True
    shrink_experts(experts, keep)
    views = expert_views(experts)
    assert torch.equal(views["1.gate_proj"].weight, before["gate_proj"][::2])
    assert torch.equal(views["1.up_proj"].weight, before["up_proj"][::2])
    assert torch.equal(views["1.down_proj"].weight, before["down_proj"][:, ::2])
    assert torch.equal(views["1.up_proj"].bias, bias[::2])


def test_cli_writes_a_smaller_model_that_transformers_loads(tmp_path, tokenizer_dir, capsys):
    src = build_checkpoint(tmp_path / "src", "qwen3_moe", tokenizer_dir, dtype=torch.bfloat16)
    out = tmp_path / "out"
    argv = ["heapr", str(src), "--out", str(out), "--ratio", "0.5", "--uniform"]
    assert main([*argv, "--nsamples", "4", "--seqlen", "32", "--quiet"]) == 0
    assert "HEAPr removed 192 of 384 atomic experts" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["moe_intermediate_size"] == 16  # from 32
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert model.model.layers[0].mlp.experts.down_proj.shape == (4, 64, 16)
    assert model.model.layers[0].mlp.experts.down_proj.dtype == torch.bfloat16  # as it came
    report = json.loads((out / "heapr_report.json").read_text())
    routed_tokens = report["experts"]["model.layers.0.mlp.experts"]["routed_tokens"]
    assert sum(routed_tokens) == 4 * 32 * 2  # every token to top-2 experts


def test_cli_errors_are_one_line_and_write_nothing(tmp_path, tokenizer_dir, capsys):
    dense = build_checkpoint(tmp_path / "dense", "llama", tokenizer_dir)
    moe = build_checkpoint(tmp_path / "moe", "mixtral", tokenizer_dir)
    for model, extra, message in (
        (dense, [], "HEAPr prunes mixtures of experts"),
        (moe, ["--ratio", "1.0"], "ratio must be in [0, 1)"),
    ):
        out = tmp_path / "out"
        assert main(["heapr", str(model), "--out", str(out), "--seqlen", "32", *extra]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert message in err[-1] and not out.exists()
