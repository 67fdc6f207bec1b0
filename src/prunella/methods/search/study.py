"""Search storage and workers: candidates are optuna trials, evaluated by any process.

The study lives in optuna's storage (:class:`optuna.storages.RDBStorage`): an
SQLite file in the search folder by default (one machine, several processes), or
PostgreSQL (``storage=postgresql://...``) for workers on several machines. A
candidate is one trial: a method that proposes candidates itself (EvoPress, DSA)
enqueues them (``levels`` and calibration ``windows`` in the trial's user
attributes, and a ``key`` naming it); a method driven by an optuna sampler (TPE)
lets each worker ask the sampler (the method's ``propose(trial, ...)``). Every
worker runs the same objective: score the trial's levels with the KL fitness.

Failures: optuna's heartbeat does the watching. Each running trial records a
heartbeat every ``PRUNELLA_SEARCH_HEARTBEAT`` seconds (2); a trial without one for
``PRUNELLA_SEARCH_GRACE`` seconds (20) is stale, and the next process that looks
(every worker before each trial, the coordinator while it waits) fails it. The
coordinator, which waits for each candidate by its key, then finds the candidate
with no trial waiting, running or complete and enqueues it again, so a killed
worker loses only the candidate it was evaluating. The trial's ``worker`` user
attribute (``host:pid``) says which process took it. A killed coordinator re-run
with the same command replays its seeded search, reading every result the storage
already has (keyed), and goes on from there.

The study's ``setup`` user attribute says what a worker on another machine needs:
the model's path, the level database's folder (with the calibration windows in
it), the solver, compute dtype and batch size. Give the worker the same paths
(a shared file system), or ``--model``/``--folder`` where they differ.
"""

from __future__ import annotations

import datetime
import math
import os
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable

import optuna
import torch
from optuna.trial import TrialState

from ...errors import PrunellaError
from .urls import ENV, public_url, with_password

HEARTBEAT = 2  # default seconds between heartbeats of a running trial
GRACE = 20  # default seconds without one after which a trial is failed (its worker is gone)
POLL = 0.2  # seconds between looks at the storage while waiting
MAX_FAILURES = 3  # a candidate whose evaluation failed this often stops the search


def heartbeat_settings() -> tuple[int, int]:
    """Seconds between a running trial's heartbeats, and without one before it is failed:
    ``PRUNELLA_SEARCH_HEARTBEAT`` (default 2) and ``PRUNELLA_SEARCH_GRACE`` (default 20),
    whole seconds as optuna takes them, the grace longer than the interval. Give every
    process of a search the same values."""
    values = []
    for name, default in (("HEARTBEAT", HEARTBEAT), ("GRACE", GRACE)):
        text = os.environ.get(f"PRUNELLA_SEARCH_{name}", "").strip() or str(default)
        if not text.isdigit() or int(text) < 1:
            raise PrunellaError(f"PRUNELLA_SEARCH_{name} must be a whole number of seconds >= 1")
        values.append(int(text))
    heartbeat, grace = values
    if grace <= heartbeat:
        raise PrunellaError(
            f"PRUNELLA_SEARCH_GRACE ({grace}) must be longer than PRUNELLA_SEARCH_HEARTBEAT "
            f"({heartbeat}): a live worker's trials would be failed"
        )
    return heartbeat, grace


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """optuna's storage at ``url``, with heartbeats (:func:`heartbeat_settings`)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    heartbeat, grace = heartbeat_settings()
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" in optuna
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                with_password(url),
                heartbeat_interval=heartbeat,
                grace_period=grace,
                engine_kwargs=kwargs,
            )
    except Exception as exc:  # bad URL, server down, driver missing
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PrunellaError(f"cannot open search storage {public_url(url)}: {first}") from None


def optuna_load(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(url))


def open_study(url: str, name: str, sampler=None, setup: dict | None = None) -> optuna.Study:
    """The study ``name`` (created with ``setup`` when new)."""
    storage = open_storage(url)
    study = optuna.create_study(
        storage=storage, study_name=name, sampler=sampler, load_if_exists=True
    )
    if setup is not None and "setup" not in study.user_attrs:
        study.set_user_attr("setup", setup)
    return study


def make_objective(fitness: Callable, names: list[str], propose: Callable | None):
    """The objective every worker runs: the KL fitness of the trial's candidate."""

    def objective(trial: optuna.Trial) -> float:
        attrs = trial.user_attrs
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        if "levels" in attrs:
            levels, ids = attrs["levels"], attrs["windows"]
        elif propose is not None:
            levels, ids = propose(trial)
            trial.set_user_attr("levels", levels)
        else:  # a worker raced for an enqueued candidate that another took
            raise optuna.TrialPruned
        try:
            return fitness(dict(zip(names, levels, strict=True)), ids)
        except PrunellaError:  # NaN or Inf activations: the worst candidate, not a crash
            return math.inf

    return objective


def run_one(study: optuna.Study, objective) -> None:
    """Evaluate one trial (an enqueued candidate, or one the sampler proposes).

    Two processes may take the same waiting trial (SQLite has no row locks), and a
    trial may be failed as stale while its slow worker still runs: the second result
    is then refused by the storage, and dropped here (the first one stands)."""
    try:
        study.optimize(objective, n_trials=1, catch=(), gc_after_trial=False)
    except optuna.exceptions.UpdateFinishedTrialError:
        pass
    except ValueError as exc:
        if "Cannot tell" not in str(exc):
            raise


class Evaluator:
    """Scores keyed candidates through the study: ``evaluate([(key, levels, ids)])``.

    Results already in the storage are read, not recomputed; the others are enqueued
    and evaluated by this process and by any worker joined to the study.
    """

    def __init__(self, study: optuna.Study, objective) -> None:
        self.study, self.objective = study, objective
        self.evaluations = 0  # results obtained, read back or computed
        self._beaten: set[int] = set()  # running trials given a heartbeat (see _beat_orphans)

    def _trials(self) -> dict[str, list]:
        by_key: dict[str, list] = {}
        for trial in self.study.get_trials(deepcopy=False):
            key = trial.user_attrs.get("key")
            if key is not None:
                by_key.setdefault(key, []).append(trial)
        return by_key

    def evaluate(self, candidates: list[tuple[str, list[int], list[int]]]) -> list[float]:
        wanted = {key: (levels, ids) for key, levels, ids in candidates}
        while True:
            by_key = self._trials()
            done, waiting = {}, False
            for key, (levels, ids) in wanted.items():
                trials = by_key.get(key, [])
                complete = [t for t in trials if t.state == TrialState.COMPLETE]
                if complete:
                    done[key] = complete[0].value
                elif not any(t.state in (TrialState.WAITING, TrialState.RUNNING) for t in trials):
                    if len(trials) >= MAX_FAILURES:
                        raise PrunellaError(
                            f"candidate {key} failed {len(trials)} times (workers crashed or "
                            "were killed); see the workers' output"
                        )
                    self.study.enqueue_trial(
                        {}, user_attrs={"key": key, "levels": list(levels), "windows": list(ids)}
                    )
                    waiting = True
                else:
                    waiting = waiting or any(t.state == TrialState.WAITING for t in trials)
            if len(done) == len(wanted):
                self.evaluations += len(wanted)
                return [done[key] for key, _, _ in candidates]
            if waiting:
                run_one(self.study, self.objective)
            else:  # the rest are running elsewhere
                self._beat_orphans(t for key in wanted for t in by_key.get(key, []))
                with warnings.catch_warnings():  # "experimental" in optuna
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    optuna.storages.fail_stale_trials(self.study)
                time.sleep(POLL)

    def _beat_orphans(self, trials) -> None:
        """A worker killed between taking a trial and its first heartbeat leaves a running
        trial that optuna never finds stale (it skips trials with no heartbeat): give each
        trial running for longer than the grace period one heartbeat, once; a live worker
        keeps beating, an orphan goes stale a grace period later and is failed."""
        _, grace = heartbeat_settings()
        now = datetime.datetime.now()
        for trial in trials:
            started = trial.datetime_start
            if trial.state != TrialState.RUNNING or trial._trial_id in self._beaten:
                continue
            if started is not None and (now - started).total_seconds() > grace:
                self.study._storage.record_heartbeat(trial._trial_id)
                self._beaten.add(trial._trial_id)


def spawn_workers(count: int, url: str, name: str, device: str) -> list[subprocess.Popen]:
    """``count`` worker processes on this machine, joined to study ``name``; the
    machine's cores are shared between them and this process (until
    :func:`stop_workers`). The storage URL goes by environment, not on the command
    line, where ``ps`` would show a password."""
    if count <= 0:
        return []
    threads = max(1, torch.get_num_threads() // (count + 1))
    torch.set_num_threads(threads)
    env = dict(os.environ, PRUNELLA_THREADS=str(threads))
    env[ENV] = with_password(url)
    command = [sys.executable, "-m", "prunella", "search-worker", "--study", name,
               "--device", device, "--parent", str(os.getpid()), "--quiet"]  # fmt: skip
    return [subprocess.Popen(command, env=env) for _ in range(count)]


def stop_workers(workers: list[subprocess.Popen], threads: int) -> None:
    torch.set_num_threads(threads)
    for worker in workers:
        worker.terminate()
    for worker in workers:
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()


def finished(study: optuna.Study) -> bool:
    return bool(optuna.load_study(study_name=study.study_name, storage=study._storage)
                .user_attrs.get("finished"))  # fmt: skip


def worker_loop(
    study: optuna.Study,
    objective,
    *,
    sampled: bool,
    parent: int | None = None,
    idle_minutes: float = 30.0,
) -> int:
    """Evaluate trials of ``study`` until it is finished (or ``parent`` is gone, or
    nothing came for ``idle_minutes``); returns how many this worker evaluated."""
    count, idle_since = 0, time.monotonic()
    while not finished(study):
        if parent is not None and not _alive(parent):
            break
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        if waiting or sampled:
            run_one(study, objective)
            count += 1
            idle_since = time.monotonic()
        elif time.monotonic() - idle_since > idle_minutes * 60:
            break
        else:
            time.sleep(POLL)
    return count


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
