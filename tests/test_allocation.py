"""Allocation: the metrics on matrices with known answers, exact budgets, plans, CLI."""

from __future__ import annotations

import json

import pytest
import torch

import prunella
from prunella.cli import main
from prunella.engine.adapters import get_weight
from prunella.errors import PrunellaError
from prunella.io.models import load
from prunella.methods.allocation.alphapruning import alpha_hill, esd, farms_esd
from prunella.methods.allocation.erk import erk_densities
from prunella.methods.allocation.owl import owl_outlier_ratio, owl_ratios
from prunella.methods.plan import AxisPlan, Plan, fit_budget, load_plan
from prunella.methods.sparsity import fit_nm_levels, levels
from prunella.methods.sparsity.patterns import NM, Unstructured


def allocate(model, adapter, method, pattern, *, windows=None, options=None, **kwargs):
    """The sparsity plan for an in-memory model, on the CPU in float32."""
    target = (
        {"sparsity": pattern.sparsity}
        if isinstance(pattern, Unstructured)
        else {"pattern": str(pattern)}
    )
    plan = prunella.allocate(
        model,
        calibration=windows,
        allocation={"name": method, "options": options or {}},
        device="cpu",
        compute_dtype="float32",
        progress=False,
        **target,
        **kwargs,
    )
    return plan["sparsity"]


def prunable_layers(model, adapter):
    return adapter.layers(model)


def pareto(alpha: float, n: int, seed: int = 0) -> torch.Tensor:
    """Samples with density ~ x^-alpha for x >= 1."""
    u = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return (1 - u) ** (-1 / (alpha - 1))


@pytest.mark.parametrize("alpha", [2.0, 3.0, 4.5])
@pytest.mark.parametrize("xmin", ["mid", "peak"])
def test_alpha_hill_recovers_a_power_law_exponent(alpha, xmin):
    estimate = alpha_hill(pareto(alpha, 20000), xmin=xmin)
    assert estimate == pytest.approx(alpha, abs=0.15), estimate


def test_heavier_tailed_matrix_has_lower_alpha():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(256, 256, generator=g) / 16
    # a "trained" matrix: noise plus strong low-rank structure, whose ESD has a heavy tail
    spikes = sum(
        (3.0 / (k + 1))
        * torch.outer(torch.randn(256, generator=g), torch.randn(256, generator=g))
        / 16
        for k in range(40)
    )
    assert alpha_hill(esd(noise + spikes), "peak") < alpha_hill(esd(noise), "peak")


def test_esd_is_eigenvalues_of_wtw():
    w = torch.randn(30, 20, dtype=torch.float64)
    expected = torch.linalg.eigvalsh(w.t() @ w).sort().values
    assert torch.allclose(esd(w).double(), expected, rtol=1e-4, atol=1e-6)


def test_farms_pools_square_submatrices():
    w = torch.randn(300, 100)
    eigs = farms_esd(w, max_rows=2000, q=1.0, ops=15)
    # r = min(2000, 300, 100) = 100: 100 x 100 windows, 15 along the rows, 1 along the columns
    assert eigs.numel() == 15 * 100
    assert torch.all(eigs[1:] >= eigs[:-1])


def test_farms_removes_aspect_ratio_bias():
    """Pure noise of different shapes: the plain alpha depends on the aspect ratio, FARMS' not.

    (Measured with the ``mid`` x_min, the FARMS paper's default for its analysis; the
    ``peak`` rule has no stable answer on noise, whose ESD is not a power law.)
    """
    g = torch.Generator().manual_seed(1)
    shapes = [(256, 256), (1024, 256), (256, 1024)]
    mats = [torch.randn(*shape, generator=g) for shape in shapes]
    plain = [alpha_hill(esd(w), xmin="mid") for w in mats]
    farms = [alpha_hill(farms_esd(w), xmin="mid") for w in mats]
    assert max(plain) - min(plain) > 1.0
    assert max(farms) - min(farms) < 0.1


def test_planted_outlier_columns_raise_the_outlier_ratio():
    g = torch.Generator().manual_seed(0)
    plain = torch.rand(64, 64, generator=g)
    planted = plain.clone()
    planted[:, :3] *= 50.0  # large-magnitude columns, as from outlier features
    assert owl_outlier_ratio([planted], 5.0) > owl_outlier_ratio([plain], 5.0)
    assert owl_outlier_ratio([plain], 5.0) == 0.0


def test_owl_mapping_more_outliers_less_sparsity():
    metric = torch.tensor([0.01, 0.03, 0.02, 0.05], dtype=torch.float64)
    s = owl_ratios(metric, 0.7, spread=0.08)
    assert s.argmin() == 3 and s.argmax() == 0
    assert s.mean().item() == pytest.approx(0.7)
    assert (s.max() - s.min()).item() == pytest.approx(0.16)


def test_fit_budget_is_exact_with_unequal_sizes_and_clamps():
    sizes = torch.tensor([10_000, 333, 4_096 * 3, 7, 50_000], dtype=torch.float64)
    raw = torch.tensor([0.9, 0.2, 0.75, 0.5, 0.6], dtype=torch.float64)
    for target in (0.3, 0.6, 0.7, 0.85):
        fitted = fit_budget(raw, sizes, target, lo=0.05, hi=0.95)
        counts = (fitted * sizes).round()
        assert counts.sum().item() == round(target * sizes.sum().item())
        assert (fitted >= 0.05 - 1 / sizes).all() and (fitted <= 0.95 + 1 / sizes).all()


def test_fit_budget_rejects_a_target_outside_the_clamp():
    with pytest.raises(PrunellaError, match="outside the clamp"):
        fit_budget(torch.tensor([0.5]), torch.tensor([10.0]), 0.9, lo=0.0, hi=0.8)


def test_nm_levels_mix_around_the_target():
    sizes = torch.full((8,), 1000.0, dtype=torch.float64)
    raw = torch.linspace(0.4, 0.6, 8, dtype=torch.float64)
    n = fit_nm_levels(raw, sizes, 0.5, 8, 0.0, 0.99)
    assert set(n.tolist()) <= set(range(1, 8)) and len(set(n.tolist())) > 1
    assert (1 - n.double() / 8).mean().item() == pytest.approx(0.5, abs=1 / 8)


def test_nm_levels_honour_the_sparsity_clamp():
    sizes = torch.full((8,), 1000.0, dtype=torch.float64)
    raw = torch.linspace(0.05, 0.95, 8, dtype=torch.float64)
    free = fit_nm_levels(raw, sizes, 0.5, 8, 0.0, 0.99)
    assert min(free.tolist()) < 3 and max(free.tolist()) > 6  # the clamp below binds
    n = fit_nm_levels(raw, sizes, 0.5, m=8, lo=0.25, hi=0.625)
    assert set(n.tolist()) <= {3, 4, 5, 6}  # 1 - N/8 within [0.25, 0.625]
    with pytest.raises(PrunellaError, match="no N:8 level"):
        fit_nm_levels(raw, sizes, 0.5, m=8, lo=0.3, hi=0.35)


def test_erk_densities_follow_perimeter_over_area_and_cap_at_dense():
    # two layers: 10x10 (perimeter 20, area 100) and 100x100 (200, 10000)
    perimeter = torch.tensor([20.0, 200.0], dtype=torch.float64)
    sizes = torch.tensor([100.0, 10000.0], dtype=torch.float64)
    d = erk_densities(perimeter, sizes, target=0.9)
    assert (d * sizes).sum().item() == pytest.approx(0.1 * sizes.sum().item())
    assert d[0].item() / d[1].item() == pytest.approx((20 / 100) / (200 / 10000))
    # at 50% the small layer would need a density above 1: it stays dense, the rest pays
    d = erk_densities(perimeter, sizes, target=0.5)
    assert d[0].item() == 1.0
    assert (d * sizes).sum().item() == pytest.approx(0.5 * sizes.sum().item())


@pytest.fixture(scope="module")
def model_and_windows(tmp_path_factory, tokenizer_dir):
    """A tiny Llama whose layers differ in size (q/o 64x64, k/v 32x64, MLP 128x64, 64x128)."""
    from conftest import build_checkpoint

    from prunella.data import calibration_windows

    path = build_checkpoint(tmp_path_factory.mktemp("alloc"), "llama", tokenizer_dir, seed=1)
    model, tok, _, adapter = load(path)
    windows = calibration_windows(tok, "sample", nsamples=4, seqlen=64, seed=0)
    return path, model, adapter, windows


@pytest.mark.parametrize("method", ["uniform", "owl", "alphapruning", "erk"])
@pytest.mark.parametrize("granularity", ["block", "layer"])
@pytest.mark.parametrize("target", [0.6, 0.7])
def test_every_plan_meets_the_budget_exactly(model_and_windows, method, granularity, target):
    _, model, adapter, windows = model_and_windows
    plan = allocate(
        model,
        adapter,
        method,
        Unstructured(target),
        windows=windows,
        granularity=granularity,
    )
    layers = prunable_layers(model, adapter)
    sizes = {n: r * c for n, (r, c) in layers.items()}
    pruned = sum(round(plan.values[n] * sizes[n]) for n in layers)
    assert pruned == round(target * sum(sizes.values()))  # exact, for every method
    if method != "uniform" and not (method == "erk" and granularity == "block"):
        assert len(set(plan.values.values())) > 1
        assert len(plan.metric) == (3 if granularity == "block" else len(layers))
    if granularity == "block":
        for b in range(3):  # one value per block, up to the rounding of whole weights
            values = [s for n, s in plan.values.items() if f".{b}." in n]
            assert max(values) - min(values) < 0.02


def test_weight_only_allocation_runs_no_forward_pass(model_and_windows, monkeypatch):
    _, model, adapter, _ = model_and_windows
    calls = []
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(1))
    allocate(model, adapter, "alphapruning", Unstructured(0.7), windows=None)
    assert calls == []


@pytest.mark.parametrize("solver", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["unstructured", "4:8"])
def test_allocation_composes_with_every_solver_and_pattern(model_and_windows, solver, pattern):
    import copy

    _, model, _, windows = model_and_windows
    pruned, report = prunella.prune(
        copy.deepcopy(model),
        tokenizer=None,
        calibration=windows,
        solver=solver,
        pattern=pattern,
        sparsity=0.7 if pattern == "unstructured" else None,
        allocation="owl",
        progress=False,
    )
    layers = {layer["name"]: layer for layer in report["layers"]}
    weights = {name: get_weight(pruned.get_submodule(name)) for name in layers}
    if pattern == "unstructured":
        assert abs(report["sparsity"] - 0.7) < 1e-4
        for name, s in report["plan"]["axes"]["sparsity"]["sparsity"].items():
            assert (weights[name] == 0).sum().item() == round(s * weights[name].numel())
    else:
        kept = total = 0
        for name, (n, m) in report["plan"]["axes"]["sparsity"]["nm"].items():
            assert layers[name]["pattern"] == f"{n}:{m}"
            zeros = (weights[name] == 0).view(weights[name].shape[0], -1, m).sum(-1)
            assert (zeros == m - n).all()
            kept += weights[name].numel() * n // m
            total += weights[name].numel()
        # overall: exactly what the mixed levels give, and as close to 4:8 as they allow
        assert report["sparsity"] == pytest.approx(1 - kept / total, abs=1e-12)
        assert abs(report["sparsity"] - 0.5) <= 0.5 / 8
    assert report["plan"]["axes"]["sparsity"]["method"] == "owl"
    assert report["plan"]["axes"]["sparsity"]["metric_name"] == "outlier_ratio"


def test_plan_file_round_trip_and_validation(model_and_windows, tmp_path):
    _, model, adapter, windows = model_and_windows
    layers = prunable_layers(model, adapter)
    plan = allocate(model, adapter, "owl", Unstructured(0.7), windows=windows)
    Plan({"sparsity": plan}).save(tmp_path / "plan.json")
    again = load_plan(tmp_path / "plan.json", layers)["sparsity"]
    assert again.values == plan.values and again.target == 0.7

    data = json.loads((tmp_path / "plan.json").read_text())
    data["axes"]["sparsity"]["sparsity"]["model.layers.9.mlp.up_proj"] = 0.5
    (tmp_path / "unknown.json").write_text(json.dumps(data))
    with pytest.raises(PrunellaError, match="does not have"):
        load_plan(tmp_path / "unknown.json", layers)

    data = plan.to_json()  # a sparsity plan alone: the first format
    first = next(iter(data["sparsity"]))
    data["sparsity"][first] = 0.0  # no longer sums to the target
    (tmp_path / "off.json").write_text(json.dumps(data))
    with pytest.raises(PrunellaError, match="not the target"):
        load_plan(tmp_path / "off.json", layers)

    nm_plan = allocate(model, adapter, "owl", NM(4, 8), windows=windows)
    data = nm_plan.to_json()
    assert len(set(map(tuple, data["nm"].values()))) > 1  # mixed levels
    Plan({"sparsity": nm_plan}).save(tmp_path / "nm.json")
    loaded = load_plan(tmp_path / "nm.json", layers)["sparsity"]
    assert loaded.detail["nm"] == nm_plan.detail["nm"]
    wrong = next(name for name, (n, m) in data["nm"].items() if n != 4)
    data["nm"][wrong] = [8 - data["nm"][wrong][0], 8]  # the level no longer gives its sparsity
    (tmp_path / "contradicts.json").write_text(json.dumps(data))
    with pytest.raises(PrunellaError, match="has nm"):
        load_plan(tmp_path / "contradicts.json", layers)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e308])
def test_a_plan_without_target_with_a_nan_sparsity_is_one_error(tmp_path, bad):
    layers = {"a": (4, 8), "b": (8, 8)}
    (tmp_path / "plan.json").write_text(json.dumps({"sparsity": {"a": 0.5, "b": bad}}))
    with pytest.raises(PrunellaError, match="sparsity of 'b' must be in"):
        load_plan(tmp_path / "plan.json", layers)


def test_cli_allocate_then_prune_with_the_plan(model_and_windows, tmp_path, capsys):
    path = model_and_windows[0]
    code = main(
        [
            "allocate",
            str(path),
            "--allocation",
            "alphapruning",
            "--sparsity",
            "0.7",
            "--json",
            str(tmp_path / "plan.json"),
            "--quiet",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and "alpha_hill" in out and "overall" in out, capsys.readouterr().err
    code = main(
        [
            "prune",
            str(path),
            "--out",
            str(tmp_path / "o"),
            "--allocation-file",
            str(tmp_path / "plan.json"),
            "--solver",
            "wanda",
            "--nsamples",
            "2",
            "--seqlen",
            "32",
            "--quiet",
        ]
    )
    assert code == 0
    report = json.loads((tmp_path / "o" / "prune_report.json").read_text())
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["format"] == "prunella-plan/2" and plan["cost"]["bytes"] > 0
    assert report["plan"]["axes"]["sparsity"]["sparsity"] == plan["axes"]["sparsity"]["sparsity"]
    assert (tmp_path / "o" / "allocation.png").stat().st_size > 1000


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--allocation", "nosuchmethod"], "unknown allocation 'nosuchmethod'"),
        (["--allocation", "alphapruning", "--allocation-opt", "lam=0.1"], "no option 'lam'"),
        (["--allocation", "owl", "--allocation-opt", "spread=2"], "'spread' must be in [0, 1)"),
        (["--allocation", "owl", "--allocation-opt", "lam"], "KEY=VALUE"),
        (["--solver", "sparsegpt", "--solver-opt", "blocksize=x"], "must be int"),
        (["--allocation", "owl", "--granularity", "row"], "granularity"),
        (["--allocation", "owl", "--min-sparsity", "0.8"], "outside the clamp"),
    ],
)
def test_cli_allocation_errors(model_and_windows, tmp_path, capsys, argv, needle):
    code = main(
        [
            "prune",
            str(model_and_windows[0]),
            "--out",
            str(tmp_path / "o"),
            "--sparsity",
            "0.7",
            "--nsamples",
            "2",
            "--seqlen",
            "32",
            "--quiet",
            *argv,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_plan_patterns():
    plan = AxisPlan("sparsity", 0.5, {"a": 0.625}, detail={"nm": {"a": [3, 8]}})
    assert levels(plan, {"a": (4, 8)}) == {"a": NM(3, 8)}


def test_a_former_option_name_is_taken_with_a_notice(model_and_windows, capsys):
    _, model, adapter, windows = model_and_windows
    old = allocate(model, adapter, "owl", Unstructured(0.7), windows=windows, options={"lam": 0.1})
    new = allocate(model, adapter, "owl", Unstructured(0.7), windows=windows,
                   options={"spread": 0.1})  # fmt: skip
    assert old.values == new.values and old.params["spread"] == 0.1
    assert "option 'lam' is now 'spread'" in capsys.readouterr().err


def test_a_plan_given_to_the_api_is_checked_and_costed(model_and_windows):
    _, model, _, windows = model_and_windows
    plan = prunella.allocate(model, calibration=windows, sparsity=0.6, allocation="owl",
                             progress=False)  # fmt: skip
    import copy

    _, report = prunella.prune(copy.deepcopy(model), calibration=windows, allocation=plan,
                               format="sparse-bitmask", progress=False)  # fmt: skip
    cost = report["plan"]["cost"]
    assert cost["format"] == "sparse-bitmask"
    assert cost["layer_bytes"] < 0.75 * cost["dense_layer_bytes"]
    with pytest.raises(PrunellaError, match=r"is for sparsity 0\.6, but the recipe asks for 0\.5"):
        prunella.prune(copy.deepcopy(model), calibration=windows, allocation=plan, sparsity=0.5,
                       progress=False)  # fmt: skip
