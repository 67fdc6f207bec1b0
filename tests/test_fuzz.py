"""Hypothesis fuzzing of the command line's argument handling and of plan loading."""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
from pathlib import Path

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
OPTIONS = {
    "--sparsity": number,
    "--pattern": st.one_of(
        text, st.sampled_from(["2:4", "4:2", "0:4", "1:1", "unstructured", "3:8", "2-4", " 2 : 4 "])
    ),
    "--nsamples": number,
    "--seqlen": number,
    "--seed": number,
    "--solver": st.one_of(text, st.sampled_from(["wanda", "sparsegpt"])),
    "--allocation": st.one_of(text, st.sampled_from(["owl", "alphapruning", "uniform"])),
    "--granularity": text,
    "--min-sparsity": number,
    "--solver-opt": st.one_of(text, st.sampled_from(["blocksize=64", "percdamp=x", "damp"])),
    "--allocation-opt": st.one_of(
        text, st.sampled_from(["spread=0.1", "spread=7", "epsilon=0.2", "lam=0.1"])
    ),
    "--offload": text,
    "--device": text,
    "--calib": text,
}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(st.sampled_from(sorted(OPTIONS)), st.none(), max_size=6).flatmap(
        lambda keys: st.fixed_dictionaries({k: OPTIONS[k] for k in keys})
    )
)
def test_cli_bad_arguments_end_in_one_error_line(tiny_llama, options):
    """Whatever the values, the CLI ends with status 2 and exactly one 'error:' line, never
    a traceback, and writes nothing.

    MODEL is a real checkpoint, so every option reaches its validation; the output
    folder is not empty (and --overwrite is not given), so even a fully valid
    combination stops there, before any weight is read.
    """
    out = Path(tempfile.gettempdir()) / "prunella-fuzz-out"
    out.mkdir(exist_ok=True)
    (out / "keep.txt").write_text("precious")
    argv = ["prune", str(tiny_llama), "--out", str(out)]
    for flag, value in options.items():
        argv += [flag, value]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    # a former option name (lam) is taken with a notice line: the one error line follows
    lines = [line for line in err.getvalue().splitlines() if not line.startswith("note: ")]
    assert code == 2, (argv, err.getvalue())
    assert len(lines) == 1 and lines[0].startswith("error: "), (argv, err.getvalue())
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert not out.with_name(out.name + ".partial").exists()


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
