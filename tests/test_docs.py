"""The documentation that the code declares is the code's: the README's methods table and
docs/options.md are what scripts/make_docs.py writes from the registries and the recipe."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_docs():
    spec = importlib.util.spec_from_file_location("make_docs", ROOT / "scripts" / "make_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_methods_table_is_generated_from_the_registries():
    docs = make_docs()
    text = docs.README.read_text(encoding="utf-8")
    assert text == docs.readme(text), "docs/methods.md is stale: run python scripts/make_docs.py"
    table = docs.methods_table()
    for name in ("sparsegpt", "owl", "trim", "lua", "`spread` (0.08)", "`examples` (396)"):
        assert name in table, name


def test_the_options_page_is_generated_from_the_recipe():
    docs = make_docs()
    page = docs.OPTIONS.read_text(encoding="utf-8")
    assert page == docs.options_page(), "docs/options.md is stale: run python scripts/make_docs.py"
    for flag in ("--sparsity", "--solver-opt KEY=VALUE", "--granularity", "--format"):
        assert f"`{flag}`" in page, flag


def test_option_defaults_are_declared_once():
    """A method's functions take its options without defaults: the registry passes the
    values declared in OPTIONS, the one place a default is written."""
    import inspect

    from prunella.recipe import METHOD_FIELDS

    repeated = []
    for registry in METHOD_FIELDS.values():
        for name in registry.names():
            module = registry.get(name).module
            options = {o.name for o in registry.get(name).options}
            for fn_name, fn in inspect.getmembers(module, inspect.isfunction):
                if fn.__module__ != module.__name__:
                    continue
                for param in inspect.signature(fn).parameters.values():
                    if param.name in options and param.default is not inspect.Parameter.empty:
                        repeated.append(f"{module.__name__}.{fn_name}({param.name}=...)")
    assert not repeated, repeated


def test_the_headline_results_are_generated_from_committed_runs():
    """Every headline figure is computed from a JSON under benchmarks/results/ that names
    the command, commit and date of its run: an edited number, or a changed run, fails."""
    spec = importlib.util.spec_from_file_location(
        "make_results", ROOT / "scripts" / "make_results.py"
    )
    results = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(results)
    text = results.PAGE.read_text(encoding="utf-8")
    assert text == results.page(text), "docs/results.md is stale: run scripts/make_results.py"
    for name, _, _ in results.HEADLINE:
        run = json.loads((results.RESULTS / name).read_text(encoding="utf-8"))
        assert {"command", "commit"} <= run.keys(), name
        assert run["command"].startswith("python benchmarks/"), name
