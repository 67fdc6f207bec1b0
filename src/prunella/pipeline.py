"""The one pipeline that ``prunella prune``, ``prunella.prune`` and ``prunella.prune_to_dir`` run.

    resolve the recipe -> open the store -> calibrate -> allocate -> prune the blocks
    -> evaluate (optional) -> report -> save

The store (:mod:`prunella.store`) is chosen once: the whole model in memory, or
one block at a time streamed from the checkpoint; nothing below branches on it.
With an output folder, progress is kept in ``OUT.partial`` after every block
(:class:`prunella.store.WorkDir`), and re-running the same recipe continues from
the last finished block, in memory or streamed alike.
"""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .data import GIVEN_WINDOWS, calibration, describe
from .engine.adapters import block_index
from .engine.device import pick_device, resolve_compute_dtype
from .engine.heap import limit_heap_growth
from .engine.prune import choose_passes, default_batch_size, prune_blocks
from .engine.store import Store, WorkDir, open_store
from .errors import PrunellaError
from .io.checkpoint import assert_finite, resolve, scan
from .io.export import save_store
from .io.folders import check_disk_space, check_out_dir
from .methods.allocation import Plan, allocate, get_method, load_plan
from .methods.rows import get_rows
from .methods.sparsity import get_solver
from .methods.sparsity.patterns import Unstructured, parse_pattern
from .recipe import Recipe
from .report.build import build_report
from .report.evaluation import evaluate
from .version import __version__


def fingerprint(recipe: Recipe, path: Path, weights_digest: str) -> dict:
    """What determines the pruned weights; a resumed run must match it exactly."""
    fields = recipe.model_dump(exclude={"out", "offload", "model"})
    for key in ("allocation_file", "calib", "eval_data"):
        if fields[key] is not None and Path(fields[key]).exists():
            fields[key] = _sha256(Path(fields[key]))
    return {
        "model": str(path.resolve()),
        "config_sha256": hashlib.sha256((path / "config.json").read_bytes()).hexdigest(),
        "weights": weights_digest,
        "calibration": describe(recipe.calib),
        **fields,
        "prunella_version": __version__,
    }


def _sha256(path: Path) -> str:
    """The SHA-256 of a file, or of a folder's files and their names (a ``datasets``
    folder), read in 1 MiB blocks: a calibration corpus may be gigabytes."""
    digest = hashlib.sha256()
    files = sorted(f for f in path.rglob("*") if f.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path)).encode() if path.is_dir() else b"")
        with open(file, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


def run(
    recipe: Recipe,
    *,
    model: nn.Module | None = None,
    tokenizer=None,
    windows: torch.Tensor | None = None,
    plan: Plan | None = None,
    overwrite: bool = False,
    resume: bool = False,
    restart: bool = False,
    progress: bool = True,
) -> tuple[Store, dict]:
    """Prune as ``recipe`` says; returns the store (holding the pruned model) and the report.

    ``model`` (a loaded model), ``windows`` (token windows) and ``plan`` stand in for the
    recipe's ``model``, ``calib`` and ``allocation`` when given. With ``recipe.out``
    the result is saved there, resumably (``resume`` insists on resuming, ``restart``
    discards a previous partial run).
    """
    limit_heap_growth()
    started = time.perf_counter()
    timings: dict[str, float] = {}
    recipe = recipe.resolved()
    if recipe.model is None and model is None:
        raise PrunellaError("missing MODEL: give it as the first argument or in the recipe")
    if resume and restart:
        raise PrunellaError("--resume and --restart exclude each other")
    pattern = parse_pattern(recipe.pattern, recipe.sparsity)
    solver = get_solver(recipe.solver.name)
    dev = pick_device(recipe.device)
    if model is not None and recipe.out is not None:
        raise PrunellaError("a loaded model is pruned in memory: save it with prunella.save")
    out = work = None
    if recipe.out is not None:
        path = resolve(recipe.model)
        out = check_out_dir(recipe.out, path, overwrite)
        work = WorkDir(out)
        # reads every tensor once, before anything is loaded (so it adds nothing to the
        # peak): NaN weights stop the run here, before anything is written
        weights_digest = scan(path)

    # the store: chosen once, here
    tick = time.perf_counter()
    store, tokenizer = open_store(
        model if model is not None else recipe.model,
        recipe.offload if out is not None else "none",  # nowhere to stream to
        whole_model=recipe.eval_data is not None,
        tokenizer=tokenizer,
    )
    if model is not None:
        assert_finite(model)
    timings["load"] = time.perf_counter() - tick
    config = store.model.config
    dtype = resolve_compute_dtype(next(store.model.parameters()).dtype, dev, recipe.compute_dtype)
    nsamples, seqlen = windows.shape if windows is not None else (recipe.nsamples, recipe.seqlen)
    batch_size = recipe.batch_size or default_batch_size(seqlen, dev)
    # resolved, so that a resume (perhaps on another machine) must match them
    recipe = recipe.model_copy(
        update={
            "passes": choose_passes(recipe.passes, config, nsamples, seqlen),
            "compute_dtype": str(dtype).removeprefix("torch."),
        }
    )

    resuming = False
    if work is not None:
        stamp = fingerprint(recipe, store.path, weights_digest)
        if work.exists() and restart:
            work.discard()
        resuming = work.exists()
        if resume and not resuming:
            raise PrunellaError(f"nothing to resume: {work.path} does not exist")
        check_disk_space(out.resolve().parent, store.run_bytes())
    source = str(store.path) if store.path is not None else "model object"
    calib_info = {"source": describe(recipe.calib) if windows is None else GIVEN_WINDOWS}

    if resuming:
        work.check(stamp)
        windows = work.windows()
        if work.has("calibration.json"):
            calib_info = work.load_json("calibration.json")
        data = work.load_json("plan.json")
        plan = Plan(**{k: v for k, v in data.items() if k != "format"})
        start = work.next_block()
        hidden = work.hidden(start) if start else None
        results = [r for r in work.load_json("results.json") if block_index(r["name"]) < start]
        for i in range(start):
            store.restore(i, load_file(work.block_file(i)))
        if progress:
            print(f"resuming {work.path} at block {start}", file=sys.stderr)
    else:
        tick = time.perf_counter()
        windows, calib_info = calibrate(recipe, store, tokenizer, windows)
        timings["calibration_data"] = time.perf_counter() - tick
        tick = time.perf_counter()
        if plan is None:
            plan = make_plan(recipe, store, pattern, windows, dev, dtype, batch_size, progress)
        timings["allocation"] = time.perf_counter() - tick
        start, hidden, results = 0, None, []
        if recipe.eval_data is not None:  # before anything is written: bad eval data stops here
            tick = time.perf_counter()
            dense_eval = _evaluate(store, tokenizer, recipe, dev, progress)
            timings["evaluation"] = time.perf_counter() - tick
        if work is not None:
            work.start(stamp, windows, plan.to_json())
            work.save_json("calibration.json", calib_info)
            if recipe.eval_data is not None:
                work.save_json("dense_eval.json", dense_eval)
    if isinstance(pattern, Unstructured):  # the resolved recipe names the sparsity it used
        recipe = recipe.model_copy(update={"sparsity": plan.target})

    def finish_block(i: int, acts, block_results) -> None:
        results.extend(r.as_dict() for r in block_results)
        if work is not None:
            work.save_block(i, store.block_tensors(i), acts.hidden, results)

    try:
        _, phase_times = prune_blocks(
            store,
            windows,
            plan.patterns(store.layers()),
            solver,
            device=dev,
            dtype=dtype,
            batch_size=batch_size,
            solver_options=recipe.solver.options,
            rows=get_rows(recipe.rows.name),
            rows_options=recipe.rows.options,
            one_pass=recipe.passes == 1,
            expert_min_tokens=recipe.expert_min_tokens,
            progress=progress,
            start=start,
            hidden=hidden,
            after_block=finish_block,
        )
    except PrunellaError:
        # A PrunellaError here is a fault of the model itself (NaN or Inf activations):
        # re-running cannot finish it, so a fresh run leaves nothing behind. A resumed
        # run keeps the blocks an earlier run finished.
        if work is not None and (not resuming or work.next_block() == 0):
            work.discard()
        raise
    timings.update(phase_times)

    extra = {"offload": store.offload, "resumed_from_block": start}
    if recipe.eval_data is not None:
        tick = time.perf_counter()
        if resuming:
            dense_eval = work.load_json("dense_eval.json")
        pruned = _evaluate(store, tokenizer, recipe, dev, progress)
        extra["evaluation"] = {**pruned, "dense_perplexity": dense_eval["perplexity"]}
        timings["evaluation"] = timings.get("evaluation", 0.0) + time.perf_counter() - tick
    report = build_report(
        model=store.model,
        source=source,
        recipe=recipe,
        pattern=pattern,
        plan=plan,
        calibration=calib_info,
        windows=windows,
        device=dev,
        dtype=dtype,
        started=started,
        timings=timings,
        results=results,
        extra=extra,
    )
    if out is not None:
        try:
            save_store(store, work, out, report, recipe, tokenizer, overwrite)
        except PrunellaError as exc:
            raise PrunellaError(
                f"{exc}; the pruned blocks are kept in {work.path}: re-run the same command "
                "to finish"
            ) from None
        work.discard()
    return store, report


def calibrate(
    recipe: Recipe, store: Store, tokenizer, windows: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict]:
    """The calibration windows (``windows`` if given, else drawn from ``recipe.calib``)
    and what they were drawn from (source, format, bytes, documents and tokens read)."""
    return calibration(
        tokenizer,
        windows if windows is not None else recipe.calib,
        recipe.nsamples,
        recipe.seqlen,
        recipe.seed,
        getattr(store.model.config, "max_position_embeddings", None),
        recipe.text_field,
    )


def make_plan(
    recipe: Recipe,
    store: Store,
    pattern,
    windows: torch.Tensor,
    device: torch.device,
    dtype: torch.dtype,
    batch_size: int,
    progress: bool = True,
) -> Plan:
    """The plan: read from ``recipe.allocation_file``, or made by the recipe's allocation."""
    if recipe.allocation_file is not None:
        plan = load_plan(recipe.allocation_file, store.layers(), recipe.sparsity)
        if plan.rows is not None and not isinstance(pattern, Unstructured):
            raise PrunellaError(
                f"allocation file {recipe.allocation_file} gives per-row budgets, "
                f"which a {pattern} pattern cannot honour"
            )
        return plan
    return allocate(
        store,
        get_method(recipe.allocation.name),
        recipe.allocation.options,
        pattern,
        windows=windows,
        granularity=recipe.granularity,
        min_sparsity=recipe.min_sparsity,
        max_sparsity=recipe.max_sparsity,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        progress=progress,
        solver=get_solver(recipe.solver.name),
        solver_options=recipe.solver.options,
    )


def _evaluate(store: Store, tokenizer, recipe: Recipe, device, progress: bool) -> dict:
    return evaluate(
        store.model,
        recipe.eval_data,
        seqlen=recipe.seqlen,
        max_windows=recipe.eval_max_windows,
        text_field=recipe.text_field,
        tokenizer=tokenizer,
        device=device,
        progress=progress,
    )
