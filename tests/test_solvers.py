"""The maths of the layer-wise solvers, on single layers with known inputs."""

from __future__ import annotations

import pytest
import torch

from prunella.engine.stats import COL_NORMS, HESSIAN, LayerStats, StatsCollector
from prunella.methods.sparsity import SOLVERS, get_solver
from prunella.methods.sparsity.patterns import NM, Unstructured
from prunella.methods.sparsity.sparsegpt import inverse_hessian_cholesky


def layer_problem(rows=96, cols=128, tokens=4096, seed=0):
    """A weight matrix and LLM-like inputs: correlated features, a few with large scale."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5
    x = torch.randn(tokens, cols, generator=g) @ (torch.eye(cols) + mix)
    x[:, :6] *= 12.0  # outlier features, as in LLM activations
    w = torch.randn(rows, cols, generator=g) / cols**0.5
    return w, x


def stats_for(x, needs=(HESSIAN, COL_NORMS)):
    stats = LayerStats(x.shape[1], needs, x.device)
    for chunk in x.split(1000):
        stats.add(chunk)
    return stats


def rel_error(w, w_hat, x):
    return ((x @ (w - w_hat).t()).norm() / (x @ w.t()).norm()).item()


def run(name, w, x, pattern, **options):
    solver = get_solver(name)
    new, _ = solver.call("prune", w.clone(), pattern, stats_for(x), **options)
    return new


@pytest.mark.parametrize("pattern", [Unstructured(0.5), Unstructured(0.7), NM(2, 4), NM(4, 8)])
def test_error_ordering_sparsegpt_wanda_magnitude(pattern):
    w, x = layer_problem()
    errors = {name: rel_error(w, run(name, w, x, pattern), x) for name in SOLVERS}
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


@pytest.mark.parametrize("name", list(SOLVERS))
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.7, 0.9, 0.999])
def test_unstructured_sparsity_is_exact(name, sparsity):
    w, x = layer_problem(rows=40, cols=136)  # 136 = one full block of 128 and a partial one
    new = run(name, w, x, Unstructured(sparsity))
    assert (new == 0).sum().item() == round(sparsity * w.numel())
    assert torch.isfinite(new).all()


@pytest.mark.parametrize("name", list(SOLVERS))
@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 4), (3, 8)])
def test_nm_groups_hold(name, n, m):
    w, x = layer_problem(rows=32, cols=128)
    new = run(name, w, x, NM(n, m))
    zeros = (new == 0).view(32, -1, m).sum(-1)
    assert (zeros == m - n).all()  # exactly M - N zeros in every group of M inputs
    assert (new == 0).sum().item() == (m - n) * w.numel() // m


def test_sparsegpt_at_zero_sparsity_keeps_weights():
    w, x = layer_problem()
    assert torch.equal(run("sparsegpt", w, x, Unstructured(0.0)), w)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_deterministic(name):
    w, x = layer_problem()
    a = run(name, w, x, Unstructured(0.6))
    b = run(name, w, x, Unstructured(0.6))
    assert torch.equal(a, b)


def test_magnitude_and_wanda_only_zero_weights():
    w, x = layer_problem()
    for name in ("magnitude", "wanda"):
        new = run(name, w, x, Unstructured(0.5))
        kept = new != 0
        assert torch.equal(new[kept], w[kept])


def test_wanda_scores_use_activation_norms():
    # Two columns with equal weights: the one with the larger input norm survives.
    w = torch.ones(4, 2)
    x = torch.tensor([[1.0, 10.0]] * 8)
    new, _ = get_solver("wanda").call("prune", w, Unstructured(0.5), stats_for(x, [COL_NORMS]))
    assert (new[:, 0] == 0).all() and (new[:, 1] == 1).all()


def test_sparsegpt_update_is_optimal_for_first_column():
    """Pruning column 0 alone, the OBS update of the later columns is exact least squares.

    (SparseGPT only updates columns to the right of a pruned weight, so the
    exact optimum is reached when the pruned weight is the first column.)
    """
    torch.manual_seed(0)
    x = torch.randn(512, 8) + 0.5 * torch.randn(512, 1)  # correlated features
    w = torch.randn(1, 8)
    w[0, 0] = 0.01  # the least salient weight: the one pruned
    new, _ = get_solver("sparsegpt").call(
        "prune", w.clone(), Unstructured(1 / 8), stats_for(x), percdamp=0.0
    )
    pruned = (new == 0).squeeze()
    assert pruned.tolist() == [True] + [False] * 7
    keep = ~pruned
    # least squares: min ||x w^T - x[:, keep] v^T||
    target = x @ w.t()
    v = torch.linalg.lstsq(x[:, keep].double(), target.double()).solution.t()
    assert torch.allclose(new[:, keep].double(), v, atol=1e-4)


def test_sparsegpt_survives_singular_hessian():
    """Fewer tokens than features and duplicated/dead features: dampening is raised, no crash."""
    w, _ = layer_problem(rows=16, cols=64)
    x = torch.randn(8, 64)
    x[:, 10] = x[:, 11]
    x[:, 20:24] = 0.0  # dead inputs
    new, info = get_solver("sparsegpt").call("prune", w.clone(), Unstructured(0.5), stats_for(x))
    assert (new == 0).sum().item() == w.numel() // 2
    assert (new[:, 20:24] == 0).all(), "weights of dead inputs are pruned first"
    assert info["damp"] >= 0.01


def test_inverse_hessian_factor():
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    h = 2 * x.t() @ x / 256
    u, damp = inverse_hessian_cholesky(h, 0.01)
    damped = h + 0.01 * h.diagonal().mean() * torch.eye(16)
    assert torch.allclose(u.t() @ u, torch.linalg.inv(damped), atol=1e-4, rtol=1e-3)
    assert damp == pytest.approx(0.01)


def test_stats_shared_between_layers_reading_the_same_input():
    torch.manual_seed(0)

    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q = torch.nn.Linear(8, 8)
            self.k = torch.nn.Linear(8, 4)
            self.o = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.o(self.q(x)) + self.k(x).sum(-1, keepdim=True)

    attn = Attn()
    xs = [torch.randn(2, 5, 8) for _ in range(3)]
    with StatsCollector({"q": attn.q, "k": attn.k, "o": attn.o}, [HESSIAN]) as collector:
        for x in xs:
            attn(x)
    stats = collector.stats
    assert stats["q"] is stats["k"] and stats["o"] is not stats["q"]
    flat = torch.cat([x.reshape(-1, 8) for x in xs])
    assert stats["q"].tokens == 30
    assert torch.allclose(stats["q"].hessian, 2 * flat.t() @ flat / 30, atol=1e-5)
    assert torch.allclose(stats["q"].col_norms, flat.norm(dim=0), atol=1e-5)
