"""Methods own their options: the registry, the recipe's {name, options}, the CLI's
--solver-opt/--allocation-opt, `prunella methods`, third-party entry points, and the two
methods written against the seam (the `random` solver and the `erk` allocation)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import install_package
from safetensors.torch import load_file

import prunella
from prunella.cli import main
from prunella.engine.adapters import get_weight
from prunella.errors import PrunellaError
from prunella.methods.allocation import ALLOCATIONS
from prunella.methods.sparsity import SOLVERS, get_solver
from prunella.methods.sparsity.patterns import NM, Unstructured
from prunella.recipe import build


def all_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, whatever its sharding."""
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def test_every_method_declares_its_options_and_paper():
    for registry in (SOLVERS, ALLOCATIONS):
        for name in registry.names():
            method = registry.get(name)
            assert method.paper and isinstance(method.needs, frozenset)
            for option in method.options:
                assert option.help and option.check(option.default, name) == option.default
    assert {"magnitude", "wanda", "sparsegpt", "random"} <= set(SOLVERS.names())
    assert {"uniform", "owl", "alphapruning", "erk"} <= set(ALLOCATIONS.names())


def test_recipe_resolves_method_options_and_names_bad_keys():
    recipe = build(solver="sparsegpt", solver_options={"percdamp": "0.05"})
    assert recipe.solver.options == {"blocksize": 128, "percdamp": 0.05}
    assert build(allocation={"name": "owl", "options": {"spread": 0.1}}).allocation.options == {
        "outlier_m": 5.0,
        "spread": 0.1,
    }
    with pytest.raises(PrunellaError, match="solver 'wanda' has no option 'percdamp'"):
        build(solver="wanda", solver_options={"percdamp": 0.1})
    with pytest.raises(PrunellaError, match=r"allocation 'alphapruning' option 'xmin' must be"):
        build(allocation="alphapruning", allocation_options={"xmin": "low"})
    with pytest.raises(PrunellaError, match="unknown solver 'obs'"):
        build(solver="obs")


def test_recipe_file_options_survive_a_flag_for_the_same_method(tmp_path):
    file = tmp_path / "r.yaml"
    file.write_text("solver: {name: sparsegpt, options: {blocksize: 64}}\n")
    assert build(file, solver="sparsegpt").solver.options["blocksize"] == 64
    assert build(file, solver_options={"percdamp": 0.02}).solver.options == {
        "blocksize": 64,
        "percdamp": 0.02,
    }
    assert build(file, solver="wanda").solver.options == {}  # another method: its own options


def test_methods_command_lists_options_defaults_and_papers(capsys):
    assert main(["methods", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    solvers = {m["name"]: m for m in listing["solver"]}
    sparsegpt = {o["name"]: o for o in solvers["sparsegpt"]["options"]}
    assert sparsegpt["percdamp"]["default"] == 0.01 and "SparseGPT" in solvers["sparsegpt"]["paper"]
    allocations = {m["name"]: m for m in listing["allocation"]}
    assert {o["name"] for o in allocations["owl"]["options"]} == {"outlier_m", "spread"}
    assert "Random Pruning" in allocations["erk"]["paper"]
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    assert "--solver-opt KEY=VALUE" in text and "spread (float, default 0.08" in text


def test_solver_options_reach_the_solver(tiny_llama, tmp_path):
    out = tmp_path / "o"
    argv = ["prune", str(tiny_llama), "--out", str(out), "--nsamples", "2", "--seqlen", "32"]
    assert main([*argv, "--solver-opt", "percdamp=0.5", "--quiet"]) == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert report["solver_options"] == {"blocksize": 128, "percdamp": 0.5}
    assert all(layer["damp"] == pytest.approx(0.5) for layer in report["layers"])


# --- the random solver and the ERK allocation -------------------------------------------


@pytest.mark.parametrize("pattern", [Unstructured(0.6), NM(2, 4), NM(3, 8)])
def test_random_solver_is_exact_seeded_and_differs_per_layer(pattern):
    random = get_solver("random")
    a, b = torch.randn(32, 64), torch.randn(32, 64)
    wa, _ = random.prune(a.clone(), pattern, None, seed=0)
    again, _ = random.prune(a.clone(), pattern, None, seed=0)
    other_seed, _ = random.prune(a.clone(), pattern, None, seed=1)
    wb, _ = random.prune(b.clone(), pattern, None, seed=0)
    assert torch.equal(wa, again)
    assert not torch.equal(wa == 0, other_seed == 0)
    assert not torch.equal(wa == 0, wb == 0)
    assert torch.equal(wa[wa != 0], a[wa != 0])  # survivors untouched
    if isinstance(pattern, NM):
        zeros = (wa == 0).view(32, -1, pattern.m).sum(-1)
        assert (zeros == pattern.m - pattern.n).all()
    else:
        assert (wa == 0).sum().item() == round(0.6 * wa.numel())


def test_random_pruning_with_erk_composes_and_meets_the_budget(tiny_llama):
    model, report = prunella.prune(
        tiny_llama,
        sparsity=0.7,
        solver="random",
        allocation="erk",
        granularity="layer",
        nsamples=2,
        seqlen=32,
        progress=False,
    )
    layers = report["plan"]["axes"]["sparsity"]["sparsity"]
    sizes = {r["name"]: r["shape"][0] * r["shape"][1] for r in report["layers"]}
    zeros = sum((get_weight(model.get_submodule(n)) == 0).sum().item() for n in layers)
    assert zeros == round(0.7 * sum(sizes.values()))  # exactly the budget
    # ERK: the small k/v projections (32x64) keep more than the MLP (128x64)
    assert layers["model.layers.0.self_attn.k_proj"] < layers["model.layers.0.mlp.up_proj"]


# --- third-party methods through entry points ---------------------------------------------

PLUGIN = {
    "pyproject.toml": """
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "prunella-demo-methods"
        version = "0.1"

        [project.entry-points."prunella.solvers"]
        keepfirst = "prunella_demo.keepfirst"

        [project.entry-points."prunella.allocations"]
        lastheavy = "prunella_demo.lastheavy"
    """,
    "prunella_demo/__init__.py": "",
    "prunella_demo/keepfirst.py": '''
        """Prunes the last columns of every row (a test method)."""
        import torch
        from prunella.methods.sparsity.patterns import pruned_count
        from prunella.registry import Option

        PAPER = "a test package"
        NEEDS = frozenset()
        OPTIONS = (Option("scale", float, 1.0, "multiplies the survivors", low=0.0),)

        def prune(weight, pattern, stats=None, scale=1.0):
            k = pruned_count(weight.numel(), pattern.sparsity)
            flat = weight.flatten().clone() * scale
            order = torch.arange(weight.shape[1]).repeat(weight.shape[0])
            flat[torch.argsort(order, descending=True, stable=True)[:k]] = 0
            return flat.view_as(weight), {"scale": scale}
    ''',
    "prunella_demo/lastheavy.py": '''
        """The last block gets the most sparsity (a test method)."""
        import torch

        from prunella.methods.allocation.run import Scores

        PAPER = "a test package"
        NEEDS = frozenset()
        OPTIONS = ()
        METRIC = "block_position"

        def allocate(run):
            return Scores(run.per_unit(lambda layers: float(len(layers))))

        def ratios(metric, target, sizes, **_):
            return target + torch.linspace(-0.1, 0.1, len(metric), dtype=metric.dtype)
    ''',
}


def test_third_party_methods_register_through_entry_points(tiny_llama, tmp_path):
    env = install_package(PLUGIN, tmp_path)
    listed = subprocess.run(
        [sys.executable, "-m", "prunella", "methods", "--json"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    listing = json.loads(listed.stdout)
    assert "keepfirst" in {m["name"] for m in listing["solver"]}
    assert "lastheavy" in {m["name"] for m in listing["allocation"]}
    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "prunella",
            "prune",
            str(tiny_llama),
            "--out",
            str(out),
            "--solver",
            "keepfirst",
            "--solver-opt",
            "scale=2",
            "--allocation",
            "lastheavy",
            "--sparsity",
            "0.5",
            "--nsamples",
            "2",
            "--seqlen",
            "32",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "prune_report.json").read_text())
    assert report["solver"] == "keepfirst" and report["solver_options"] == {"scale": 2.0}
    per_block = report["plan"]["axes"]["sparsity"]["sparsity"]
    assert per_block["model.layers.2.mlp.up_proj"] > per_block["model.layers.0.mlp.up_proj"]
    weights = all_weights(out)
    w = weights["model.layers.0.mlp.up_proj.weight"]
    assert (w[:, -1] == 0).all() and (w[:, 0] != 0).all()  # the method's own mask
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "prunella",
            "prune",
            str(tiny_llama),
            "--out",
            str(out / "x"),
            "--solver",
            "keepfirst",
            "--solver-opt",
            "scale=-1",
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert bad.returncode == 2
    expected = "error: solver 'keepfirst' option 'scale' must be in [0, inf], got -1.0"
    assert bad.stderr.strip() == expected


# --- what a new user meets ------------------------------------------------------------


def test_output_parents_created_and_files_readable_by_others(tiny_llama, tmp_path, capsys):
    out = tmp_path / "not" / "yet" / "there"
    old = os.umask(0o022)
    try:
        code = main(
            [
                "prune",
                str(tiny_llama),
                "--out",
                str(out),
                "--nsamples",
                "2",
                "--seqlen",
                "32",
                "--eval-data",
                "sample-eval",
                "--eval-max-windows",
                "2",
                "--quiet",
            ]
        )
    finally:
        os.umask(old)
    assert code == 0
    lines = capsys.readouterr().out.strip().splitlines()
    report = json.loads((out / "prune_report.json").read_text())
    ev = report["evaluation"]
    assert lines[-1] == (
        f"perplexity on {ev['data']}: dense {ev['dense_perplexity']:.3f} -> pruned "
        f"{ev['perplexity']:.3f} ({ev['tokens']:,} tokens)"
    )
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    for file in out.iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o644, file.name


def test_streamed_output_follows_the_umask(tiny_llama, tmp_path):
    out = tmp_path / "o"
    old = os.umask(0o002)
    try:
        code = main(
            [
                "prune",
                str(tiny_llama),
                "--out",
                str(out),
                "--offload",
                "disk",
                "--nsamples",
                "2",
                "--seqlen",
                "32",
                "--quiet",
            ]
        )
    finally:
        os.umask(old)
    assert code == 0 and len(list(out.glob("*.safetensors"))) == 4
    for file in out.iterdir():
        assert stat.S_IMODE(file.stat().st_mode) == 0o664, file.name


def test_inspect_lists_layers_in_model_order(tmp_path, tokenizer_dir, capsys):
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = tiny_config("llama")
    config.num_hidden_layers = 11  # as text, layers.1 < layers.10 < layers.2
    src = tmp_path / "src"
    AutoModelForCausalLM.from_config(config).save_pretrained(src)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(src)
    assert main(["inspect", str(src), "--json"]) == 0
    names = [r["name"] for r in json.loads(capsys.readouterr().out)["layers"]]
    order = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    order += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert names == [f"model.layers.{i}.{local}" for i in range(11) for local in order]


def test_resolved_recipe_reruns_the_same_prune(tiny_llama, tmp_path):
    a = tmp_path / "a"
    argv = ["prune", str(tiny_llama), "--nsamples", "2", "--seqlen", "32", "--quiet"]
    assert main([*argv, "--out", str(a), "--solver", "random", "--solver-opt", "seed=4"]) == 0
    recipe = yaml.safe_load((a / "recipe.yaml").read_text())
    assert recipe["solver"] == {"name": "random", "options": {"seed": 4}}
    b = tmp_path / "b"
    assert main(["prune", "--recipe", str(a / "recipe.yaml"), "--out", str(b), "--quiet"]) == 0
    wa, wb = all_weights(a), all_weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert Path(b / "recipe.yaml").read_text() == (a / "recipe.yaml").read_text().replace(
        str(a), str(b)
    )
