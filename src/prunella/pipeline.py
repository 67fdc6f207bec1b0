"""The one pipeline that ``prunella prune``, ``prunella allocate``, ``prunella.prune`` and
``prunella.prune_to_dir`` run.

    resolve the recipe -> open the store -> calibrate -> allocate (the plan, on every
    axis the recipe asks for) -> compress the blocks -> evaluate (optional) -> report
    -> save

The store (:mod:`prunella.engine.store`) is chosen once: the whole model in memory, or
one block at a time streamed from the checkpoint; nothing below branches on it.
With an output folder, progress is kept in ``OUT.partial`` after every block
(:class:`prunella.engine.store.WorkDir`), and re-running the same recipe continues from
the last finished block, in memory or streamed alike.
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .data import GIVEN_WINDOWS, calibration, check_token_ids, describe
from .engine.adapters import adapter_for, block_index
from .engine.device import pick_device, resolve_compute_dtype
from .engine.heap import limit_heap_growth
from .engine.prune import choose_passes, default_batch_size, level_of, prune_blocks
from .engine.store import MemoryStore, Store, StreamedStore, WorkDir, open_store
from .errors import PrunellaError, warn
from .io.checkpoint import assert_finite, check_checkpoint, check_dense, scan
from .io.export import save_store
from .io.folders import (
    DISK_ERRORS,
    check_disk_space,
    check_out_dir,
    content_sha256,
    disk_error,
    read_json,
)
from .io.gguf_file import check_gguf_source
from .io.quantized import check_quantizable
from .io.safetensors_io import model_nbytes
from .methods import AXES, structure
from .methods import compressors as axis_compressors
from .methods.allocation import ALLOCATIONS
from .methods.allocation.run import AllocationRun, allocate
from .methods.plan import Plan, check_plan, load_plan, plan_cost
from .methods.structure.sources import Streamed
from .recipe import Recipe
from .report.build import build_report
from .report.evaluation import evaluate
from .version import __version__


def fingerprint(recipe: Recipe, path: Path, weights_digest: str) -> dict:
    """What determines the pruned weights; a resumed run must match it exactly."""
    fields = recipe.model_dump(exclude={"out", "offload", "model"})
    for key in ("allocation_file", "calib", "eval_data"):
        if fields[key] is not None and Path(fields[key]).exists():
            fields[key] = content_sha256(Path(fields[key]))
    return {
        "model": str(path.resolve()),
        "config_sha256": hashlib.sha256((path / "config.json").read_bytes()).hexdigest(),
        "weights": weights_digest,
        "calibration": describe(recipe.calib),
        **fields,
        "prunella_version": __version__,
    }


class Setting:
    """What a run settles before any weight is compressed: the store and tokenizer, the
    device, the forward dtype and batch size, and each axis's budget."""

    def __init__(
        self,
        recipe: Recipe,
        store: Store,
        tokenizer,
        nsamples: int,
        seqlen: int,
        weights_digest: str | None = None,
    ):
        self.store, self.tokenizer = store, tokenizer
        self.weights_digest = weights_digest
        self.device = pick_device(recipe.device)
        model_dtype = next(store.model.parameters()).dtype
        self.dtype = resolve_compute_dtype(model_dtype, self.device, recipe.compute_dtype)
        self.batch_size = recipe.batch_size or default_batch_size(seqlen, self.device)
        self.passes = choose_passes(recipe.passes, store.model.config, nsamples, seqlen)
        # a structure-only run (--params alone) compresses no layer afterwards
        self.budgets = AXES.asked(recipe) if recipe.params is not None else AXES.budgets(recipe)

    def model_fingerprint(self) -> str | None:
        """The digest of the model's weights (:func:`scan`, read once), or ``None`` for a
        model given in memory."""
        if self.weights_digest is None and self.store.path is not None:
            self.weights_digest = scan(self.store.path)
        return self.weights_digest


def run(recipe: Recipe, **kwargs) -> tuple[Store, dict]:
    """Compress as ``recipe`` says; returns the store (holding the compressed model) and
    the report.

    ``model`` (a loaded model), ``windows`` (token windows) and ``plan`` stand in for the
    recipe's ``model``, ``calib`` and ``allocation`` when given. With ``recipe.out``
    the result is saved there, resumably (``resume`` insists on resuming, ``restart``
    discards a previous partial run); a full disk, a read-only file system or a refused
    permission on the way is one line that says what to fix, and the finished blocks stay.
    """
    try:
        return _run(recipe, **kwargs)
    except OSError as exc:
        if exc.errno not in DISK_ERRORS or recipe.out is None:
            raise
        raise disk_error(exc, WorkDir(recipe.out).path) from None


def _run(
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
    limit_heap_growth()
    started = time.perf_counter()
    timings: dict[str, float] = {}
    recipe = recipe.resolved()
    if recipe.model is None and model is None:
        raise PrunellaError("missing MODEL: give it as the first argument or in the recipe")
    recipe, planned_cut = structure_from_plan(recipe)
    if resume and restart:
        raise PrunellaError("--resume and --restart exclude each other")
    AXES.budgets(recipe)  # a bad budget stops here
    pick_device(recipe.device)
    if model is not None and recipe.out is not None:
        raise PrunellaError("a loaded model is pruned in memory: save it with prunella.save")
    shrinking = recipe.params is not None
    if shrinking:
        check_structure_recipe(recipe)
    out = work = weights_digest = None
    if recipe.out is not None:
        path, _ = check_checkpoint(recipe.model)
        check_dense(path)
        out = check_out_dir(recipe.out, path, overwrite)
        work = WorkDir(out)
        if work.exists() and restart:  # before a streamed structure cut writes into it
            work.discard()
        # reads every tensor once, before anything is loaded (so it adds nothing to the
        # peak): NaN weights stop the run here, before anything is written
        weights_digest = scan(path)

    # the store: chosen once, here
    tick = time.perf_counter()
    offload = recipe.offload if out is not None else "none"  # nowhere to stream to
    if shrinking and offload != "disk":
        offload = "none"  # a structure cut streams only when asked: in memory it is faster
    store, tokenizer = open_store(
        model if model is not None else recipe.model,
        offload,
        whole_model=recipe.eval_data is not None,
        tokenizer=tokenizer,
    )
    if model is not None:
        assert_finite(model)
    timings["load"] = time.perf_counter() - tick
    calib_info = {"source": describe(recipe.calib) if windows is None else GIVEN_WINDOWS}
    dense_store = structure_report = None
    if shrinking:  # first: the other axes compress the smaller model
        tick = time.perf_counter()
        windows, calib_info = calibrate(recipe, store, tokenizer, windows)
        timings["calibration_data"] = time.perf_counter() - tick
        tick = time.perf_counter()
        dense_store, (store, structure_report) = (
            store,
            shrink_store(recipe, store, windows, progress, planned_cut, work),
        )
        if recipe.eval_data is None:
            dense_store = None  # nothing reads the dense model again
        timings["structure"] = time.perf_counter() - tick
    nsamples, seqlen = windows.shape if windows is not None else (recipe.nsamples, recipe.seqlen)
    setting = Setting(recipe, store, tokenizer, nsamples, seqlen, weights_digest)
    if recipe.format == "compressed-tensors" and out is not None:
        check_quantizable(store.model, store.layers())
    if recipe.format == "gguf" and out is not None and store.path is not None:
        check_gguf_source(Path(store.path))
    dev, dtype = setting.device, setting.dtype
    # resolved, so that a resume (perhaps on another machine) must match them
    recipe = recipe.model_copy(
        update={"passes": setting.passes, "compute_dtype": str(dtype).removeprefix("torch.")}
    )

    resuming = False
    beside: dict[str, torch.Tensor] = {}  # what layers keep beside their weights (scales)
    if work is not None:
        stamp = fingerprint(recipe, store.path, weights_digest)
        resuming = work.exists()
        if resume and not resuming:
            raise PrunellaError(f"nothing to resume: {work.path} does not exist")
        check_disk_space(out.resolve().parent, store.run_bytes())
    source = str(store.path) if store.path is not None else "model object"

    if resuming:
        work.check(stamp)
        windows = work.windows()
        if work.has("calibration.json"):
            calib_info = work.load_json("calibration.json")
        plan = Plan.from_json(work.load_json("plan.json"))
        start = work.next_block()
        hidden = work.hidden(start) if start else None
        results = [r for r in work.load_json("results.json") if block_index(r["name"]) < start]
        for i in range(start):
            store.restore(i, load_file(work.block_file(i)))
            beside.update(work.extra(i))
        if progress:
            print(f"resuming {work.path} at block {start}", file=sys.stderr)
    else:
        if not shrinking:
            tick = time.perf_counter()
            windows, calib_info = calibrate(recipe, store, tokenizer, windows)
            timings["calibration_data"] = time.perf_counter() - tick
        tick = time.perf_counter()
        plan = make_plan(recipe, setting, windows, progress, given=plan)
        timings["allocation"] = time.perf_counter() - tick
        start, hidden, results = 0, None, []
        if recipe.eval_data is not None:  # before anything is written: bad eval data stops here
            tick = time.perf_counter()
            dense_eval = _evaluate(dense_store or store, tokenizer, recipe, dev, progress)
            timings["evaluation"] = time.perf_counter() - tick
        if work is not None:
            work.start(stamp, windows, plan.to_json())
            work.save_json("calibration.json", calib_info)
            if recipe.eval_data is not None:
                work.save_json("dense_eval.json", dense_eval)
    for name, axis_plan in plan.axes.items():  # the resolved recipe names what was used
        recipe = recipe.model_copy(update=AXES.get(name).record(recipe, axis_plan))

    def finish_block(i: int, acts, block_results) -> None:
        results.extend(r.as_dict() for r in block_results)
        kept = {f"{r.name}.{k}": t for r in block_results for k, t in r.tensors.items()}
        beside.update(kept)
        if work is not None:
            work.save_block(i, store.block_tensors(i), acts.hidden, results, kept)

    shapes = store.layers()
    per_axis = {name: AXES.get(name).levels(axis, shapes) for name, axis in plan.axes.items()}
    levels = {layer: {name: per_axis[name][layer] for name in per_axis} for layer in shapes}
    compressors = axis_compressors(recipe, plan.axes)
    first = next(iter(levels.values()))
    level_keys = [k for c in compressors for k in c.describe(level_of(first, c))]
    phase_times = {}
    try:
        if plan.axes:  # else a structure-only run: nothing more to compress
            _, phase_times = prune_blocks(
                store,
                windows,
                levels,
                compressors,
                device=dev,
                dtype=dtype,
                batch_size=setting.batch_size,
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
    if structure_report is not None:
        extra["structure"] = structure_report
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
        axes={
            **({"structure": {"summary": structure_report["summary"]}} if shrinking else {}),
            **{n: AXES.get(n).report(recipe, axis, results) for n, axis in plan.axes.items()},
        },
        plan=plan,
        calibration=calib_info,
        windows=windows,
        device=dev,
        dtype=dtype,
        started=started,
        timings=timings,
        results=results,
        level_keys=level_keys,
        extra=extra,
    )
    if out is not None:
        try:
            grids = AXES.get("bits").levels(plan["bits"], shapes) if "bits" in plan else {}
            save_store(store, work, out, report, recipe, tokenizer, overwrite, grids, beside)
        except PrunellaError as exc:
            raise PrunellaError(
                f"{exc}; the pruned blocks are kept in {work.path}: re-run the same command "
                "to finish"
            ) from None
        work.discard()
    return store, report


def shrink_store(
    recipe: Recipe,
    store: Store,
    windows: torch.Tensor,
    progress: bool,
    given=None,
    work: WorkDir | None = None,
) -> tuple[Store, dict]:
    """The store of the smaller model ``recipe.params`` asks for (``given``: a plan
    file's structure, see :func:`structure_from_plan`), and the structure's report. In
    memory, the smaller model (its ``path`` the source's, for the report and the output
    checks); streamed, the checkpoint the cut wrote block by block into the work
    folder (``work.structure``), streamed in turn."""
    device = pick_device(recipe.device)
    batch = recipe.batch_size or default_batch_size(windows.shape[1], device)
    search = None
    if recipe.allocation.name in structure.SEARCHES and not AXES.asked(recipe):  # else the others'
        options = recipe.allocation.options
        search = {"method": recipe.allocation.name, **{k: options[k] for k in
                  ("minutes", "evaluations", "seed", "startup") if k in options}}  # fmt: skip
    if isinstance(store, StreamedStore):
        source = Streamed(store, device, batch, progress, work.structure)
        try:
            folder, report = structure.shrink(
                store.model, windows, recipe, device, batch, progress, search, given, source
            )
        except BaseException:  # nothing half-written stays behind
            shutil.rmtree(work.structure, ignore_errors=True)
            if work.path.is_dir() and not any(work.path.iterdir()):
                work.path.rmdir()
            raise
        return StreamedStore(folder, check_checkpoint(folder)[1]), report
    smaller, report = structure.shrink(
        store.model, windows, recipe, device, batch, progress, search, given
    )
    cut = MemoryStore(smaller, adapter_for(smaller))
    cut.path = store.path
    return cut, report


def check_structure_recipe(recipe: Recipe) -> None:
    """One line for what a structure cut (``--params``) cannot be combined with."""
    if recipe.allocation.name not in ("uniform", *structure.SEARCHES) and not AXES.asked(recipe):
        raise PrunellaError(
            f"--allocation {recipe.allocation.name} has nothing to allocate: the structure "
            "axis chooses its depth and width by its own candidate search (KL to the dense "
            "model), searched on by --allocation evopress or tpe"
        )


def structure_from_plan(recipe: Recipe) -> tuple[Recipe, tuple | None]:
    """The structure that the plan file ``--allocation-file`` holds (its shape and block
    count, :func:`prunella.methods.structure.shape_of_section`), and the recipe with its
    budget and width method (``--params`` may be left out; given, it must be the
    plan's). A plan without a structure cannot go with ``--params``: its layers are the
    dense model's."""
    if recipe.allocation_file is None:
        return recipe, None
    where = f"allocation file {recipe.allocation_file}"
    data = read_json(Path(recipe.allocation_file), where)
    section = data.get("structure") if isinstance(data, dict) else None
    if section is None:
        if recipe.params is not None:
            raise PrunellaError(
                f"--params with {where}, which holds no structure: its layers are the dense "
                "model's; make the plan with 'prunella allocate --params P --json FILE'"
            )
        return recipe, None
    shape, params, method, blocks = structure.shape_of_section(section, where)
    if isinstance(recipe.params, float) and abs(recipe.params - params) > 1e-9:
        raise PrunellaError(
            f"{where} is for params {params:g}, but the recipe asks for {recipe.params:g}"
        )
    update = {"params": params if recipe.params is None else recipe.params}
    return recipe.model_copy(update={**update, "width_method": method}), (shape, blocks)


def calibrate(
    recipe: Recipe, store: Store, tokenizer, windows: torch.Tensor | None = None
) -> tuple[torch.Tensor, dict]:
    """The calibration windows (``windows`` if given, else drawn from ``recipe.calib``)
    and what they were drawn from (source, format, bytes, documents and tokens read);
    every token one the model can embed."""
    windows, info = calibration(
        tokenizer,
        windows if windows is not None else recipe.calib,
        recipe.nsamples,
        recipe.seqlen,
        recipe.seed,
        getattr(store.model.config, "max_position_embeddings", None),
        recipe.text_field,
    )
    check_token_ids(windows, store.model)
    return windows, info


def make_plan(
    recipe: Recipe, setting: Setting, windows, progress: bool = True, given: Plan | None = None
) -> Plan:
    """The plan: ``given`` (a :class:`Plan` from the API), read from
    ``recipe.allocation_file``, or made by the recipe's allocation method (the one
    protocol, :mod:`prunella.methods.allocation.run`); checked, and with its cost."""
    store = setting.store
    shapes = store.layers()
    if not setting.budgets and recipe.allocation_file is None:  # a structure-only run
        return Plan({})
    if given is not None:
        plan = given
        check_plan(plan, shapes, AXES.asked(recipe), AXES, "the plan given")
        check_plan_model(plan, setting, "the plan given")
    elif recipe.allocation_file is not None:
        plan = load_plan(recipe.allocation_file, shapes, AXES.asked(recipe), AXES)
        check_plan_model(plan, setting, f"allocation file {recipe.allocation_file}")
    else:
        method = ALLOCATIONS.get(recipe.allocation.name)
        run = AllocationRun(
            store, windows, recipe, AXES, setting.budgets, method, recipe.allocation.options,
            setting.device, setting.dtype, setting.batch_size, progress,
        )  # fmt: skip
        plan = allocate(run)
    element = next(store.model.parameters()).element_size()
    dense_layers = sum(r * c for r, c in shapes.values()) * element
    other = model_nbytes(store.model, loaded_only=False) - dense_layers
    plan.cost = plan_cost(plan, AXES, shapes, element, other, recipe.format)
    return plan


def check_plan_model(plan: Plan, setting: Setting, where: str) -> None:
    """One warning line when ``plan`` was made for another model (its fingerprint is
    not this model's weights digest); the plan is used all the same. A plan without a
    fingerprint (an older file), or a model given in memory, is not compared."""
    if plan.model_fingerprint is None or setting.store.path is None:
        return
    if plan.model_fingerprint != setting.model_fingerprint():
        warn(
            f"{where} was made for another model than {setting.store.path} (its "
            "model_fingerprint differs from the digest of these weights): using it anyway"
        )


def allocate_only(
    recipe: Recipe,
    *,
    model: nn.Module | None = None,
    tokenizer=None,
    windows: torch.Tensor | None = None,
    progress: bool = True,
) -> tuple[Plan, Store]:
    """``prunella allocate``: the plan the recipe's allocation gives its model (or
    ``model``, a loaded one), without compressing; calibration windows (``windows``, or
    drawn from the recipe's text) only when the method reads them."""
    recipe = recipe.resolved()
    if recipe.model is None and model is None:
        raise PrunellaError("missing MODEL: give it as the first argument or in the recipe")
    AXES.budgets(recipe)
    recipe, planned_cut = structure_from_plan(recipe)
    source = model if model is not None else recipe.model
    shrinking = recipe.params is not None
    if shrinking:
        check_structure_recipe(recipe)
    offload = "none" if shrinking else recipe.offload
    store, tokenizer = open_store(source, offload, tokenizer=tokenizer)
    structure_report = None
    if shrinking:  # the other axes are allocated on the smaller model
        windows = calibrate(recipe, store, tokenizer, windows)[0]
        store, structure_report = shrink_store(recipe, store, windows, progress, planned_cut)
    nsamples, seqlen = windows.shape if windows is not None else (recipe.nsamples, recipe.seqlen)
    setting = Setting(recipe, store, tokenizer, nsamples, seqlen)
    method = ALLOCATIONS.get(recipe.allocation.name)
    if recipe.allocation_file is None and method.needs_data and windows is None:
        windows = calibrate(recipe, store, tokenizer)[0]
    plan = make_plan(recipe, setting, windows, progress)
    plan.model_fingerprint = setting.model_fingerprint()  # the model the plan is for
    plan.structure = structure_report
    return plan, store


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
