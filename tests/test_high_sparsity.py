"""ALPS and TRIM on single layers: lower reconstruction error than SparseGPT, exact
per-row budgets for every solver, TRIM's exact layer budget; and both through the
pipeline on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from test_solvers import layer_problem, stats_for

import prunella
from prunella.engine.stats import HESSIAN
from prunella.errors import PrunellaError
from prunella.methods.rows import get_rows, trim
from prunella.methods.sparsity import SOLVERS, alps, get_solver
from prunella.methods.sparsity.patterns import NM, RowBudget, Unstructured, row_counts_mask

TRIM = get_rows("trim")


def solve_with(name, stats):
    solver = get_solver(name)
    return lambda w, p: solver.prune(w, p, stats, **solver.defaults())


def recon(w, w_hat, stats):
    return alps.reconstruction_error(w, w_hat, stats.hessian)


@pytest.mark.parametrize("pattern", [Unstructured(0.7), NM(2, 4), Unstructured(0.8)])
def test_alps_beats_sparsegpt_on_a_random_layer(pattern):
    w, x = layer_problem(rows=96, cols=128)
    stats = stats_for(x, (HESSIAN,))
    ours, info = get_solver("alps").call("prune", w.clone(), pattern, stats, fallback=False)
    theirs, _ = get_solver("sparsegpt").call("prune", w.clone(), pattern, stats)
    assert recon(w, ours, stats) < 0.9 * recon(w, theirs, stats), info
    assert info["converged"] and info["iterations"] < 300
    assert (ours == 0).sum().item() == (theirs == 0).sum().item()


def test_alps_reports_no_convergence_and_falls_back_to_sparsegpt():
    w, x = layer_problem(rows=64, cols=128)
    stats = stats_for(x, (HESSIAN,))
    # a huge penalty, one iteration, no back-solve: close to magnitude pruning, which
    # SparseGPT beats
    new, info = get_solver("alps").call(
        "prune", w.clone(), Unstructured(0.7), stats, rho=1e5, max_iter=2, pcg_iter=0
    )
    sparsegpt, _ = get_solver("sparsegpt").call("prune", w.clone(), Unstructured(0.7), stats)
    assert info["converged"] is False and info["iterations"] == 2
    assert info["fallback"] is True
    assert torch.equal(new, sparsegpt)
    assert info["rel_recon_error"] == pytest.approx(recon(w, sparsegpt, stats))
    assert "max_iter=2 unconverged" in info["note"] and "kept SparseGPT's" in info["note"]


def test_pcg_refit_solves_the_masked_least_squares():
    w, x = layer_problem(rows=8, cols=32)
    stats = stats_for(x, (HESSIAN,))
    H = stats.hessian
    keep = torch.rand(w.shape, generator=torch.Generator().manual_seed(1)) > 0.5
    fitted = alps.pcg(H, w @ H, w * keep, keep, steps=200)
    for r in range(w.shape[0]):  # the normal equations on the support, row by row
        s = keep[r]
        exact = torch.linalg.solve(H[s][:, s].double(), (w[r] @ H)[s].double())
        assert torch.allclose(fitted[r, s].double(), exact, rtol=1e-3, atol=1e-4)
        assert (fitted[r, ~s] == 0).all()


def test_row_counts_mask_is_exact():
    scores = torch.randn(7, 20)
    counts = torch.tensor([0, 1, 5, 20, 3, 19, 10])
    mask = row_counts_mask(scores, counts)
    assert mask.sum(1).tolist() == counts.tolist()
    for r in range(7):  # the lowest scores of each row
        if 0 < counts[r] < 20:
            assert scores[r][mask[r]].max() <= scores[r][~mask[r]].min()


@pytest.mark.parametrize("name", list(SOLVERS))
def test_every_solver_honours_row_budgets(name):
    w, x = layer_problem(rows=40, cols=136)
    counts = torch.randint(0, 137, (40,), generator=torch.Generator().manual_seed(3))
    new, _ = get_solver(name).call("prune", w.clone(), RowBudget(counts, 136), stats_for(x))
    assert (new == 0).sum(1).tolist() == counts.tolist()


def test_row_budget_rejects_impossible_counts():
    with pytest.raises(PrunellaError, match="row budgets"):
        RowBudget(torch.tensor([3, 9]), cols=8)


def test_exact_counts_hit_the_budget():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        x = torch.rand(50, generator=g)
        k = int(torch.randint(0, 50 * 64 + 1, (1,), generator=g))
        counts = trim.exact_counts(x, 64, k)
        assert counts.sum().item() == k
        assert counts.min() >= 0 and counts.max() <= 64


def test_row_cosines_match_the_outputs():
    w, x = layer_problem(rows=16, cols=64)
    stats = stats_for(x, (HESSIAN,))
    w_hat = w * (torch.rand(w.shape) > 0.6)
    rows, flat = trim.row_cosines(w @ stats.hessian, w, w_hat, stats.hessian)
    y, y_hat = x @ w.t(), x @ w_hat.t()
    direct = torch.nn.functional.cosine_similarity(y, y_hat, dim=0)
    assert torch.allclose(rows, direct, atol=1e-4)
    assert flat == pytest.approx(
        torch.nn.functional.cosine_similarity(y.flatten(), y_hat.flatten(), dim=0).item(),
        abs=1e-4,
    )


@pytest.mark.parametrize("name", ["wanda", "sparsegpt", "magnitude"])
def test_trim_keeps_the_layer_budget_and_never_loses_to_uniform_rows(name):
    w, x = layer_problem(rows=48, cols=128)
    w = w * torch.linspace(0.2, 3.0, 48).unsqueeze(1)  # rows of very different scale
    stats = stats_for(x)
    solve = solve_with(name, stats)
    uniform, _ = solve(w.clone(), Unstructured(0.7))
    new, info = TRIM.call("prune", w.clone(), Unstructured(0.7), stats, solve)
    assert (new == 0).sum().item() == round(0.7 * w.numel())
    H = stats.hessian
    assert trim.row_cosines(w @ H, w, new, H)[1] >= trim.row_cosines(w @ H, w, uniform, H)[1]
    assert info["rows_cos"] >= info["rows_cos_start"]


def test_trim_spreads_rows_for_wanda_and_lowers_the_error():
    w, x = layer_problem(rows=48, cols=128)
    w = w * torch.linspace(0.2, 3.0, 48).unsqueeze(1)
    stats = stats_for(x)
    solve = solve_with("wanda", stats)
    uniform, _ = solve(w.clone(), Unstructured(0.7))
    new, info = TRIM.call("prune", w.clone(), Unstructured(0.7), stats, solve)
    assert info["rows_rate"] != 0 and info["rows_max"] > info["rows_min"]
    assert recon(w, new, stats) < recon(w, uniform, stats)


def test_trim_leaves_nm_alone():
    w, x = layer_problem(rows=16, cols=64)
    stats = stats_for(x)
    solve = solve_with("sparsegpt", stats)
    new, info = TRIM.call("prune", w.clone(), NM(2, 4), stats, solve)
    assert torch.equal(new, solve(w.clone(), NM(2, 4))[0])
    assert info["rows"] == "fixed by the pattern"


def test_trim_with_a_proxy_solver():
    w, x = layer_problem(rows=32, cols=128)
    w = w * torch.linspace(0.2, 3.0, 32).unsqueeze(1)
    stats = stats_for(x)
    new, _ = TRIM.call(
        "prune", w.clone(), Unstructured(0.7), stats, solve_with("alps", stats), proxy="sparsegpt"
    )
    assert (new == 0).sum().item() == round(0.7 * w.numel())


def test_alps_and_trim_through_the_pipeline(tiny_llama):
    _, report = prunella.prune(
        tiny_llama,
        sparsity=0.7,
        solver="alps",
        rows="trim",
        rows_options={"proxy": "sparsegpt"},
        allocation="owl",
        nsamples=4,
        seqlen=32,
        progress=False,
    )
    assert report["rows"] == "trim" and report["rows_options"]["proxy"] == "sparsegpt"
    assert abs(report["sparsity"] - 0.7) < 1e-3
    layer = report["layers"][0]
    assert {"iterations", "converged", "rel_recon_error", "rows_cos"} <= set(layer)


def test_rows_flag_and_options_are_checked():
    with pytest.raises(PrunellaError, match="unknown rows 'nope'"):
        prunella.prune("smollm2-135m", rows="nope")
    with pytest.raises(PrunellaError, match="rows 'trim' option 'rates'"):
        prunella.prune("smollm2-135m", rows="trim", rows_options={"rates": "0.1,x"})
    assert get_rows("uniform").options == ()


def test_rows_from_a_recipe_and_the_command_line(tiny_llama, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from prunella.cli import main

    recipe = tmp_path / "run.yaml"
    recipe.write_text(
        "solver: wanda\nrows: {name: trim, options: {iterations: 2}}\nnsamples: 4\nseqlen: 32\n"
    )
    out = tmp_path / "out"
    args = ["prune", str(tiny_llama), "--recipe", str(recipe), "--out", str(out)]
    code = main([*args, "--sparsity", "0.75", "--rows-opt", "max_row_sparsity=0.9", "--quiet"])
    assert code == 0
    assert "wanda, uniform allocation, trim rows" in capsys.readouterr().out
    report = json.loads((out / "prune_report.json").read_text())
    assert report["rows_options"]["iterations"] == 2
    assert report["rows_options"]["max_row_sparsity"] == 0.9
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert saved["rows"] == {"name": "trim", "options": report["rows_options"]}
    model = AutoModelForCausalLM.from_pretrained(out)
    weights = [m.weight for n, m in model.named_modules() if n.endswith(("proj", "_proj"))]
    zeros = sum(int((w == 0).sum()) for w in weights)
    assert zeros == pytest.approx(0.75 * sum(w.numel() for w in weights), abs=len(weights))


def test_alps_prunes_dead_inputs_first():
    w, x = layer_problem(rows=32, cols=64)
    x[:, :8] = 0.0  # eight inputs that are always zero
    stats = stats_for(x, (HESSIAN,))
    new, _ = get_solver("alps").call("prune", w.clone(), Unstructured(0.7), stats, fallback=False)
    assert (new[:, :8] == 0).all()
    assert (new == 0).sum().item() == round(0.7 * w.numel())


def test_trim_cosines_treat_a_zero_row_as_kept():
    w, x = layer_problem(rows=8, cols=32)
    w[3] = 0.0
    stats = stats_for(x, (HESSIAN,))
    H = stats.hessian
    w_hat = w * (torch.rand(w.shape, generator=torch.Generator().manual_seed(2)) > 0.6)
    rows, flat = trim.row_cosines(w @ H, w, w_hat, H)
    assert rows[3] == 1.0
    # the cosines of the outputs, computed directly from the inputs
    y, y_hat = (x @ w.t()).double(), (x @ w_hat.t()).double()
    expected = torch.nn.functional.cosine_similarity(y, y_hat, dim=0)
    others = torch.arange(8) != 3
    torch.testing.assert_close(rows[others].double(), expected[others], rtol=1e-4, atol=1e-5)
    cos = torch.nn.functional.cosine_similarity(y.flatten(), y_hat.flatten(), dim=0)
    assert flat == pytest.approx(cos.item(), rel=1e-4)


def test_row_budget_must_fit_the_layer():
    with pytest.raises(PrunellaError, match="integer counts"):
        RowBudget(torch.tensor([1.0, 2.0]), cols=8)
    w, x = layer_problem(rows=8, cols=32)
    with pytest.raises(PrunellaError, match="row budgets for 2 x 32"):
        get_solver("wanda").call("prune", w, RowBudget(torch.tensor([1, 2]), 32), stats_for(x))


def test_unconverged_alps_layers_are_said(tiny_llama, tmp_path, capsys):
    from prunella.cli import main

    out = tmp_path / "out"
    args = ["prune", str(tiny_llama), "--out", str(out), "--sparsity", "0.7", "--solver", "alps"]
    args += ["--solver-opt", "max_iter=1", "--nsamples", "4", "--seqlen", "32", "--quiet"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "note: model.layers.0." in err and "unconverged" in err
    report = json.loads((out / "prune_report.json").read_text())
    assert len(report["notes"]) == len(report["layers"])  # one iteration never converges
    assert all(r["converged"] is False for r in report["layers"])
