"""Allocation search: what the search methods (``evopress``, ``tpe``, ``dsa``) share.

A search method is an allocation module whose ``allocate(run, **options)`` proposes
candidate allocations and scores them here: every layer's levels come from the
:mod:`level database <prunella.methods.search.levels>` (built once, by the searched
axis's level solver on its ladder), the fitness is the KL divergence to the dense
model on calibration tokens (:mod:`prunella.methods.search.fitness`), and the
candidates are evaluated by any number of worker processes, on this machine or
others, through an optuna study (:mod:`prunella.methods.search.study`). The run
object is the allocation's (:class:`prunella.methods.allocation.run.AllocationRun`);
nothing here imports the allocation package, so the two depend one way.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ...errors import PrunellaError
from ...registry import Option
from .levels import (
    NUM_LEVELS,
    Ladder,
    LevelDatabase,
    WidthLadder,
    build_database,
    database_key,
    ladder_from_json,
)
from .urls import hide_password, public_url, storage_url

SEARCH_OPTIONS = (
    Option("minutes", float, 20.0, "wall-clock budget of the search", low=0.0, low_open=True),
    Option("evaluations", int, 0, "most candidate evaluations (0: until minutes)", low=0),
    Option(
        "workers",
        int,
        1,
        "evaluating processes on this machine (others join with prunella search-worker)",
        low=1,
    ),
    Option(
        "storage",
        str,
        "",
        "optuna storage URL; default an SQLite file in the search folder; "
        "postgresql://user@host/db for workers on several machines (the password is "
        "never written: give it by PGPASSWORD or ~/.pgpass)",
        clean=hide_password,
    ),
    Option("folder", str, "", "level database and studies (default ~/.cache/prunella/search)"),
    Option("levels", int, NUM_LEVELS, "ladder steps each way from the target (EvoPress)", low=1),
    Option("seed", int, 0, "seed of the search"),
)


def search_folder(given: str = "") -> Path:
    """Where level databases and the default storage live: ``given``, else
    ``$PRUNELLA_HOME/search`` (``~/.cache/prunella/search``)."""
    from ...io.checkpoint import cache_home

    return Path(given) if given else cache_home() / "search"


def search_ladder(run, levels: int) -> Ladder | WidthLadder:
    """The ladder of the one axis ``run`` allocates (its ``ladder`` hook)."""
    budget = run.budget()
    axis = run.axes.get(budget.axis)
    if not hasattr(axis, "ladder"):
        raise PrunellaError(f"the searches cannot allocate axis {budget.axis!r}: it has no ladder")
    sizes = run.sizes
    hidden = getattr(run.store.model.config, "hidden_size", None) or int(
        math.sqrt(sorted(sizes.values())[len(sizes) // 2])
    )
    return axis.ladder(run.store.layers(), budget, hidden, levels)


def model_identity(store) -> str:
    """The model, for database keys: its path and files' sizes and times, or (a model
    object) a digest of its weights."""
    path = getattr(store, "path", None)
    if path is not None:
        files = [*sorted(Path(path).glob("*.safetensors")), Path(path) / "config.json"]
        stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
        return database_key(path=str(Path(path).resolve()), files=stats)
    with torch.no_grad():
        digest = [
            (name, float(p.double().sum()), float(p.double().abs().sum()))
            for name, p in store.model.named_parameters()
        ]
    return database_key(weights=digest)


def open_database(run, ladder: Ladder, folder: Path) -> tuple[LevelDatabase, str]:
    """The level database for ``ladder`` (built, or finished, when needed) and its key."""
    axis = run.axes.get(run.budget().axis)
    if not hasattr(axis, "level_solver"):
        raise PrunellaError(f"the searches cannot allocate axis {axis.NAME!r}: no level solver")
    solve = axis.level_solver(run.recipe)
    key = database_key(
        model=model_identity(run.store),
        windows=database_key(data=run.windows.flatten().tolist()),
        **solve.key,
        ladder=ladder.content(),
        dtype=str(run.dtype),
    )
    db_folder = folder / "levels" / key
    db_folder.mkdir(parents=True, exist_ok=True)
    windows_file = db_folder / "windows.safetensors"
    if not windows_file.exists():
        partial = windows_file.with_suffix(f".{os.getpid()}.partial")
        save_file({"windows": run.windows.contiguous()}, partial)
        os.replace(partial, windows_file)
    database = build_database(
        db_folder, run.store, run.windows, solve, ladder, device=run.device, dtype=run.dtype,
        batch_size=run.batch_size, progress=run.progress,
    )  # fmt: skip
    return database, key


def unit_levels(ladder, units: dict[str, list[str]]) -> dict[str, tuple[int, int, int]]:
    """Per unit: (lowest level, highest level, weights per step; 0 for a width ladder,
    whose steps differ) when all its layers move together (the intersection of its
    layers' ranges)."""
    low, high = ladder.low, ladder.high
    step = getattr(ladder, "step", None)
    return {
        u: (
            max(low[n] for n in layers),
            min(high[n] for n in layers),
            sum(step[n] for n in layers) if step else 0,
        )
        for u, layers in units.items()
    }


def expand(units: dict[str, list[str]], levels: dict[str, int]) -> dict[str, int]:
    """Layer levels from unit levels."""
    return {n: levels[u] for u, layers in units.items() for n in layers}


def levels_for_ratios(ladder, units: dict[str, list[str]], ratio: dict[str, float]):
    """The layer levels nearest to per-unit ``ratio`` (the fraction of a unit's cost
    removed) within the budget: the ladder's own rule (``Ladder.for_ratios``)."""
    return ladder.for_ratios(units, ratio)


@dataclass
class Session:
    """A search under way: its study, evaluator, fitness and budget."""

    run: object  # the allocation's run
    ladder: Ladder
    database: LevelDatabase
    fitness: object
    study: object
    evaluator: object
    url: str
    options: dict
    workers: list = field(default_factory=list)
    threads: int = 1  # torch threads of this process before workers shared them
    started: float = 0.0
    curve: list = field(default_factory=list)

    def spent(self) -> bool:
        """Whether the budget (``minutes``, ``evaluations``) is used up."""
        evaluations = self.options["evaluations"]
        if evaluations and self.evaluator.evaluations >= evaluations:
            return True
        return time.monotonic() - self.started >= 60 * self.options["minutes"]

    def record(self, best: float) -> None:
        """One point of the search curve: the best fitness after so many evaluations."""
        self.curve.append([self.evaluator.evaluations, best])

    def close(self) -> None:
        from .study import stop_workers

        self.study.set_user_attr("finished", True)
        stop_workers(self.workers, self.threads)

    def finish(self, levels: dict[str, int], best: float | None, extra: dict | None = None):
        """The candidate ``levels`` as an assignment's fields (values, detail, facts)."""

        values, detail = self.ladder.assignment(levels)
        storage = public_url(self.options["storage"]) if self.options["storage"] else ""
        search = self.summary() | {"best_kl": best, "levels": levels} | (extra or {})
        return {"values": values, "detail": detail, "facts": {"storage": storage, "search": search}}

    def summary(self) -> dict:
        """What the plan records about the search."""

        return {
            "evaluations": self.evaluator.evaluations,
            "seconds": round(time.monotonic() - self.started, 1),
            "curve": self.curve,
            "study": self.study.study_name,
            "storage": public_url(self.url),
            "workers": self.options["workers"],
            "database": str(self.database.folder),
            "fitness_tokens": self.fitness.tokens,
        }


def start(run, options: dict, setup: dict, sampler=None, propose=None) -> Session:
    """Open (or resume) the study of ``run.method`` on ``run``: build the level database
    when needed, start ``options["workers"] - 1`` more worker processes. A method driven
    by an optuna ``sampler`` gives its ``propose(trial, ladder, units, setup)``."""
    from .fitness import KLFitness
    from .study import Evaluator, make_objective, open_storage, open_study, spawn_workers

    method = run.method
    folder = search_folder(options["folder"])
    url = storage_url(options["storage"], folder)
    folder.mkdir(parents=True, exist_ok=True)
    open_storage(url)  # a storage that cannot be reached fails now, not after the database
    ladder = search_ladder(run, options["levels"])
    database, key = open_database(run, ladder, folder)
    fitness = KLFitness(
        run.store,
        run.windows,
        database,
        device=run.device,
        dtype=run.dtype,
        batch_size=run.batch_size,
    )
    budget = ("minutes", "evaluations", "workers", "storage", "folder")
    name = f"{method.name}-" + database_key(
        database=key,
        method=method.name,
        options={k: v for k, v in options.items() if k not in budget},
        setup=setup,
        units=run.units,
        # what the database key leaves out (a width ladder's average and start)
        **({} if ladder.content() == ladder.to_json() else {"ladder": ladder.to_json()}),
    )
    setup = {
        "method": method.name,
        "model": str(run.store.path) if run.store.path is not None else None,
        "offload": run.store.offload,
        "database": str(database.folder),
        "ladder": ladder.to_json(),
        "dtype": str(run.dtype).removeprefix("torch."),
        "batch_size": run.batch_size,
        "units": run.units,
        "options": options,
        **setup,
    }
    study = open_study(url, name, sampler, setup)
    study.set_user_attr("finished", False)  # a re-run (resume, longer budget): workers welcome
    objective = make_objective(
        fitness,
        ladder.names,
        None if propose is None else lambda trial: propose(trial, ladder, run.units, setup),
    )
    workers = []
    if options["workers"] > 1:
        if run.store.path is None:
            raise PrunellaError("workers > 1 need the model as a checkpoint path, not an object")
        threads = torch.get_num_threads()
        workers = spawn_workers(options["workers"] - 1, url, name, str(run.device))
    return Session(
        run, ladder, database, fitness, study, Evaluator(study, objective), url, options,
        workers, threads if workers else torch.get_num_threads(), time.monotonic(),
    )  # fmt: skip


def run_worker(
    url: str,
    name: str,
    methods,
    *,
    model: str | None = None,
    folder: str | None = None,
    device: str = "auto",
    parent: int | None = None,
) -> int:
    """``prunella search-worker``: evaluate candidates of study ``name`` until it finishes
    (``methods``: the allocation registry, where the search's method is looked up)."""
    from ...engine.device import pick_device, resolve_compute_dtype
    from ...engine.store import open_store
    from .fitness import KLFitness
    from .study import make_objective, open_study, optuna_load, worker_loop

    try:
        probe = optuna_load(url, name)
    except KeyError:
        raise PrunellaError(f"no study {name!r} in {public_url(url)}") from None
    setup = probe.user_attrs.get("setup")
    if setup is None:
        raise PrunellaError(f"study {name!r} was not made by prunella")
    method = methods.get(setup["method"])
    sampler_of = getattr(method.module, "sampler", None)
    # each worker its own seed: copies of one seeded sampler would propose the same points
    study = open_study(url, name, sampler_of(setup, os.getpid()) if sampler_of else None)
    where = model or setup["model"]
    if where is None:
        raise PrunellaError("the search's model is not a checkpoint: give --model")
    store, _ = open_store(where, setup["offload"])
    database = LevelDatabase(folder or setup["database"])
    if "ladder" in setup:  # the search's own (a width ladder's start is its average's)
        database = LevelDatabase(database.folder, ladder_from_json(setup["ladder"]))
    windows = load_file(database.folder / "windows.safetensors")["windows"]
    dev = pick_device(device)
    dtype = resolve_compute_dtype(next(store.model.parameters()).dtype, dev, setup["dtype"])
    fitness = KLFitness(
        store, windows, database, device=dev, dtype=dtype, batch_size=setup["batch_size"]
    )
    ladder, units = database.ladder, setup["units"]
    propose = getattr(method.module, "propose", None)
    objective = make_objective(
        fitness,
        ladder.names,
        None if propose is None else lambda trial: propose(trial, ladder, units, setup),
    )
    return worker_loop(study, objective, sampled=propose is not None, parent=parent)
