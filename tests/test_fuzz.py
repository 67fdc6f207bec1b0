"""Hypothesis fuzzing of the command line's argument handling and of plan loading."""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from pathlib import Path
from unittest import mock

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prunella.cli import main
from prunella.errors import PrunellaError
from prunella.methods.plan import Budget, load_plan

text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12
)
number = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.integers(-(10**6), 10**6).map(str),
    text,
)


def valid_or(values: list[str], junk=number):
    """Mostly values that pass (so that a run goes on to the later checks), else junk."""
    return st.one_of(st.sampled_from(values), st.sampled_from(values), junk)


PLAN = str(Path(__file__).parent / "data" / "plan_llama3.json")  # the tiny Llama's, at 0.5
OPTIONS = {
    "--sparsity": valid_or(["0.3", "0.5", "0.9"]),
    "--pattern": st.one_of(
        text, st.sampled_from(["2:4", "4:2", "0:4", "1:1", "unstructured", "3:8", "2-4", " 2 : 4 "])
    ),
    "--nsamples": valid_or(["1", "3", "0"]),
    "--seqlen": valid_or(["16", "600", "5000"]),  # past the model's context of 512
    "--seed": valid_or(["0", "7"]),
    "--solver": valid_or(["wanda", "sparsegpt", "magnitude"], text),
    "--allocation": valid_or(["owl", "alphapruning", "uniform", "erk"], text),
    "--granularity": valid_or(["block", "layer"], text),
    "--min-sparsity": number,
    "--solver-opt": st.one_of(text, st.sampled_from(["blocksize=64", "percdamp=x", "damp"])),
    "--allocation-opt": st.one_of(
        text, st.sampled_from(["spread=0.1", "spread=7", "epsilon=0.2", "lam=0.1"])
    ),
    "--offload": valid_or(["none", "disk", "auto"], text),
    "--device": valid_or(["cpu", "auto", "cuda:7"], text),
    "--calib": valid_or(["sample", "sample-eval", "/no/such/text.txt"], text),
    "--allocation-file": valid_or([PLAN, "/no/such/plan.json"], text),
    "--bits": valid_or(["4", "8", "5"]),
}


def names_the_fault(line: str, options: dict[str, str]) -> bool:
    """Whether an error line names one of the options given (``--solver-opt``,
    ``solver``, ``solver_opt``) or one of their values (as given, or quoted: ``''``)."""
    for flag, value in options.items():
        name = flag.removeprefix("--")
        words = {name, name.replace("-", "_"), name.removesuffix("-opt"), repr(value)}
        if any(word in line for word in words) or (value.strip() and value.strip() in line):
            return True
    return False


class Compressing(Exception):
    """Raised where a run starts compressing: every check has passed by then."""


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(st.sampled_from(sorted(OPTIONS)), st.none(), min_size=1, max_size=5).flatmap(
        lambda keys: st.fixed_dictionaries({k: OPTIONS[k] for k in keys})
    )
)
def test_cli_bad_arguments_end_in_one_error_line(tiny_llama, options):
    """Whatever the values, the CLI ends with status 2 and exactly one 'error:' line that
    names an option or a value, never a traceback, and writes nothing; or every check
    passes, and the run starts compressing.

    MODEL is a real checkpoint and OUT a fresh folder, so every option reaches its
    validation, those after the output folder's included (the plan file, the context
    length, the weights, the calibration text, the allocation, ...). A valid combination
    is stopped where it starts compressing the blocks (compressing is tested elsewhere),
    which keeps each example under a second.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        argv = ["prune", str(tiny_llama), "--out", str(out), "--nsamples", "2", "--seqlen", "32"]
        for flag, value in options.items():
            argv += [flag, value]
        err = io.StringIO()
        with (
            contextlib.redirect_stderr(err),
            contextlib.redirect_stdout(io.StringIO()),
            mock.patch("prunella.pipeline.prune_blocks", side_effect=Compressing),
        ):
            try:
                code = main([*argv, "--quiet"])
            except Compressing:
                assert err.getvalue() == "" or "note: " in err.getvalue(), err.getvalue()
                return
        # a former option name (lam) is taken with a notice line: the one error line follows
        lines = [line for line in err.getvalue().splitlines() if not line.startswith("note: ")]
        assert code == 2, (argv, err.getvalue())
        assert len(lines) == 1 and lines[0].startswith("error: "), (argv, err.getvalue())
        assert names_the_fault(lines[0], options), (argv, lines[0])
        assert not out.exists() and not out.with_name(out.name + ".partial").exists()


LAYERS = {
    f"model.layers.{i}.{n}": shape
    for i in range(2)
    for n, shape in [("attn.q", (8, 8)), ("attn.k", (4, 8)), ("mlp.up", (16, 8))]
}
value = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-3, 3),
    text,
    st.none(),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
)


@settings(max_examples=200, deadline=None)
@given(
    sparsity=st.one_of(
        st.dictionaries(st.one_of(st.sampled_from(sorted(LAYERS)), text), value, max_size=8),
        st.fixed_dictionaries({k: st.floats(0, 0.99) for k in LAYERS}),
        value,
    ),
    target=st.one_of(st.none(), value),
    extra=st.dictionaries(
        st.one_of(text, st.sampled_from(["params", "metric", "nm", "metric_name", "method"])),
        st.one_of(value, st.dictionaries(st.sampled_from(sorted(LAYERS)), value, max_size=3)),
        max_size=3,
    ),
    asked=st.one_of(st.none(), st.floats(0, 0.99)),
)
def test_plan_loading_accepts_only_valid_plans(sparsity, target, extra, asked):
    data = {**extra, "sparsity": sparsity}
    if target is not None:
        data["target"] = target
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "plan.json"
        path.write_text(json.dumps(data))
        try:
            budgets = {"sparsity": Budget("sparsity", asked, asked)} if asked is not None else {}
            plan = load_plan(path, LAYERS, budgets)["sparsity"]
        except PrunellaError as exc:
            assert "\n" not in str(exc)
            return
    sizes = {n: r * c for n, (r, c) in LAYERS.items()}
    assert set(plan.values) == set(LAYERS)
    assert all(0 <= s < 1 for s in plan.values.values())
    assert set(plan.detail) <= {"nm", "rows"}
    pruned = sum(round(plan.values[n] * sizes[n]) for n in LAYERS)
    assert abs(pruned - plan.target * sum(sizes.values())) <= len(LAYERS)
