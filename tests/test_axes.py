"""An axis is one package: a toy third axis, registered from a test package through an
entry point, compresses through the CLI, the API and a recipe, allocated by the
score-based methods as they are, composed with sparsity, touching no file of Prunella."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import install_package
from safetensors.torch import load_file

from prunella.engine.adapters import adapter_for
from prunella.io.models import load

# The toy axis: each layer's weight truncated by SVD to a lower rank; the budget is the
# (size-weighted) fraction of the layers' rank removed.
RANK_AXIS = {
    "pyproject.toml": """
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "prunella-rank-axis"
        version = "0.1"

        [project.entry-points."prunella.axes"]
        rank = "prunella_rank"
    """,
    "prunella_rank/__init__.py": '''
        """A toy axis: low-rank truncation of every layer by SVD (a test package)."""
        import torch
        from pydantic import Field

        from prunella.errors import PrunellaError
        from prunella.methods.plan import Budget, fit_budget

        NAME = "rank"
        ORDER = 10  # before sparsity: a truncated layer is then pruned
        DEFAULT = False
        FIELDS = {
            "rank": (
                float | None,
                Field(None, description="Fraction of each layer's rank removed (toy axis)."),
            )
        }
        METHODS = {}


        def budget(recipe, default=False):
            if recipe.rank is None:
                return None
            if not 0.0 <= recipe.rank < 1.0:
                raise PrunellaError(f"rank must be in [0, 1), got {recipe.rank}")
            return Budget(NAME, recipe.rank, recipe.rank, 0.0, 0.95)


        def fit(raw, shapes, budget):
            names = list(raw)
            fitted = fit_budget(
                torch.tensor([raw[n] for n in names], dtype=torch.float64),
                torch.tensor([float(shapes[n][0] * shapes[n][1]) for n in names],
                             dtype=torch.float64),
                budget.target, budget.lo, budget.hi,
            )
            return {n: v.item() for n, v in zip(names, fitted)}, {}


        def levels(plan, shapes):
            return dict(plan.values)


        def check(plan, shapes, budget, where):
            if any(not 0.0 <= v < 1.0 for v in plan.values.values()):
                raise PrunellaError(f"{where}: rank fractions must be in [0, 1)")


        def layer_bytes(shape, level, nbytes, fmt):
            return nbytes


        def kept_rank(shape, level):
            return max(1, round((1 - level) * min(shape)))


        class Truncate:
            axis, name, needs, data_free_note = NAME, "svd", frozenset(), "truncated"

            def __call__(self, weight, level, stats, data_free=False):
                keep = kept_rank(weight.shape, level)
                u, s, vh = torch.linalg.svd(weight, full_matrices=False)
                return (u[:, :keep] * s[:keep]) @ vh[:keep], {"rank_kept": keep}

            def describe(self, level):
                return {"rank_removed": level}


        def compressor(recipe):
            return Truncate()


        def report(recipe, plan, results):
            return {"rank_target": plan.target,
                    "summary": f"{plan.target:.0%} of the rank removed ({plan.method} allocation)"}


        def record(recipe, plan):
            return {}
    ''',
}


@pytest.fixture(scope="module")
def rank_env(tmp_path_factory):
    """An environment whose Python finds the toy axis package (installed for real)."""
    return install_package(RANK_AXIS, tmp_path_factory.mktemp("rank-axis"))


def prunella_cli(env, *argv) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "prunella", *argv], capture_output=True, text=True, env=env
    )


def layer_ranks(out, model_dir) -> dict[str, int]:
    """The rank of every prunable weight of the checkpoint in ``out``."""
    model, _, _, _ = load(out)
    adapter = adapter_for(model)
    ranks = {}
    for i, block in enumerate(adapter.blocks(model)):
        for local, layer in adapter.linears(block).items():
            ranks[f"{adapter.blocks_path}.{i}.{local}"] = int(
                torch.linalg.matrix_rank(layer.weight.detach().double(), rtol=1e-4)
            )
    return ranks


def check_rank_plan(report: dict, out, target: float) -> dict:
    """The plan meets the rank budget exactly, and every layer has its planned rank."""
    plan = report["plan"]["axes"]["rank"]
    sizes = {r["name"]: r["shape"][0] * r["shape"][1] for r in report["layers"]}
    removed = sum(plan["rank"][n] * sizes[n] for n in sizes)
    assert round(removed) == round(target * sum(sizes.values()))  # exact, to the weight
    shapes = {r["name"]: r["shape"] for r in report["layers"]}
    for name, rank in layer_ranks(out, None).items():
        assert rank == max(1, round((1 - plan["rank"][name]) * min(shapes[name]))), name
    return plan


def test_the_axis_brings_its_flag_and_prunes_through_the_cli(rank_env, tiny_llama, tmp_path):
    helped = prunella_cli(rank_env, "prune", "--help")
    assert "--rank FLOAT" in helped.stdout and "rank removed" in helped.stdout
    out = tmp_path / "owl"
    done = prunella_cli(
        rank_env, "prune", str(tiny_llama), "--out", str(out), "--rank", "0.5",
        "--allocation", "owl", "--nsamples", "2", "--seqlen", "32", "--quiet",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "50% of the rank removed (owl allocation)" in done.stdout
    report = json.loads((out / "prune_report.json").read_text())
    assert list(report["plan"]["axes"]) == ["rank"]  # sparsity is not asked for: not applied
    plan = check_rank_plan(report, out, 0.5)
    # OWL's scores and its mapping, unchanged, allocate this axis: blocks differ
    per_block = {b: plan["rank"][f"model.layers.{b}.mlp.up_proj"] for b in range(3)}
    assert len(set(per_block.values())) > 1 and plan["metric_name"] == "outlier_ratio"
    assert report["layer_levels"] == ["rank_removed"]
    assert (out / "allocation.png").stat().st_size > 1000


def test_the_axis_composes_with_sparsity_through_a_recipe(rank_env, tiny_llama, tmp_path):
    recipe = tmp_path / "run.yaml"
    recipe.write_text(
        f"model: {tiny_llama}\nrank: 0.25\nsparsity: 0.5\nsolver: wanda\n"
        "allocation: alphapruning\nnsamples: 2\nseqlen: 32\n"
    )
    out = tmp_path / "both"
    done = prunella_cli(rank_env, "prune", "--recipe", str(recipe), "--out", str(out), "--quiet")
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "prune_report.json").read_text())
    assert list(report["plan"]["axes"]) == ["rank", "sparsity"]  # in axis order
    assert report["sparsity"] == pytest.approx(0.5, abs=1e-6)  # pruned after the truncation
    weights = {k: v for shard in out.glob("*.safetensors") for k, v in load_file(shard).items()}
    planned = report["plan"]["axes"]["sparsity"]["sparsity"]
    for row in report["layers"]:
        w = weights[row["name"] + ".weight"]
        assert (w == 0).sum().item() == round(planned[row["name"]] * w.numel()), row["name"]
        assert row["rank_kept"] == max(1, round((1 - row["rank_removed"]) * min(w.shape)))
    saved = (out / "recipe.yaml").read_text()
    assert "rank: 0.25" in saved and "sparsity: 0.5" in saved


def test_the_axis_prunes_through_the_api_and_allocates(rank_env, tiny_llama, tmp_path):
    script = textwrap.dedent(f"""
        import json, prunella
        plan = prunella.allocate({str(tiny_llama)!r}, rank=0.3, allocation="erk",
                                 granularity="layer", progress=False)
        plan.save({str(tmp_path / "plan.json")!r})
        report = prunella.prune_to_dir(model={str(tiny_llama)!r}, out={str(tmp_path / "api")!r},
                                       allocation={str(tmp_path / "plan.json")!r}, nsamples=2,
                                       seqlen=32, progress=False)
        print(json.dumps(report["plan"]["axes"]["rank"]["rank"]))
    """)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=rank_env
    )
    assert done.returncode == 0, done.stderr
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["format"] == "prunella-plan/2" and list(plan["axes"]) == ["rank"]
    assert json.loads(done.stdout) == plan["axes"]["rank"]["rank"]  # the plan file, applied
    report = json.loads((tmp_path / "api" / "prune_report.json").read_text())
    check_rank_plan(report, tmp_path / "api", 0.3)


def test_a_bad_budget_on_the_axis_is_one_line(rank_env, tiny_llama, tmp_path):
    done = prunella_cli(
        rank_env, "prune", str(tiny_llama), "--out", str(tmp_path / "o"), "--rank", "1.5",
        "--quiet",
    )  # fmt: skip
    assert done.returncode == 2 and done.stderr == "error: rank must be in [0, 1), got 1.5\n"
    assert not (tmp_path / "o").exists()


def test_a_broken_axis_package_is_one_line(tmp_path, tiny_llama):
    """An axis that misses hooks is refused by name, in one line, whatever the command."""
    env = install_package(
        {
            "pyproject.toml": RANK_AXIS["pyproject.toml"].replace("prunella_rank", "broken_axis"),
            "broken_axis/__init__.py": "NAME = 'rank'\nORDER = 10\n",
        },
        tmp_path,
    )
    for argv in (["methods"], ["prune", str(tiny_llama), "--out", str(tmp_path / "o")]):
        done = prunella_cli(env, *argv)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert done.stderr.startswith("error: axis 'rank' (broken_axis) does not declare DEFAULT")
    assert not (tmp_path / "o").exists()
