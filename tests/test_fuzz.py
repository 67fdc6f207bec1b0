"""Hypothesis fuzzing of the command line's argument handling and of plan loading."""

from __future__ import annotations

import contextlib
import io
import json
import math
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
        # a number for every layer, some out of range: the checks after the file's shape
        # (finite: NaN, Inf or 1e308 in a file without a target is a known crash, see
        # test_allocation.py::test_a_plan_without_target_with_a_nan_sparsity_is_one_error)
        st.fixed_dictionaries(
            {k: st.one_of(st.floats(0, 0.99), st.floats(-2, 2), st.integers(-3, 3)) for k in LAYERS}
        ),
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
        faults = plan_faults(json.loads(path.read_text()), asked)
        try:
            budgets = {"sparsity": Budget("sparsity", asked, asked)} if asked is not None else {}
            plan = load_plan(path, LAYERS, budgets)["sparsity"]
        except PrunellaError as exc:
            message = str(exc)
            assert "\n" not in message
            # the message names one fault the file really has (the field, layer or value)
            assert faults, f"a valid plan was rejected: {message} ({data!r})"
            assert any(all(part in message for part in fault) for fault in faults), (
                message,
                faults,
            )
            return
    assert not faults, f"a plan with faults was accepted: {faults} ({data!r})"
    sizes = {n: r * c for n, (r, c) in LAYERS.items()}
    assert set(plan.values) == set(LAYERS)
    assert all(0 <= s < 1 for s in plan.values.values())
    assert set(plan.detail) <= {"nm", "rows"}
    pruned = sum(round(plan.values[n] * sizes[n]) for n in LAYERS)
    assert abs(pruned - plan.target * sum(sizes.values())) <= len(LAYERS)


def plan_faults(data: dict, asked: float | None) -> list[tuple[str, ...]]:
    """What is wrong with the (legacy format) sparsity plan ``data`` for LAYERS, written
    from the plan format's rules independently of the loader: each fault is the pieces
    of text that a message naming it holds. Empty for a valid plan."""
    if data.get("format", "prunella-allocation/1") != "prunella-allocation/1":
        return [("format",)]
    values = data.get("sparsity")
    if not isinstance(values, dict):
        return [("'sparsity' mapping",)]
    faults = [("does not have", repr(n)) for n in set(values) - set(LAYERS)]
    faults += [("gives no sparsity", repr(n)) for n in set(LAYERS) - set(values)]
    faults += [
        (repr(n), "not a number")
        for n, v in values.items()
        if isinstance(v, bool) or not isinstance(v, int | float)
    ]
    faults += [
        (repr(k), "must be a mapping")
        for k in ("params", "metric")
        if data.get(k) is not None and not isinstance(data[k], dict)
    ]
    target = data.get("target")
    if target is not None and (isinstance(target, bool) or not isinstance(target, int | float)):
        faults.append(("target must be a number", repr(target)))
    if faults:  # the file's shape is wrong: no numbers to check yet
        return faults
    # the numbers: every fault found here may be the one the message names
    common = ("target", "method", "granularity", "params", "metric_name", "metric", "sparsity")
    detail = {k: v for k, v in data.items() if k not in common and v is not None}
    faults = [("unknown key", repr(k)) for k in set(detail) - {"nm", "rows"}]
    if target is not None and asked is not None and abs(target - asked) > 1e-9:
        faults.append(("but the recipe asks for", str(asked)))
    faults += [(repr(n), "must be in [0, 1)") for n, v in values.items() if not 0 <= v < 1]
    sizes = {n: r * c for n, (r, c) in LAYERS.items()}
    finite = all(math.isfinite(v * sizes[n]) for n, v in values.items())
    pruned = sum(round(values[n] * sizes[n]) for n in LAYERS) if finite else None
    if target is None:
        target = asked if asked is not None else (pruned / sum(sizes.values()) if finite else 0)
    if not 0 <= target < 1:
        faults.append(("target must be in [0, 1)",))
    faults += [(f"'{k}'",) for k in ("nm", "rows") if k in detail]  # never for every layer
    if finite and "nm" not in detail and abs(pruned - target * sum(sizes.values())) > len(LAYERS):
        faults.append(("not the target",))
    return faults
