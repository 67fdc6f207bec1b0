"""The allocations that read the model's loss (ecoflap, layerif, lua), each against a
direct computation on a tiny model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import build_checkpoint, tiny_config
from transformers import AutoModelForCausalLM

from prunella.engine.adapters import adapter_for, get_weight
from prunella.engine.gradients import block_gradients
from prunella.engine.store import MemoryStore, open_store
from prunella.errors import PrunellaError
from prunella.methods.allocation import ecoflap
from prunella.methods.allocation.ecoflap import direction, ecoflap_ratios, zo_directional
from prunella.methods.allocation.layerif import datainf_influence, pieces, savgol
from prunella.methods.allocation.lua import ce_threshold_grads, hard_kept, row_ranks, soft_mask
from prunella.methods.sparsity.patterns import NM, Unstructured

CPU = torch.device("cpu")


def tiny(family: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family)).float().eval()
    return model, adapter_for(model)


def windows(n: int, seqlen: int = 16, seed: int = 0) -> torch.Tensor:
    vocab = tiny_config("llama").vocab_size
    return torch.randint(3, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def mean_loss(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def autograd_grads(model, adapter, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """``dL/dW`` (``[out, in]``) of every prunable layer by one ordinary backward of the
    whole model, sliced as each layer's weight is (Conv1D transposed, expert views)."""
    model.zero_grad()
    mean_loss(model, ids).backward()
    out = {}
    for i, block in enumerate(adapter.blocks(model)):
        for local, layer in adapter.linears(block).items():
            experts = getattr(layer, "experts", None)
            param = getattr(experts, layer.param) if experts is not None else layer.weight
            original = param.data
            param.data = param.grad
            out[f"{adapter.blocks_path}.{i}.{local}"] = get_weight(layer).detach().clone()
            param.data = original
    return out


def plan_for(model, adapter, method, pattern, ids, options=None, **kwargs):
    """The sparsity plan of ``method`` for an in-memory model, on the CPU in float32."""
    import prunella

    target = (
        {"sparsity": pattern.sparsity}
        if isinstance(pattern, Unstructured)
        else {"pattern": str(pattern)}
    )
    return prunella.allocate(
        model, calibration=ids, allocation={"name": method, "options": options or {}},
        device="cpu", compute_dtype="float32", progress=False, **target, **kwargs,
    )["sparsity"]  # fmt: skip


def save(plan, path) -> None:
    """A sparsity plan written as a plan file."""
    from prunella import Plan

    Plan({"sparsity": plan}).save(path)


def budget(plan, model, adapter) -> float:
    sizes = {n: r * c for n, (r, c) in adapter.layers(model).items()}
    return sum(plan.values[n] * sizes[n] for n in sizes) / sum(sizes.values())


# --- ECoFLaP ------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_zeroth_order_estimate_equals_autograd_directional_derivative(family):
    model, adapter = tiny(family)
    ids = windows(4)
    eps = 1e-3
    g = zo_directional(MemoryStore(model, adapter), ids, mu=eps, batch=2, perturb="matrix",
                       seed=0, device=CPU, progress=False)  # fmt: skip
    names = list(adapter.layers(model))
    assert list(g) == names
    estimates, exact = [], []
    for k in range(2):
        grads = autograd_grads(model, adapter, ids[2 * k : 2 * k + 2])
        for index, name in enumerate(names):
            z = direction(grads[name].shape, 0, k, index)
            exact.append((z * grads[name]).sum().item())
            estimates.append(g[name][k])
            # float32 losses: the difference of two losses 2 eps apart is good to ~1e-6
            assert estimates[-1] == pytest.approx(exact[-1], rel=2e-2, abs=1e-3), (name, k)
    estimates, exact = torch.tensor(estimates), torch.tensor(exact)
    assert (estimates - exact).norm() < 0.02 * exact.norm()


def test_zeroth_order_block_perturbation_and_model_untouched():
    model, adapter = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = windows(2)
    g = zo_directional(MemoryStore(model, adapter), ids, mu=1e-3, batch=2, perturb="block", seed=0,
                       device=CPU, progress=False)  # fmt: skip
    assert list(g) == [f"model.layers.{i}" for i in range(3)]
    grads = autograd_grads(model, adapter, ids)
    for i in range(3):
        names = [n for n in grads if n.startswith(f"model.layers.{i}.")]
        exact = sum(
            (direction(grads[n].shape, j * 7_919, 0, i) * grads[n]).sum().item()
            for j, n in enumerate(names)
        )
        assert g[f"model.layers.{i}"][0] == pytest.approx(exact, rel=2e-2, abs=1e-3)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_ecoflap_mapping_is_proportional_with_the_cap_and_exact():
    sizes = torch.tensor([100.0, 100.0, 200.0, 100.0])
    score = torch.tensor([1.0, 2.0, 0.5, 40.0])
    s = ecoflap_ratios(score, 0.7, sizes, gap=0.1)
    assert ((1 - s) * sizes).sum().item() == pytest.approx(0.3 * sizes.sum().item())
    assert (s <= 0.8 + 1e-9).all()  # the cap: at most target + gap
    s = ecoflap_ratios(score, 0.7, sizes, gap=0.25)
    keep = (1 - s) * sizes
    assert keep.sum().item() == pytest.approx(0.3 * sizes.sum().item())
    assert s[3].item() == pytest.approx(0.0)  # the top score is dense, its overflow re-shared
    floor = 0.05 * sizes
    extra = keep[:3] - floor[:3]
    ratio = extra / score[:3]
    assert torch.allclose(ratio, ratio[0].expand(3), rtol=1e-9)  # proportional to the score


def test_ecoflap_plan_exact_for_unstructured_and_nm_and_layers():
    model, adapter = tiny()
    ids = windows(4)
    for pattern, granularity in ((Unstructured(0.7), "block"), (Unstructured(0.6), "layer"),
                                 (NM(4, 8), "block")):  # fmt: skip
        plan = plan_for(model, adapter, "ecoflap", pattern, ids, {"batch": 2},
                        granularity=granularity)  # fmt: skip
        if isinstance(pattern, NM):
            assert set(plan.detail["nm"][n][1] for n in plan.detail["nm"]) == {8}
            assert budget(plan, model, adapter) == pytest.approx(0.5, abs=0.07)
        else:
            sizes = {n: r * c for n, (r, c) in adapter.layers(model).items()}
            pruned = sum(round(plan.values[n] * sizes[n]) for n in sizes)
            assert pruned == round(pattern.sparsity * sum(sizes.values()))
        assert plan.method == "ecoflap" and plan.metric_name == "zo_grad"
        assert len(plan.metric) == (3 if granularity == "block" else len(plan.values))


def test_ecoflap_streams_as_it_runs_in_memory(tmp_path, tokenizer_dir, monkeypatch):
    path = build_checkpoint(tmp_path / "m", "llama", tokenizer_dir)
    ids = windows(4)
    results = []
    for offload in ("none", "disk"):
        store, _ = open_store(path, offload)
        results.append(
            zo_directional(
                store, ids, mu=1e-2, batch=2, perturb="matrix", seed=0, device=CPU, progress=False
            )
        )
    monkeypatch.setattr(ecoflap, "STREAM_BYTES", 1)  # one source block per sweep
    store, _ = open_store(path, "disk")
    results.append(
        zo_directional(
            store, ids, mu=1e-2, batch=2, perturb="matrix", seed=0, device=CPU, progress=False
        )
    )
    for name in results[0]:
        for other in results[1:]:
            assert results[0][name] == pytest.approx(other[name], rel=1e-4, abs=1e-6)


# --- shared: block-by-block gradients ------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen3_moe"])
def test_block_gradients_equal_one_backward(family):
    model, adapter = tiny(family)
    ids = windows(2)
    got: dict[str, torch.Tensor] = {}
    for _, grads in block_gradients(MemoryStore(model, adapter), ids, device=CPU):
        got |= grads
    for j in range(2):
        exact = autograd_grads(model, adapter, ids[j : j + 1])
        assert set(got) == set(exact)
        for name, grad in exact.items():
            assert torch.allclose(got[name][j], grad, rtol=1e-3, atol=1e-6), name


# --- LayerIF ------------------------------------------------------------------


def datainf_reference(train: list[torch.Tensor], val: list[torch.Tensor], damping: float):
    """DataInf as its reference code computes it: an explicit inverse-Hessian-vector
    product per validation example, then a dot product with each training gradient."""
    n = len(train)
    lam = sum((g**2).mean() for g in train) / n / damping
    out = torch.zeros(n, len(val), dtype=torch.float64)
    for v, g_val in enumerate(val):
        hvp = torch.zeros_like(g_val)
        for g_tr in train:
            c = (g_val * g_tr).sum() / (lam + (g_tr**2).sum())
            hvp += (g_val - c * g_tr) / (n * lam)
        for t, g_tr in enumerate(train):
            out[t, v] = -(hvp * g_tr).sum()
    return out


def test_datainf_influence_equals_the_reference_computation():
    model, adapter = tiny()
    ids = windows(6)
    grads: dict[str, torch.Tensor] = {}
    for _, g in block_gradients(MemoryStore(model, adapter), ids, device=CPU):
        grads |= g
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.2.mlp.down_proj"):
        g = grads[name].double()
        got = datainf_influence(g[:4], g[4:], damping=10.0)
        expected = datainf_reference(list(g[:4]), list(g[4:]), 10.0)
        assert torch.allclose(got, expected, rtol=1e-6, atol=1e-12)


def test_influence_ranks_training_points_as_leave_one_out_retraining_does():
    """Ridge regression: DataInf's influence of each training point on the validation
    loss against the change of that loss when the point is removed and the model refit."""
    torch.manual_seed(0)
    n, d, lam = 40, 3, 0.5
    X = torch.randn(n, d, dtype=torch.float64)
    theta = torch.randn(d, dtype=torch.float64)
    y = X @ theta + 0.5 * torch.randn(n, dtype=torch.float64)
    y[:4] += 4 * torch.randn(4, dtype=torch.float64)  # a few corrupted points
    Xv = torch.randn(8, d, dtype=torch.float64)
    yv = Xv @ theta

    def fit(keep):
        A = X[keep].T @ X[keep] / n + lam * torch.eye(d, dtype=torch.float64)
        return torch.linalg.solve(A, X[keep].T @ y[keep] / n)

    def val_loss(th):
        return 0.5 * ((Xv @ th - yv) ** 2).sum().item()

    everything = torch.ones(n, dtype=torch.bool)
    fitted = fit(everything)
    loo = []
    for t in range(n):
        keep = everything.clone()
        keep[t] = False
        loo.append(val_loss(fit(keep)) - val_loss(fitted))
    g_train = (X @ fitted - y)[:, None] * X
    g_val = (Xv @ fitted - yv)[:, None] * Xv
    damping = ((g_train**2).mean(1).mean() / lam).item()  # DataInf's lambda = the ridge's
    influence = datainf_influence(g_train, g_val, damping).sum(1)
    # upweighting t by e changes the validation loss by e I(t); removing it is e = -1/n
    ranks = torch.stack([influence, -torch.tensor(loo)]).argsort(1).argsort(1).double()
    assert torch.corrcoef(ranks)[0, 1] > 0.85
    harmful = influence.argmax()
    assert loo[harmful] < 0  # the most harmful point: removing it helps


def test_savgol_matches_the_published_coefficients_and_keeps_cubics():
    y = torch.randn(12, dtype=torch.float64)
    out = savgol(y, 7, 3)
    kernel = torch.tensor([-2, 3, 6, 7, 6, 3, -2], dtype=torch.float64) / 21
    for i in range(3, 9):
        assert out[i].item() == pytest.approx((kernel * y[i - 3 : i + 4]).sum().item())
    x = torch.arange(12, dtype=torch.float64)
    cubic = 0.5 * x**3 - 2 * x**2 + x - 3
    assert torch.allclose(savgol(cubic, 7, 3), cubic)  # edges included (interp mode)


def test_layerif_plan_splits_the_text_and_meets_the_budget():
    model, adapter = tiny()
    ids = windows(4, seqlen=32)
    plan = plan_for(model, adapter, "layerif", Unstructured(0.7), ids, {"length": 16, "smooth": 0})
    sizes = {n: r * c for n, (r, c) in adapter.layers(model).items()}
    assert sum(round(plan.values[n] * sizes[n]) for n in sizes) == round(0.7 * sum(sizes.values()))
    assert plan.metric_name == "influence" and len(plan.metric) == 3
    order = sorted(plan.metric, key=plan.metric.get)  # higher influence, more sparsity
    block = {u: plan.values[f"{u}.mlp.up_proj"] for u in plan.metric}
    assert block[order[0]] < block[order[-1]]
    assert pieces(ids, 16).shape == (8, 16)
    with pytest.raises(PrunellaError, match="at least 2 training"):
        plan_for(model, adapter, "layerif", Unstructured(0.7), ids[:1], {"length": 32})
    with pytest.raises(PrunellaError, match="longer than the calibration windows"):
        plan_for(model, adapter, "layerif", Unstructured(0.7), ids, {"length": 64})


# --- Lua-LLM ------------------------------------------------------------------


def test_threshold_gradient_equals_autograd_through_the_soft_mask():
    model, adapter = tiny()
    ids = windows(1)
    store = MemoryStore(model, adapter)
    layers = {}
    for i, block in enumerate(adapter.blocks(model)):
        for local, layer in adapter.linears(block).items():
            layers[f"model.layers.{i}.{local}"] = layer
    gen = torch.Generator().manual_seed(0)
    ranks = {
        n: row_ranks(torch.rand(get_weight(m).shape, generator=gen)) for n, m in layers.items()
    }
    # thresholds spread over the rows, some between two ranks' steps
    t = {n: torch.rand(r.shape[0], generator=gen) * 0.8 + 0.1 for n, r in ranks.items()}
    got = ce_threshold_grads(store, ids, ranks, t, device=CPU)

    leaves = {n: v.clone().requires_grad_(True) for n, v in t.items()}
    dense = {n: get_weight(m).detach().clone() for n, m in layers.items()}
    for n, m in layers.items():
        del m.weight
        m.weight = dense[n] * soft_mask(ranks[n], leaves[n])
    mean_loss(model, ids).backward()
    for n in layers:
        assert torch.allclose(got[n], leaves[n].grad, rtol=1e-3, atol=1e-7), n


def test_soft_mask_counts_and_the_hard_mask():
    ranks = row_ranks(torch.randn(5, 40))
    assert sorted(ranks[0].tolist()) == list(range(1, 41))
    t = torch.tensor([0.0, 0.25, 0.5, 0.61, 1.0])
    kept = (soft_mask(ranks, t) > 0.5).sum(1)
    assert kept.tolist() == hard_kept(t, 40).long().tolist() == [40, 30, 20, 16, 0]


def test_lua_plan_has_exact_row_budgets_that_the_solvers_honour(tmp_path):
    import prunella

    model, adapter = tiny()
    ids = windows(4)
    plan = plan_for(model, adapter, "lua", Unstructured(0.6), ids, {"steps": 4, "lr": 0.05})
    sizes = {n: r * c for n, (r, c) in adapter.layers(model).items()}
    assert sum(sum(plan.detail["rows"][n]) for n in sizes) == round(0.6 * sum(sizes.values()))
    assert len({round(plan.values[n], 3) for n in sizes}) > 1  # learned, not uniform
    for n, (rows, cols) in adapter.layers(model).items():
        assert len(plan.detail["rows"][n]) == rows
        assert sum(plan.detail["rows"][n]) == round(plan.values[n] * rows * cols)
    save(plan, tmp_path / "plan.json")
    for solver in ("wanda", "sparsegpt"):
        pruned, _ = prunella.prune(
            tiny()[0], sparsity=0.6, solver=solver, allocation=tmp_path / "plan.json",
            calibration=ids, progress=False,
        )  # fmt: skip
        for i, block in enumerate(adapter.blocks(pruned)):
            for local, layer in adapter.linears(block).items():
                zeros = (get_weight(layer) == 0).sum(1).tolist()
                assert zeros == plan.detail["rows"][f"model.layers.{i}.{local}"], (solver, local)
    nm = plan_for(model, adapter, "lua", NM(4, 8), ids, {"steps": 2})
    assert "rows" not in nm.detail and {v[1] for v in nm.detail["nm"].values()} == {8}


def test_gradients_with_swapped_weights_stream_as_in_memory(tmp_path, tokenizer_dir):
    """Lua's threshold gradients (block_gradients with weights swapped in) on a model
    streamed from disk equal those in memory, and neither changes the model."""
    path = build_checkpoint(tmp_path / "m", "qwen3_moe", tokenizer_dir)
    ids = windows(1)
    results = []
    for offload in ("none", "disk"):
        store, _ = open_store(path, offload)
        shapes = store.layers()
        gen = torch.Generator().manual_seed(0)
        ranks = {n: row_ranks(torch.rand(shape, generator=gen)) for n, shape in shapes.items()}
        t = {n: torch.full((shape[0],), 0.5) for n, shape in shapes.items()}
        before = {k: v.clone() for k, v in store.model.state_dict().items() if not v.is_meta}
        results.append(ce_threshold_grads(store, ids, ranks, t, device=CPU))
        after = store.model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
    assert set(results[0]) == set(results[1])
    for name in results[0]:
        assert torch.allclose(results[0][name], results[1][name], rtol=1e-4, atol=1e-8), name


def test_fitted_row_budgets_stay_within_the_clamp():
    """Rows clamped at the bounds keep whole counts within them (the leftover weights go
    only to rows with room), and the total is exact."""
    from prunella.methods.plan import fit_budget

    sizes = torch.full((1000,), 576.0)
    raw = torch.linspace(0.5, 1.2, 1000, dtype=torch.float64)
    fitted = fit_budget(raw, sizes, 0.75, 0.0, 0.8)
    counts = fitted * sizes
    assert counts.max().item() <= 0.8 * 576
    assert round(counts.sum().item()) == round(0.75 * sizes.sum().item())


def test_a_row_plan_is_refused_for_an_nm_pattern(tmp_path):
    from prunella.errors import PrunellaError as Error

    model, adapter = tiny()
    plan = plan_for(model, adapter, "lua", Unstructured(0.5), windows(2), {"steps": 1})
    save(plan, tmp_path / "plan.json")
    import prunella

    with pytest.raises(Error, match="per-row budgets, which a 2:4 pattern cannot honour"):
        prunella.prune(tiny()[0], pattern="2:4", allocation=tmp_path / "plan.json",
                       calibration=windows(2), progress=False)  # fmt: skip
