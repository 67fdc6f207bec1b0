"""Allocation search: the level database, the KL fitness, EvoPress, TPE and DSA, resumes."""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import build_checkpoint
from postgres import fresh_database
from test_allocation import allocate

import prunella
from prunella.engine.adapters import get_weight
from prunella.engine.store import MemoryStore
from prunella.errors import PrunellaError
from prunella.io.models import load
from prunella.methods import AXES
from prunella.methods.allocation import ALLOCATIONS, dsa
from prunella.methods.allocation.evopress import mutate
from prunella.methods.allocation.run import AllocationRun
from prunella.methods.bits import bits_per_weight
from prunella.methods.search import levels_for_ratios, open_database, search_ladder, unit_levels
from prunella.methods.search.fitness import KLFitness
from prunella.methods.search.levels import LevelDatabase, make_ladder
from prunella.methods.sparsity.patterns import NM, Unstructured
from prunella.recipe import build
from prunella.report.evaluation import perplexity

CPU = torch.device("cpu")
SMALL = {"offspring": 6, "survivors": "3,1", "tokens": "64,128"}


@pytest.fixture(autouse=True)
def search_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PRUNELLA_HOME", str(tmp_path / "cache"))


def windows_for(model, count=6, seqlen=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (count, seqlen), generator=g)


def search_run(model, adapter, pattern, windows, granularity="block", solver="sparsegpt"):
    """The run object an EvoPress search of ``model`` gets (on the CPU, float32)."""
    target = (
        {"sparsity": pattern.sparsity}
        if isinstance(pattern, Unstructured)
        else {"pattern": str(pattern)}
    )
    recipe = build(**target, solver=solver, granularity=granularity, allocation="evopress")
    method = ALLOCATIONS.get("evopress")
    return AllocationRun(
        MemoryStore(model, adapter), windows, recipe, AXES, AXES.budgets(recipe), method,
        method.defaults(), CPU, torch.float32, 2, False,
    )  # fmt: skip


def ladder_and_database(run, levels: int = 4):
    ladder = search_ladder(run, levels)
    return ladder, open_database(run, ladder, Path(os.environ["PRUNELLA_HOME"]))[0]


def plan_of(path, method, pattern, options, granularity="block"):
    model, _, _, adapter = load(path)
    return allocate(
        model, adapter, method, pattern, windows=windows_for(model), options=options,
        granularity=granularity, batch_size=2, solver="sparsegpt",
    )  # fmt: skip


# --- the ladder -------------------------------------------------------------------


def test_ladder_steps_are_one_weight_count_for_every_layer():
    sizes = {"a": 4096, "b": 1024, "c": 16384}
    ladder = make_ladder(sizes, Unstructured(0.7), hidden_size=64, num_levels=8)
    assert ladder.step == dict.fromkeys(sizes, int(0.5 * 0.3 / 8 * 64**2))
    for name, size in sizes.items():
        assert ladder.pruned(name, 0) == round(0.7 * size)
        assert ladder.sparsity(name, ladder.low[name]) >= 0
        assert ladder.sparsity(name, ladder.high[name]) <= 0.99
        assert -8 <= ladder.low[name] <= 0 <= ladder.high[name] <= 8
    assert ladder.high["b"] < ladder.high["c"]  # a small layer has fewer levels up


def test_nm_ladder_levels_are_patterns_of_the_same_m():
    ladder = make_ladder({"a": 64 * 8, "b": 32 * 8}, NM(4, 8), hidden_size=8)
    assert [str(ladder.pattern("a", lv)) for lv in ladder.levels("a")] == [
        f"{n}:8" for n in range(7, 0, -1)
    ]
    assert ladder.sparsity("a", 2) == pytest.approx(1 - 2 / 8)


def test_level_switch_mutation_keeps_the_budget_exactly():
    import random

    sizes = {f"l{i}": s for i, s in enumerate([4096, 1024, 16384, 4096, 2048])}
    ladder = make_ladder(sizes, Unstructured(0.6), hidden_size=32)
    units = {n: [n] for n in sizes}
    ranges = unit_levels(ladder, units)
    rng = random.Random(0)
    levels = dict.fromkeys(sizes, 0)
    budget = sum(ladder.pruned(n, 0) for n in sizes)
    moved = 0
    for _ in range(200):
        levels = mutate(levels, ranges, rng)
        assert sum(ladder.pruned(n, levels[n]) for n in sizes) == budget
        assert all(ladder.low[n] <= levels[n] <= ladder.high[n] for n in sizes)
        moved += any(levels.values())
    assert moved > 0


def test_levels_for_ratios_keeps_the_budget_and_follows_the_wish():
    sizes = {f"b{b}.{k}": s for b in range(4) for k, s in (("q", 4096), ("mlp", 16384))}
    ladder = make_ladder(sizes, Unstructured(0.5), hidden_size=64)
    units = {f"b{b}": [f"b{b}.q", f"b{b}.mlp"] for b in range(4)}
    wish = {"b0": 0.40, "b1": 0.45, "b2": 0.55, "b3": 0.60}
    levels = levels_for_ratios(ladder, units, wish)
    assert sum(ladder.pruned(n, levels[n]) for n in sizes) == sum(
        ladder.pruned(n, 0) for n in sizes
    )
    block = [
        sum(ladder.pruned(n, levels[n]) for n in units[u]) / sum(sizes[n] for n in units[u])
        for u in units
    ]
    assert block == sorted(block) and block[0] < 0.5 < block[-1]


# --- the database and the fitness ------------------------------------------------------


def test_database_levels_are_the_solver_at_each_level_and_are_reused(tiny_llama):
    model, _, _, adapter = load(tiny_llama)
    run = search_run(model, adapter, Unstructured(0.5), windows_for(model))
    ladder = search_ladder(run, 4)
    folder = Path(os.environ["PRUNELLA_HOME"])
    database, key = open_database(run, ladder, folder)
    name = ladder.names[0]
    for level in ladder.levels(name):
        w = database.weight(name, level)
        assert (w == 0).sum().item() == ladder.pruned(name, level)
    stamp = {p: p.stat().st_mtime_ns for p in (database.folder / "layers").iterdir()}
    # a crash during a build: one layer missing and not marked complete
    (database.folder / "complete").unlink()
    lost = database.folder / "layers" / f"{ladder.names[-1]}.safetensors"
    lost.unlink()
    again, key2 = open_database(run, ladder, folder)
    assert key2 == key and lost.exists()
    kept = {p: p.stat().st_mtime_ns for p in (again.folder / "layers").iterdir() if p != lost}
    assert kept == {p: t for p, t in stamp.items() if p != lost}  # only the lost one rebuilt
    assert torch.equal(again.weight(name, 1), database.weight(name, 1))


@pytest.mark.parametrize("family", ["llama", "bloom", "falcon", "gpt2", "qwen3_moe", "gpt_oss"])
def test_kl_fitness_equals_the_kl_of_the_stitched_model(family, tmp_path, tokenizer_dir):
    # Bloom and Falcon blocks return tuples, GPT-2's layers are Conv1D; the MoE models'
    # expert matrices are views into fused parameters (gpt-oss: interleaved, transposed)
    model, _, _, adapter = load(build_checkpoint(tmp_path / family, family, tokenizer_dir))
    windows = windows_for(model)
    run = search_run(model, adapter, Unstructured(0.6), windows)
    _, database = ladder_and_database(run)
    ladder = database.ladder
    levels = {n: (i % 3) - 1 for i, n in enumerate(ladder.names)}
    levels = {n: max(ladder.low[n], min(ladder.high[n], v)) for n, v in levels.items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fitness = KLFitness(run.store, windows, database, device=CPU, dtype=torch.float32,
                        batch_size=2)  # fmt: skip
    ids = [1, 3, 4]
    value = fitness(levels, ids)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
    stitched = copy.deepcopy(model)
    for i, block in enumerate(adapter.blocks(stitched)):
        for local, layer in adapter.linears(block).items():
            name = f"{adapter.blocks_path}.{i}.{local}"
            get_weight(layer).data.copy_(database.weight(name, levels[name]))
    direct = perplexity(stitched, windows[ids], reference=model, progress=False)
    assert value == pytest.approx(direct["kl_to_reference"], rel=1e-4)
    assert value > 0
    assert fitness(dict.fromkeys(ladder.names, 0), ids) > 0


# --- the methods ------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["block", "layer"])
def test_evopress_is_seeded_and_exact_to_the_budget(tiny_llama, granularity, tmp_path):
    options = SMALL | {"evaluations": 30, "seed": 3}
    a = plan_of(tiny_llama, "evopress", Unstructured(0.6), options, granularity)
    b = plan_of(tiny_llama, "evopress", Unstructured(0.6),
                options | {"folder": str(tmp_path / "other")}, granularity)  # fmt: skip
    assert a.values == b.values  # a fresh storage, the same search
    sizes = {n: r * c for n, (r, c) in load(tiny_llama)[3].layers(load(tiny_llama)[0]).items()}
    pruned = sum(a.values[n] * sizes[n] for n in sizes)
    assert abs(pruned - 0.6 * sum(sizes.values())) <= len(sizes)
    assert len(set(a.values.values())) > 1  # it moved away from uniform
    search = a.params["search"]
    assert search["evaluations"] >= 30
    assert search["curve"] and all(kl >= 0 for _, kl in search["curve"])
    # best fitness per generation is the parent's, which elitism keeps
    assert search["best_kl"] == search["curve"][-1][1]


def test_a_search_gives_each_expert_one_sparsity(tmp_path, tokenizer_dir):
    moe = build_checkpoint(tmp_path / "moe", "qwen3_moe", tokenizer_dir)
    plan = plan_of(moe, "evopress", Unstructured(0.6), SMALL | {"evaluations": 12}, "expert")
    model, _, _, adapter = load(moe)
    sizes = {n: r * c for n, (r, c) in adapter.layers(model).items()}
    assert abs(sum(plan.values[n] * sizes[n] for n in sizes) - 0.6 * sum(sizes.values())) <= len(
        sizes
    )
    experts = {n.rsplit(".", 1)[0] for n in sizes if ".experts." in n}
    assert len(experts) == 3 * 4
    for expert in experts:
        values = [plan.values[f"{expert}.{p}"] for p in ("gate_proj", "up_proj", "down_proj")]
        assert max(values) - min(values) < 0.05  # one ladder level per unit, to whole weights


def test_evopress_mixes_nm_levels(tiny_llama):
    plan = plan_of(tiny_llama, "evopress", NM(4, 8), SMALL | {"evaluations": 30}, "layer")
    nm = plan.detail["nm"]
    assert all(m == 8 for _, m in nm.values()) and len({n for n, _ in nm.values()}) > 1
    model, _, _, adapter = load(tiny_llama)
    sizes = {n: r * c for n, (r, c) in adapter.layers(model).items()}
    mean = sum(plan.values[n] * sizes[n] for n in sizes) / sum(sizes.values())
    assert mean == pytest.approx(0.5, abs=1e-9)


def test_tpe_is_seeded_and_starts_from_uniform(tiny_llama, tmp_path):
    options = {"evaluations": 8, "tokens": 64, "startup": 3, "seed": 1}
    a = plan_of(tiny_llama, "tpe", Unstructured(0.6), options)
    b = plan_of(tiny_llama, "tpe", Unstructured(0.6), options | {"folder": str(tmp_path / "b")})
    assert a.values == b.values
    search = a.params["search"]
    curve = search["curve"]
    assert len(curve) >= 8 and [kl for _, kl in curve] == sorted((kl for _, kl in curve),
                                                                    reverse=True)  # fmt: skip
    # the first candidate evaluated is the uniform plan: every block at the target, every
    # layer pruned round(0.6 x its weights)
    import optuna

    study = optuna.load_study(study_name=search["study"], storage=search["storage"])
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.datetime_start)
    first = trials[0]
    assert first.number == 0 and len(trials) == search["evaluations"]
    assert first.params == {f"model.layers.{i}": 0.6 for i in range(3)}
    ladder = LevelDatabase(search["database"]).ladder
    values, _ = ladder.assignment(dict(zip(ladder.names, first.user_attrs["levels"], strict=True)))
    model, _, _, adapter = load(tiny_llama)
    sizes = {n: r * c for n, (r, c) in adapter.layers(model).items()}
    assert values == {n: round(0.6 * size) / size for n, size in sizes.items()}
    assert curve[0] == [1, first.value]  # the curve starts from the uniform plan's KL
    assert search["best_kl"] == min(t.value for t in trials) <= first.value


def test_dsa_formula_grammar_and_value():
    assert dsa.parse_formula("W:(ABSLOG)-(VAR)-(ATAN,ASIN)-(7)") == (
        ("ABSLOG",),
        "VAR",
        ("ATAN", "ASIN"),
    )
    assert dsa.formula_text(*dsa.parse_formula("W:()-(mean)-(no_op)")) == "W:(NO_OP)-(MEAN)-(NO_OP)"
    with pytest.raises(ValueError, match="unknown operation 'SQRTX'"):
        dsa.parse_formula("W:(SQRTX)-(VAR)-(ATAN)")
    x = torch.rand(1000) + 0.1
    expected = torch.log(x.double()).var().item()
    expected = __import__("math").asin(__import__("math").atan(expected))
    assert dsa.dsa_value(dsa.parse_formula(dsa.PUBLISHED), x, 1000) == pytest.approx(expected)
    # a value outside asin's domain counts as 0, as in the reference
    assert dsa.dsa_value((("NO_OP",), "MEAN", ("ASIN",)), torch.full((10,), 5.0), 10) == 0.0
    s = dsa.dsa_ratios(torch.tensor([0.2, 0.5, 1.0, 0.9]), 0.7, spread=0.08)
    assert s.mean().item() == pytest.approx(0.7)
    assert (s.max() - s.min()).item() == pytest.approx(0.16)
    assert s.argmax().item() == 2  # a higher value is pruned more


def test_dsa_searches_a_formula_and_validates_it_on_held_out_windows(tiny_llama):
    options = {"evaluations": 16, "population": 4, "tokens": 64, "seed": 0}
    plan = plan_of(tiny_llama, "dsa", Unstructured(0.6), options)
    formula = plan.params["formula"]
    dsa.parse_formula(formula)
    search = plan.params["search"]
    assert search["held_out_windows"] >= 1
    assert search["held_out_kl"] > 0 and search["held_out_kl_uniform"] > 0
    # the formula found, applied without a search, gives the same plan
    again = plan_of(tiny_llama, "dsa", Unstructured(0.6), {"formula": formula})
    assert again.values == plan.values


def test_a_search_needs_calibration_windows(tiny_llama):
    model, _, _, adapter = load(tiny_llama)
    with pytest.raises(PrunellaError, match="needs calibration data"):
        search_run(model, adapter, Unstructured(0.5), None)


def test_bad_storage_is_one_line(tiny_llama):
    with pytest.raises(PrunellaError, match="cannot open search storage"):
        plan_of(tiny_llama, "evopress", Unstructured(0.5),
                SMALL | {"evaluations": 5, "storage": "nosuchdb://x"})  # fmt: skip


def test_heartbeat_settings_come_from_the_environment(monkeypatch):
    from prunella.methods.search.study import heartbeat_settings

    monkeypatch.delenv("PRUNELLA_SEARCH_HEARTBEAT", raising=False)
    monkeypatch.delenv("PRUNELLA_SEARCH_GRACE", raising=False)
    assert heartbeat_settings() == (2, 20)
    monkeypatch.setenv("PRUNELLA_SEARCH_HEARTBEAT", "1")
    monkeypatch.setenv("PRUNELLA_SEARCH_GRACE", "3")
    assert heartbeat_settings() == (1, 3)
    monkeypatch.setenv("PRUNELLA_SEARCH_GRACE", "1")
    with pytest.raises(PrunellaError, match="must be longer than"):
        heartbeat_settings()
    monkeypatch.setenv("PRUNELLA_SEARCH_GRACE", "0.5")
    with pytest.raises(PrunellaError, match="whole number of seconds"):
        heartbeat_settings()


# --- processes: a killed search resumes; workers on PostgreSQL -----------------------------


def allocate_command(model, out_json, storage=None, evaluations=60, extra=()):
    command = [
        sys.executable, "-m", "prunella", "allocate", str(model), "--sparsity", "0.6",
        "--allocation", "evopress", "--granularity", "layer", "--nsamples", "6",
        "--seqlen", "32", "--quiet", "--json", str(out_json),
        "--allocation-opt", f"evaluations={evaluations}",
        "--allocation-opt", "offspring=6", "--allocation-opt", "survivors=3,1",
        "--allocation-opt", "tokens=64,128", *extra,
    ]  # fmt: skip
    if storage:
        command += ["--allocation-opt", f"storage={storage}"]
    return command


def complete_trials(db: Path) -> int:
    if not db.exists():
        return 0
    with sqlite3.connect(db) as con:
        try:
            return con.execute("select count(*) from trials where state='COMPLETE'").fetchone()[0]
        except sqlite3.OperationalError:
            return 0


def test_a_sigkilled_search_resumes_to_the_same_plan(tiny_llama, tmp_path):
    env = dict(os.environ, PRUNELLA_HOME=str(tmp_path / "killed"))
    db = tmp_path / "killed" / "search" / "studies.db"
    victim = subprocess.Popen(allocate_command(tiny_llama, tmp_path / "a.json"), env=env)
    deadline = time.monotonic() + 120
    while complete_trials(db) < 20 and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert victim.poll() is None, "the search ended before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    done_before = complete_trials(db)
    assert 20 <= done_before < 60 and not (tmp_path / "a.json").exists()
    subprocess.run(allocate_command(tiny_llama, tmp_path / "a.json"), env=env, check=True)
    assert complete_trials(db) >= 60
    # a search never killed gives the same plan
    clean = dict(os.environ, PRUNELLA_HOME=str(tmp_path / "clean"))
    subprocess.run(allocate_command(tiny_llama, tmp_path / "b.json"), env=clean, check=True)
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a["axes"]["sparsity"]["sparsity"] == b["axes"]["sparsity"]["sparsity"]


def search_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a search's processes in these tests: their own cache, a heartbeat
    every second and a 3 s grace period (a killed worker's trial fails within seconds), and
    one torch thread each, so that every process computes a candidate's fitness alike,
    bit for bit."""
    return dict(os.environ, PRUNELLA_HOME=str(tmp_path / "cache"), OMP_NUM_THREADS="1",
                PRUNELLA_SEARCH_HEARTBEAT="1", PRUNELLA_SEARCH_GRACE="3")  # fmt: skip


def wait_for_study(url: str, deadline: float):
    """The one study in ``url``, once the search has written its setup (workers read it)."""
    import optuna

    storage = optuna.storages.RDBStorage(url)
    while time.monotonic() < deadline:
        summaries = optuna.get_all_study_summaries(storage)
        if summaries and "setup" in summaries[0].user_attrs:
            return optuna.load_study(study_name=summaries[0].study_name, storage=storage)
        time.sleep(0.2)
    raise AssertionError("the search made no study in time")


# A search-worker process with its slow imports (torch, transformers: seconds on a busy
# machine) done before it is needed: it waits for its arguments on stdin, then runs
# ``prunella search-worker`` as the command line does.
WARM_WORKER = """
import sys
import transformers
from prunella.cli import main
from prunella.methods.search import study
sys.exit(main(["search-worker", *sys.stdin.readline().split()]))
"""


class Workers:
    """``prunella search-worker`` processes, ``ahead`` of them started before the study
    exists and, with ``spare``, one more kept ready after each start: a worker joins the
    study about as soon as it is started, so the test's seconds go to the search."""

    def __init__(self, env: dict[str, str], ahead: int, spare: bool = False) -> None:
        self.env, self.spare = env, spare
        self.ready = [self._warm() for _ in range(ahead)]
        self.started: list[subprocess.Popen] = []

    def _warm(self) -> subprocess.Popen:
        command = [sys.executable, "-c", WARM_WORKER]
        pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE}
        return subprocess.Popen(command, env=self.env, text=True, **pipes)

    def start(self, url: str, name: str) -> subprocess.Popen:
        worker = self.ready.pop(0) if self.ready else self._warm()
        if self.spare and not self.ready:
            self.ready.append(self._warm())
        worker.stdin.write(f"--storage {url} --study {name}\n")
        worker.stdin.close()
        worker.stdin = None  # closed: communicate() must not flush it
        self.started.append(worker)
        return worker

    def close(self, *others: subprocess.Popen | None) -> None:
        """Kill what is still running: a failed test's workers and ``others`` (its search),
        the unused spares."""
        for worker in self.started + self.ready + [p for p in others if p is not None]:
            if worker.poll() is None:
                worker.kill()
            worker.wait()
            if worker.stdout is not None:
                worker.stdout.close()


def kill_mid_trial(study, workers: list[subprocess.Popen], deadline: float, rng=None):
    """SIGKILL one of ``workers`` while it evaluates a candidate: wait until one of them has
    a running trial with a candidate's ``key`` (its ``worker`` user attribute is
    ``host:pid``), freeze it (SIGSTOP), make sure the trial still runs, then kill it.
    Returns the worker's index and the trial as it was when killed, or None if none ran a
    candidate before ``deadline``."""
    from optuna.trial import TrialState

    owner = {f"{socket.gethostname()}:{w.pid}": i for i, w in enumerate(workers)}
    while time.monotonic() < deadline:
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if rng is not None:
            rng.shuffle(running)
        for trial in running:
            i = owner.get(trial.user_attrs.get("worker"))
            if i is None or workers[i].poll() is not None or "key" not in trial.user_attrs:
                continue  # not ours, or a trial that raced for a candidate another took
            os.kill(workers[i].pid, signal.SIGSTOP)
            time.sleep(0.3)  # a result already sent to the server lands
            frozen = study._storage.get_trial(trial._trial_id)
            if frozen.state == TrialState.RUNNING:
                workers[i].kill()
                workers[i].wait()
                return i, frozen
            os.kill(workers[i].pid, signal.SIGCONT)  # it had just finished: try again
        time.sleep(0.02)
    return None


def sparsity_plan(path: Path) -> dict:
    return json.loads(path.read_text())["axes"]["sparsity"]


def test_a_worker_killed_mid_trial_loses_only_its_candidate(tiny_llama, tmp_path, postgres_url):
    from optuna.trial import TrialState

    url = fresh_database(postgres_url, "killed_worker")
    env = search_env(tmp_path)
    out = tmp_path / "plan.json"
    evaluations = 120
    pool = Workers(env, ahead=2)
    coordinator = subprocess.Popen(
        allocate_command(tiny_llama, out, url, evaluations=evaluations), env=env
    )
    try:
        deadline = time.monotonic() + 180
        study = wait_for_study(url, deadline)
        workers = [pool.start(url, study.study_name) for _ in range(2)]
        killed = kill_mid_trial(study, workers[1:], deadline)
        assert killed is not None, "the second worker ran no trial while the search lasted"
        victim = killed[1]
        assert coordinator.wait(timeout=300) == 0
        out_text, _ = workers[0].communicate(timeout=60)
        assert "evaluated" in out_text  # the other worker ended with the search
    finally:
        pool.close(coordinator)
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    # optuna's heartbeat found the killed worker's trial stale and failed it ...
    assert trials[victim.number].state == TrialState.FAIL
    # ... and its candidate was enqueued again and evaluated by a live process
    key = victim.user_attrs["key"]
    later = [t for n, t in trials.items() if n > victim.number and t.user_attrs.get("key") == key]
    done = [t for t in later if t.state == TrialState.COMPLETE]
    assert done and done[0].user_attrs["worker"] != victim.user_attrs["worker"]
    owners = {t.user_attrs.get("worker", "").split(":")[-1] for t in trials.values()
              if t.state == TrialState.COMPLETE}  # fmt: skip
    assert {str(coordinator.pid), str(workers[0].pid)} <= owners  # both joined the study
    plan = sparsity_plan(out)
    assert plan["params"]["search"]["evaluations"] >= evaluations
    assert plan["params"]["search"]["storage"].startswith("postgresql")
    # a search never killed, in one process (SQLite), finds the same plan
    subprocess.run(allocate_command(tiny_llama, tmp_path / "clean.json", evaluations=evaluations),
                   env=env, check=True)  # fmt: skip
    clean = sparsity_plan(tmp_path / "clean.json")
    assert clean["params"]["search"]["evaluations"] == plan["params"]["search"]["evaluations"]
    assert clean["sparsity"] == plan["sparsity"]


@pytest.mark.slow
def test_chaos_workers_killed_and_restarted_lose_no_candidate(tiny_llama, tmp_path, postgres_url):
    """A search in one process, never killed, for ``PRUNELLA_CHAOS_SECONDS`` (15); then the
    same search (seed, evaluations) on PostgreSQL with four workers, one of them SIGKILLed
    mid-trial and a new one started every ``PRUNELLA_CHAOS_PERIOD`` seconds (3) or so, until
    it ends (about as long again: the same evaluations, whatever the machine's load). No
    candidate may be lost, and the plan must be the first one's. Longer by hand:
    ``PRUNELLA_CHAOS_SECONDS=60 python -m pytest tests/test_search.py -k chaos -s``."""
    from optuna.trial import TrialState

    seconds = float(os.environ.get("PRUNELLA_CHAOS_SECONDS", "15"))
    period = float(os.environ.get("PRUNELLA_CHAOS_PERIOD", "3"))
    url = fresh_database(postgres_url, "chaos")
    env = search_env(tmp_path)
    pool = Workers(env, ahead=4, spare=True)  # their imports run beside the first search
    coordinator = None
    try:
        clean = tmp_path / "clean.json"
        budget = ("--allocation-opt", f"minutes={seconds / 60}")
        began = time.monotonic()
        subprocess.run(allocate_command(tiny_llama, clean, evaluations=0, extra=budget),
                       env=env, check=True)  # fmt: skip
        clean_wall = time.monotonic() - began
        evaluations = sparsity_plan(clean)["params"]["search"]["evaluations"]

        out = tmp_path / "plan.json"
        budget = ("--allocation-opt", f"minutes={max(20, seconds / 6)}")  # ample
        began = time.monotonic()
        coordinator = subprocess.Popen(
            allocate_command(tiny_llama, out, url, evaluations=evaluations, extra=budget), env=env
        )
        study = wait_for_study(url, time.monotonic() + 180)
        workers = [pool.start(url, study.study_name) for _ in range(4)]
        kills, rng = [], random.Random(0)
        while coordinator.poll() is None:
            assert time.monotonic() - began < 10 * seconds + 600, "the search did not end"
            time.sleep(period)
            killed = kill_mid_trial(study, workers, time.monotonic() + period, rng)
            if killed is not None:
                i, trial = killed
                kills.append(trial)
                workers[i] = pool.start(url, study.study_name)
        assert coordinator.returncode == 0
        for worker in workers:
            worker.communicate(timeout=120)  # every worker ends with the search
        wall, started = time.monotonic() - began, len(pool.started)
    finally:
        pool.close(coordinator)

    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    states: dict[str, list] = {}
    for t in trials.values():
        if "key" in t.user_attrs:
            states.setdefault(t.user_attrs["key"], []).append(t.state)
    lost = [key for key, s in states.items() if TrialState.COMPLETE not in s]
    retried = {key for key, s in states.items() if TrialState.FAIL in s}
    count = {s: sum(t.state == s for t in trials.values()) for s in TrialState}
    owners = {t.user_attrs["worker"] for t in trials.values() if t.state == TrialState.COMPLETE}
    print(
        f"\nchaos run: {evaluations} evaluations, {clean_wall:.0f} s in one process, never "
        f"killed; {wall:.0f} s with {started} workers started, {len(kills)} killed mid-trial; "
        f"{len(trials)} trials: {count[TrialState.COMPLETE]} complete, "
        f"{count[TrialState.FAIL]} failed, {count[TrialState.PRUNED]} pruned (raced for a "
        f"candidate another took); {len(owners)} processes completed trials; "
        f"{len(states)} candidates, {len(retried)} retried, {len(lost)} lost"
    )
    assert not lost, f"candidates never evaluated: {lost}"
    assert len(kills) >= 2
    assert all(trials[t.number].state == TrialState.FAIL for t in kills)
    assert {t.user_attrs["key"] for t in kills} <= retried
    plan = sparsity_plan(out)
    assert plan["params"]["search"]["evaluations"] == evaluations
    assert plan["sparsity"] == sparsity_plan(clean)["sparsity"]


def test_prune_with_a_search_reports_its_curve(tiny_llama, tmp_path):
    from prunella.cli import main

    out = tmp_path / "out"
    code = main([
        "prune", str(tiny_llama), "--out", str(out), "--sparsity", "0.6", "--allocation",
        "evopress", "--allocation-opt", "evaluations=12", "--allocation-opt", "offspring=4",
        "--allocation-opt", "survivors=2,1", "--allocation-opt", "tokens=64,128",
        "--nsamples", "6", "--seqlen", "32", "--quiet",
    ])  # fmt: skip
    assert code == 0
    report = json.loads((out / "prune_report.json").read_text())
    search = report["plan"]["axes"]["sparsity"]["params"]["search"]
    assert search["evaluations"] >= 12 and search["curve"]
    assert report["sparsity"] == pytest.approx(0.6, abs=1e-4)
    html = (out / "report.html").read_text()
    assert "<h2>Search</h2>" in html and "best KL on calibration tokens" in html
    recipe = (out / "recipe.yaml").read_text()
    assert "evopress" in recipe


def test_kl_fitness_streams_blocks_from_disk_with_the_same_value(tiny_llama):
    from prunella.engine.store import StreamedStore, open_store

    model, _, _, adapter = load(tiny_llama)
    windows = windows_for(model)
    run = search_run(model, adapter, Unstructured(0.6), windows)
    _, database = ladder_and_database(run)
    levels = {n: database.ladder.high[n] for n in database.ladder.names}
    in_memory = KLFitness(run.store, windows, database, device=CPU, dtype=torch.float32,
                          batch_size=2)(levels, [0, 2])  # fmt: skip
    streamed, _ = open_store(tiny_llama, "disk")
    assert isinstance(streamed, StreamedStore)
    (database.folder / "dense").rename(database.folder / "dense-memory")  # recompute it
    on_disk = KLFitness(streamed, windows, database, device=CPU, dtype=torch.float32,
                        batch_size=2)(levels, [0, 2])  # fmt: skip
    assert on_disk == pytest.approx(in_memory, rel=1e-5)
    assert all(p.is_meta for p in streamed.blocks().parameters())  # blocks released again


# --- bit widths (--bits B --allocation evopress|tpe|dsa) ---------------------------------


def bits_run(model, adapter, windows, bits=3.0, quantizer="rtn", method="evopress", **extra):
    """The run object a search of widths averaging ``bits`` gets (group 32)."""
    recipe = build(bits=bits, quantizer=quantizer, group_size=32, allocation=method, **extra)
    chosen = ALLOCATIONS.get(method)
    return AllocationRun(
        MemoryStore(model, adapter), windows, recipe, AXES, AXES.budgets(recipe), chosen,
        chosen.defaults(), CPU, torch.float32, 2, False,
    )  # fmt: skip


def widths_average(values: dict, shapes: dict, group: int = 32) -> float:
    sizes = {n: r * c for n, (r, c) in shapes.items()}
    total = sum(bits_per_weight(int(values[n]), group, True) * sizes[n] for n in sizes)
    return total / sum(sizes.values())


def test_width_ladder_levels_are_the_quantizer_at_each_width(tiny_llama):
    """Every width is a level; level 0 is the fitter's mix at equal ratios, within the
    average; each level in the database is the quantizer on that width's grid."""
    from prunella.methods.bits.grid import Grid
    from prunella.methods.bits.rtn import quantize

    model, _, _, adapter = load(tiny_llama)
    run = bits_run(model, adapter, windows_for(model), bits=3.0)
    ladder, database = ladder_and_database(run)
    assert ladder.kind == "widths" and ladder.widths == [2, 3, 4, 8]
    shapes = adapter.layers(model)
    start, _ = ladder.assignment(dict.fromkeys(ladder.names, 0))
    assert set(start.values()) == {2.0, 3.0}  # 3 bits cost 3.5 at group 32: a mix
    assert 3.0 - 0.5 < widths_average(start, shapes) <= 3.0
    name = ladder.names[0]
    weights = {
        f"{adapter.blocks_path}.{i}.{local}": get_weight(layer)
        for i, block in enumerate(adapter.blocks(model))
        for local, layer in adapter.linears(block).items()
    }
    weight = weights[name]
    for level, bits in zip(ladder.levels(name), [2, 3, 4, 8], strict=True):
        expected = quantize(weight.detach().float(), Grid(bits, 32), observer="minmax")[0]
        assert torch.equal(database.weight(name, level), expected.to(weight.dtype)), bits
    assert isinstance(LevelDatabase(database.folder).ladder, type(ladder))  # as workers read it
    # another average starts elsewhere and shares the database: its tensors are by width
    other, again = ladder_and_database(bits_run(model, adapter, windows_for(model), bits=3.8))
    assert again.folder == database.folder and other.start != ladder.start
    for n in ladder.names:
        for level in other.levels(n):
            width = other.width(n, level)
            same = level + other.start[n] - ladder.start[n]
            assert torch.equal(again.weight(n, level), database.weight(n, same)), (n, width)


def test_width_mutation_stays_within_the_average():
    from prunella.methods.allocation.evopress import mutate_widths
    from prunella.methods.search.levels import WidthLadder

    sizes = {f"l{i}": (64 if i % 3 else 192) * 64 for i in range(12)}
    ladder = WidthLadder(target=1 - 3.2 / 16, average=3.2, widths=[2, 3, 4, 8], size=sizes,
                         group=dict.fromkeys(sizes, 64), start=dict.fromkeys(sizes, 1))  # fmt: skip
    units = {n: [n] for n in sizes}
    ranges = unit_levels(ladder, units)
    rng = random.Random(0)
    parent, moved = dict.fromkeys(sizes, 0), 0
    for _ in range(300):
        child = mutate_widths(parent, ranges, ladder.cost, ladder.total, rng)
        if child is None:
            continue
        spent = sum(ladder.cost(n, v) for n, v in child.items())
        assert spent <= ladder.total * (1 + 1e-12)
        assert all(ranges[n][0] <= v <= ranges[n][1] for n, v in child.items())
        assert sum(child[n] != parent[n] for n in sizes) <= 10
        moved += child != parent
        parent = child
    assert moved > 50  # it does move
    assert len({ladder.width(n, v) for n, v in parent.items()}) > 2


@pytest.mark.parametrize("method", ["evopress", "tpe", "dsa"])
def test_a_search_over_widths_meets_the_average(tiny_llama, method):
    """``--bits 3 --allocation METHOD``: widths of the bits axis, mixed, at most 3 bits
    per weight with the scales counted, and the search's curve in the plan."""
    model, _, _, adapter = load(tiny_llama)
    options = {
        "evopress": SMALL | {"evaluations": 20},
        "tpe": {"evaluations": 8, "tokens": 64, "startup": 3},
        "dsa": {"evaluations": 8, "population": 4, "tokens": 64},
    }[method]
    plan = prunella.allocate(
        model, calibration=windows_for(model), bits=3.0, quantizer="gptq", group_size=32,
        allocation={"name": method, "options": options}, device="cpu",
        compute_dtype="float32", progress=False, batch_size=2,
    )["bits"]  # fmt: skip
    shapes = adapter.layers(model)
    assert set(plan.values.values()) <= {2.0, 3.0, 4.0, 8.0}
    assert len(set(plan.values.values())) > 1
    assert widths_average(plan.values, shapes) <= 3.0 + 1e-12
    assert plan.detail["group"] == dict.fromkeys(shapes, 32)
    search = plan.params.get("search") or plan.params["facts"]["search"]
    assert search["evaluations"] >= options["evaluations"] and search["curve"]


def test_a_width_search_with_sparsity_is_one_line(tiny_llama, tmp_path, capsys):
    from prunella.cli import main

    out = tmp_path / "out"
    code = main(["prune", str(tiny_llama), "--out", str(out), "--sparsity", "0.5", "--bits",
                 "3", "--allocation", "evopress", "--nsamples", "6", "--seqlen", "32",
                 "--quiet"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1, err
    assert "allocates one axis at a time; the recipe asks for sparsity, bits" in err
    assert not out.exists()
