"""The Python API: ``prunella.prune`` and ``prunella.evaluate``.

import prunella
model, report = prunella.prune("smollm2-135m", sparsity=0.5, solver="sparsegpt",
                               nsamples=32, seqlen=512)
prunella.save(model, "out/", report)   # tokenizer copied from the source checkpoint
"""

from __future__ import annotations

import contextlib
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from . import __version__
from .adapters import Adapter, adapter_for
from .allocation import GRANULARITIES, Plan, build_plan, get_method, load_plan, method_options
from .data import calibration_windows, describe, evaluation_windows
from .engine import on_device, prune_blocks, visit_blocks
from .errors import PrunellaError
from .evaluation import perplexity
from .models import assert_finite, check_checkpoint, load
from .patterns import Pattern, Unstructured, parse_pattern
from .plots import block_index
from .recipe import Recipe
from .solvers import get_solver


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else CUDA when present, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise PrunellaError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PrunellaError("--device cuda was asked for but no CUDA GPU is available")
    return device


COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX tiles)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_compute_dtype(
    model_dtype: torch.dtype, device: torch.device, requested: str = "auto"
) -> torch.dtype:
    """The dtype of the calibration forward passes; the solvers' maths is float32 always.

    ``auto``: the model's own dtype on a GPU; on a CPU, bfloat16 where the CPU
    multiplies it natively (about 3x float32's GEMM speed on AVX512-BF16), else
    float32, since emulated half precision is slow. On a CPU a narrower dtype applies
    to the matrix products alone, the activations stay float32
    (:func:`prunella.engine.forward_precision`).
    """
    if requested not in COMPUTE_DTYPES:
        raise PrunellaError(f"compute dtype must be one of {COMPUTE_DTYPES}, got {requested!r}")
    if requested != "auto":
        return getattr(torch, requested)
    if device.type == "cuda":
        return model_dtype
    return torch.bfloat16 if native_bf16() else torch.float32


def eval_dtype(model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """Evaluation runs in the model's own dtype on a GPU and in float32 on CPU."""
    return model_dtype if device.type == "cuda" else torch.float32


def peak_memory_mb(device: torch.device) -> dict:
    """Peak resident memory of this process (and peak CUDA allocation), in MiB."""
    peak = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        peak["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return peak


def prunable_layers(model: torch.nn.Module, adapter: Adapter) -> dict[str, tuple[int, int]]:
    """Full name -> ``(out_features, in_features)`` of every prunable linear layer."""
    from .adapters import get_weight

    layers = {}
    for i, block in enumerate(adapter.blocks(model)):
        for local, layer in adapter.linears(block).items():
            layers[f"{adapter.blocks_path}.{i}.{local}"] = tuple(get_weight(layer).shape)
    return layers


def choose_passes(passes, model, windows, device: torch.device) -> int:
    """1 or 2 passes per block; ``"auto"`` takes 1 when the waiting batches fit.

    In one pass every batch waits at each layer until the last has arrived, holding
    its residual stream and the layer's input: about ``(hidden + widest layer)``
    float32 numbers per calibration token, twice over for safety, against a quarter
    of the free memory (of the GPU, or of the machine on CPU).
    """
    if passes in (1, 2, "1", "2"):
        return int(passes)
    if passes != "auto":
        raise PrunellaError(f"passes must be 1, 2 or auto, got {passes!r}")
    nsamples, seqlen = windows.shape if isinstance(windows, torch.Tensor) else windows
    config = model.config
    width = max(getattr(config, "intermediate_size", 0) or 0, 4 * config.hidden_size)
    need = 2 * nsamples * seqlen * (config.hidden_size + width) * 4
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else available_memory()
    return 1 if free and need < free / 4 else 2


def _default_batch_size(seqlen: int, device: torch.device | None = None) -> int:
    """Windows per forward: 4096 tokens' worth on CPU (small temporaries), 16384 on a GPU."""
    tokens = 16384 if device is not None and device.type == "cuda" else 4096
    return max(1, tokens // seqlen)


def _check_text_input(model, tokenizer, seqlen: int) -> None:
    """Reading text needs a tokenizer and windows no longer than the model's context."""
    if tokenizer is None:
        raise PrunellaError("a tokenizer is needed to read text: pass tokenizer=")
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions and seqlen > max_positions:
        raise PrunellaError(
            f"seqlen {seqlen} exceeds the model's context of {max_positions} tokens"
        )


def _calibration(model, tokenizer, calibration, nsamples, seqlen, seed):
    """Token windows and a description of their source."""
    if isinstance(calibration, torch.Tensor):
        windows = calibration.long()
        if windows.dim() != 2:
            raise PrunellaError("calibration windows must be a 2-D LongTensor [nsamples, seqlen]")
        return windows, "token windows given by the caller"
    _check_text_input(model, tokenizer, seqlen)
    windows = calibration_windows(tokenizer, calibration, nsamples, seqlen, seed)
    return windows, describe(calibration)


def allocate(
    model: torch.nn.Module,
    adapter: Adapter,
    method: str,
    pattern: Pattern,
    *,
    windows: torch.Tensor | None = None,
    granularity: str = "block",
    options: dict | None = None,
    min_sparsity: float = 0.0,
    max_sparsity: float = 0.99,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    batch_size: int = 1,
    progress: bool = True,
    visit_hooks: dict | None = None,
) -> Plan:
    """A :class:`Plan` (sparsity per layer) for ``pattern``'s target by allocation ``method``.

    Methods that need activations (``owl``) run one dense forward pass over
    ``windows``; weight-only methods (``alphapruning``) read the weights only.
    """
    chosen = get_method(method)
    params = method_options(chosen, options)
    if granularity not in GRANULARITIES:
        raise PrunellaError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if not 0.0 <= min_sparsity <= max_sparsity < 1.0:
        raise PrunellaError(
            f"need 0 <= min sparsity <= max sparsity < 1, got {min_sparsity}, {max_sparsity}"
        )
    layers = prunable_layers(model, adapter)
    sizes = {name: rows * cols for name, (rows, cols) in layers.items()}
    target = pattern.sparsity
    if chosen.name == "uniform":
        if isinstance(pattern, Unstructured):
            return Plan(target=target, sparsity=dict.fromkeys(layers, target))
        return Plan(
            target=target,
            sparsity=dict.fromkeys(layers, target),
            nm={name: [pattern.n, pattern.m] for name in layers},
        )
    if chosen.needs and windows is None:
        raise PrunellaError(f"allocation {method!r} needs calibration data")
    dev = device or pick_device()
    metric: dict[str, float] = {}
    units: dict[str, list[str]] = {}

    def visit(i: int, block_layers: dict) -> None:
        if granularity == "block":
            unit = f"{adapter.blocks_path}.{i}"
            units[unit] = list(block_layers)
            metric[unit] = chosen.unit_metric(list(block_layers.values()), **params)
        else:
            for name, pair in block_layers.items():
                units[name] = [name]
                metric[name] = chosen.unit_metric([pair], **params)

    visit_blocks(
        model,
        adapter,
        visit,
        needs=chosen.needs,
        windows=windows,
        device=dev,
        dtype=dtype or resolve_compute_dtype(next(model.parameters()).dtype, dev),
        batch_size=batch_size,
        progress=progress,
        desc=f"allocation ({method})",
        **(visit_hooks or {}),
    )
    return build_plan(
        chosen,
        metric,
        units,
        sizes,
        target,
        pattern,
        granularity,
        params,
        min_sparsity,
        max_sparsity,
    )


def _resolve_plan(
    model,
    adapter,
    allocation,
    pattern,
    sparsity,
    windows,
    options: dict,
    progress: bool,
    visit_hooks: dict | None = None,
) -> Plan:
    """A Plan from a Plan object, a plan file, or a method name."""
    if isinstance(allocation, Plan):
        return allocation
    if isinstance(allocation, Path) or str(allocation).endswith(".json"):
        return load_plan(allocation, prunable_layers(model, adapter), sparsity)
    return allocate(
        model,
        adapter,
        str(allocation),
        pattern,
        windows=windows,
        progress=progress,
        visit_hooks=visit_hooks,
        **options,
    )


def _report(
    *,
    model,
    source,
    chosen,
    solver_options,
    pattern,
    plan,
    seed,
    calib,
    windows,
    dev,
    model_dtype,
    dtype,
    started,
    timings,
    results,
    extra=None,
) -> dict:
    total = sum(r["shape"][0] * r["shape"][1] for r in results)
    zeros = sum(r["sparsity"] * r["shape"][0] * r["shape"][1] for r in results)
    return {
        "prunella_version": __version__,
        "model": source,
        "architecture": model.config.model_type,
        "solver": chosen.name,
        "solver_options": solver_options or {},
        "pattern": str(pattern),
        "target_sparsity": plan.target,
        "sparsity": zeros / total if total else 0.0,
        "prunable_parameters": total,
        "seed": seed,
        "calibration": {
            "source": calib,
            "nsamples": windows.shape[0],
            "seqlen": windows.shape[1],
            "tokens": windows.numel(),
        },
        "allocation": plan.to_json(),
        "device": str(dev),
        "dtype": str(model_dtype).removeprefix("torch."),
        "compute_dtype": str(dtype).removeprefix("torch."),
        "wall_seconds": time.perf_counter() - started,
        "seconds": timings,
        **peak_memory_mb(dev),
        "torch": torch.__version__,
        "python": platform.python_version(),
        **(extra or {}),
        "layers": results,
    }


def prune(
    model,
    *,
    sparsity: float | None = None,
    pattern: str | Pattern = "unstructured",
    solver: str = "sparsegpt",
    allocation: str | Plan | Path = "uniform",
    allocation_options: dict | None = None,
    granularity: str = "block",
    min_sparsity: float = 0.0,
    max_sparsity: float = 0.99,
    calibration: str | Path | torch.Tensor = "sample",
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    tokenizer=None,
    device: str | torch.device | None = None,
    batch_size: int | None = None,
    solver_options: dict | None = None,
    passes: str | int = "auto",
    compute_dtype: str = "auto",
    progress: bool = True,
) -> tuple[torch.nn.Module, dict]:
    """Prune ``model`` (a checkpoint path, a bundled name, or a loaded HF causal LM) in place.

    ``calibration`` is a text source (a file, ``"sample"``, ``"wikitext2"``, ``"c4"``)
    or ready token windows ``LongTensor[n, seqlen]``. ``allocation`` is a method name
    (``uniform``, ``owl``, ``alphapruning``), a :class:`Plan`, or the path of a plan
    written by ``prunella allocate --json``. Returns the pruned model and the report,
    a JSON-serialisable dict (see README, "The report"). ``passes`` is 1 (each
    block pruned in a single forward pass over all windows), 2 (a statistics pass, then
    a pass over the pruned block: the papers' protocol) or ``"auto"`` (1 when all
    windows fit in memory as one batch); see :func:`prunella.engine.prune_blocks`.
    ``compute_dtype`` is the dtype of the calibration forward passes (see
    :func:`resolve_compute_dtype`). For a checkpoint on disk, :func:`prune_to_dir` adds
    resuming and models larger than memory.
    """
    started = time.perf_counter()
    timings: dict[str, float] = {}
    if isinstance(pattern, str):
        pattern = parse_pattern(pattern, sparsity)
    chosen = get_solver(solver)
    dev = pick_device(device)
    source = "model object"
    if isinstance(model, str | Path):
        tick = time.perf_counter()
        model, tokenizer, path, adapter = load(model)
        timings["load"] = time.perf_counter() - tick
        source = str(path)
    else:
        adapter = adapter_for(model.config.model_type)

    model_dtype = next(model.parameters()).dtype
    dtype = resolve_compute_dtype(model_dtype, dev, compute_dtype)
    tick = time.perf_counter()
    windows, calib_name = _calibration(model, tokenizer, calibration, nsamples, seqlen, seed)
    batch_size = batch_size or _default_batch_size(windows.shape[1], dev)
    timings["calibration_data"] = time.perf_counter() - tick

    tick = time.perf_counter()
    plan = _resolve_plan(
        model,
        adapter,
        allocation,
        pattern,
        sparsity,
        windows,
        {
            "granularity": granularity,
            "options": allocation_options,
            "min_sparsity": min_sparsity,
            "max_sparsity": max_sparsity,
            "device": dev,
            "dtype": dtype,
            "batch_size": batch_size,
        },
        progress,
    )
    timings["allocation"] = time.perf_counter() - tick

    results, phase_times = prune_blocks(
        model,
        adapter,
        windows,
        plan.patterns(),
        chosen,
        device=dev,
        dtype=dtype,
        batch_size=batch_size,
        solver_options=solver_options,
        one_pass=(passes := choose_passes(passes, model, windows, dev)) == 1,
        progress=progress,
    )
    timings.update(phase_times)
    report = _report(
        model=model,
        source=source,
        chosen=chosen,
        solver_options=solver_options,
        pattern=pattern,
        plan=plan,
        seed=seed,
        calib=calib_name,
        windows=windows,
        dev=dev,
        model_dtype=model_dtype,
        dtype=dtype,
        started=started,
        timings=timings,
        results=[r.as_dict() for r in results],
        extra={"passes": passes},
    )
    return model, report


def available_memory() -> int:
    """Bytes of memory available to new allocations (``MemAvailable``), or 0 if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _fingerprint(recipe: Recipe, path: Path, windows_source: str) -> dict:
    """What determines the pruned weights; a resumed run must match it exactly."""
    import hashlib

    config = (path / "config.json").read_bytes()
    weights = sorted([f.name, f.stat().st_size] for f in path.glob("*.safetensors"))
    fields = recipe.model_dump(exclude={"out", "offload", "model"})
    if recipe.allocation_file:
        fields["allocation_file"] = hashlib.sha256(
            Path(recipe.allocation_file).read_bytes()
        ).hexdigest()
    if Path(recipe.calib).is_file():
        fields["calib"] = hashlib.sha256(Path(recipe.calib).read_bytes()).hexdigest()
    return {
        "model": str(path.resolve()),
        "config_sha256": hashlib.sha256(config).hexdigest(),
        "weights": weights,
        "calibration": windows_source,
        **fields,
        "prunella_version": __version__,
    }


def prune_to_dir(
    recipe: Recipe,
    *,
    overwrite: bool = False,
    resume: bool = False,
    restart: bool = False,
    progress: bool = True,
) -> dict:
    """Prune ``recipe.model`` into ``recipe.out``: resumable, and streamed when asked or needed.

    Progress is kept in ``OUT.partial`` after every block; re-running the same
    recipe continues from the last finished block (``resume=True`` insists on
    it; ``restart=True`` discards it). With ``offload="disk"`` (or ``"auto"`` when
    the checkpoint would take more than half the available memory) only one
    block is in memory at a time. Returns the report.
    """
    from . import export, streaming
    from .resume import WorkDir

    started = time.perf_counter()
    timings: dict[str, float] = {}
    pattern = parse_pattern(recipe.pattern, recipe.sparsity)
    chosen = get_solver(recipe.solver)
    dev = pick_device(recipe.device)
    path, adapter = check_checkpoint(recipe.model)
    out = export.check_out_dir(recipe.out, path, overwrite)
    work = WorkDir(out)
    reader = streaming.CheckpointReader(path)
    offload = recipe.offload
    if offload == "disk" and recipe.eval_data:
        raise PrunellaError(
            "--eval-data needs the whole model in memory; it cannot run with --offload disk "
            "(evaluate the result with 'prunella eval' instead)"
        )
    from .pack import sparsity_format

    if sparsity_format(path):
        if offload == "disk":
            raise PrunellaError(f"{path} is packed: streaming reads dense checkpoints only")
        offload = "none"

    tick = time.perf_counter()
    model = key_map = None
    if offload == "disk" or (offload == "auto" and not recipe.eval_data):
        # Streaming keeps one block in memory and writes the output block by block,
        # so it is the default whenever the checkpoint's layout allows it.
        model = streaming.empty_model(path)
        try:
            key_map = streaming.checkpoint_key_map(model, reader)
        except PrunellaError:
            if offload == "disk":
                raise
            model = None
    if model is not None:
        offload = "disk"
        streaming.materialize(model, "", reader, key_map, skip=adapter.blocks_path)
        assert_finite(model)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
    else:
        offload = "none"
        model, tokenizer, _, _ = load(path)
        key_map = streaming.checkpoint_key_map(model, reader)
    timings["load"] = time.perf_counter() - tick
    model_dtype = next(p for p in model.parameters()).dtype
    dtype = resolve_compute_dtype(model_dtype, dev, recipe.compute_dtype)
    blocks_path = adapter.blocks_path
    passes = choose_passes(recipe.passes, model, (recipe.nsamples, recipe.seqlen), dev)
    # resolved, so that a resume (perhaps on another machine) must match them
    recipe = recipe.model_copy(
        update={"passes": passes, "compute_dtype": str(dtype).removeprefix("torch.")}
    )

    def load_block(i: int, block: torch.nn.Module) -> None:
        if offload == "disk":
            streaming.materialize(block, f"{blocks_path}.{i}.", reader, key_map)
            assert_finite(block, f"{blocks_path}.{i}.")

    def block_tensors(i: int, block: torch.nn.Module) -> dict:
        return streaming.module_tensors(block, f"{blocks_path}.{i}.", key_map)

    # the work folder holds a copy of the pruned blocks; an in-memory run then saves another
    export.check_disk_space(out.resolve().parent, reader.nbytes() * (2 if offload == "none" else 1))
    fingerprint = _fingerprint(recipe, path, describe(recipe.calib))
    if work.exists() and restart:
        work.discard()
    resuming = work.exists()
    if resume and not resuming:
        raise PrunellaError(f"nothing to resume: {work.path} does not exist")
    tick = time.perf_counter()
    if resuming:
        work.check(fingerprint)
        windows, plan, start = work.windows(), Plan(**_plan_fields(work.plan())), work.next_block()
        hidden = work.hidden(start) if start else None
        results = [r for r in work.results() if block_index(r["name"]) < start]
        if offload == "none":  # put the finished blocks' pruned weights back
            inverse = {key: name for name, key in key_map.items()}
            for i in range(start):
                for key, tensor in load_file(work.block_file(i)).items():
                    model.get_parameter(inverse[key]).data.copy_(tensor)
        if progress:
            print(f"resuming {work.path} at block {start}", file=sys.stderr)
    else:
        windows, _ = _calibration(
            model, tokenizer, recipe.calib, recipe.nsamples, recipe.seqlen, recipe.seed
        )
        timings["calibration_data"] = time.perf_counter() - tick
        tick = time.perf_counter()
        hooks = {"before": load_block, "after": lambda i, block: _release(block, offload)}
        plan = _resolve_plan(
            model,
            adapter,
            Path(recipe.allocation_file) if recipe.allocation_file else recipe.allocation,
            pattern,
            recipe.sparsity,
            windows,
            {
                "granularity": recipe.granularity,
                "options": recipe.allocation_options(),
                "min_sparsity": recipe.min_sparsity,
                "max_sparsity": recipe.max_sparsity,
                "device": dev,
                "dtype": dtype,
                "batch_size": recipe.batch_size or _default_batch_size(recipe.seqlen, dev),
            },
            progress,
            visit_hooks=hooks,
        )
        timings["allocation"] = time.perf_counter() - tick
        work.start(fingerprint, windows, plan.to_json())
        start, hidden, results = 0, None, []
        if recipe.eval_data:
            tick = time.perf_counter()
            work.save_json(
                "dense_eval.json", _evaluate_recipe(model, tokenizer, recipe, dev, progress)
            )
            timings["evaluation"] = time.perf_counter() - tick
    if isinstance(pattern, Unstructured):  # the resolved recipe names the sparsity it used
        recipe = recipe.model_copy(update={"sparsity": plan.target})

    if not recipe.eval_data:
        tokenizer = None  # not needed while pruning; the saved copy is read from the source

    def next_block(i: int, block: torch.nn.Module) -> None:
        if offload == "disk" and i == start:
            # the first block's inputs are captured: embeddings and head wait on disk
            streaming.release_outside(model, blocks_path)
        load_block(i, block)

    def finish_block(i: int, block: torch.nn.Module, acts, block_results) -> None:
        results.extend(r.as_dict() for r in block_results)
        work.save_block(i, block_tensors(i, block), acts.hidden, results)
        _release(block, offload)

    try:
        _, phase_times = prune_blocks(
            model,
            adapter,
            windows,
            plan.patterns(),
            chosen,
            device=dev,
            dtype=dtype,
            batch_size=recipe.batch_size or _default_batch_size(windows.shape[1], dev),
            solver_options=recipe.solver_options(),
            one_pass=passes == 1,
            progress=progress,
            start=start,
            hidden=hidden,
            before_block=next_block,
            after_block=finish_block,
        )
    except PrunellaError:
        # A PrunellaError here is a fault of the model itself (NaN or Inf weights or
        # activations): re-running cannot finish it, so a fresh run leaves nothing
        # behind. A resumed run keeps the blocks an earlier run finished.
        if not resuming or work.next_block() == 0:
            work.discard()
        raise
    timings.update(phase_times)
    extra = {"offload": offload, "passes": passes, "resumed_from_block": start}
    if recipe.eval_data:
        tick = time.perf_counter()
        dense_eval = work.load_json("dense_eval.json")
        pruned_eval = _evaluate_recipe(model, tokenizer, recipe, dev, progress)
        extra["evaluation"] = {**pruned_eval, "dense_perplexity": dense_eval["perplexity"]}
        timings["evaluation"] = timings.get("evaluation", 0.0) + time.perf_counter() - tick
    report = _report(
        model=model,
        source=str(path),
        chosen=chosen,
        solver_options=recipe.solver_options(),
        pattern=pattern,
        plan=plan,
        seed=recipe.seed,
        calib=describe(recipe.calib),
        windows=windows,
        dev=dev,
        model_dtype=model_dtype,
        dtype=dtype,
        started=started,
        timings=timings,
        results=results,
        extra=extra,
    )
    try:
        _save_output(
            export,
            model,
            work,
            out,
            report,
            recipe,
            key_map,
            adapter,
            tokenizer,
            path,
            offload,
            overwrite,
        )
    except PrunellaError as exc:
        raise PrunellaError(
            f"{exc}; the pruned blocks are kept in {work.path}: re-run the same command to finish"
        ) from None
    work.discard()
    return report


def _evaluate_recipe(model, tokenizer, recipe: Recipe, dev, progress: bool) -> dict:
    return evaluate(
        model,
        recipe.eval_data,
        seqlen=recipe.seqlen,
        max_windows=recipe.eval_max_windows,
        tokenizer=tokenizer,
        device=dev,
        progress=progress,
    )


def _save_output(
    export, model, work, out, report, recipe, key_map, adapter, tokenizer, path, offload, overwrite
) -> None:
    if recipe.save_format == "packed":
        from .pack import pack

        with tempfile.TemporaryDirectory(prefix=".prunella-dense-", dir=out.resolve().parent) as t:
            dense = Path(t) / out.name
            _save_output(
                export,
                model,
                work,
                dense,
                report,
                recipe.model_copy(update={"save_format": "dense"}),
                key_map,
                adapter,
                tokenizer,
                path,
                offload,
                overwrite=False,
            )
            export.check_out_dir(out, path, overwrite)
            pack(dense, out, overwrite=overwrite, progress=False)
            (out / "recipe.yaml").write_text(recipe.to_yaml(), encoding="utf-8")
        return
    if offload == "disk":
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path)
        from . import streaming

        # read back what release_outside dropped (the blocks come from the work folder)
        streaming.materialize(
            model, "", streaming.CheckpointReader(path), key_map, skip=adapter.blocks_path
        )
        export.save_streamed(
            model, work, out, report, recipe, key_map, adapter, tokenizer, overwrite=overwrite
        )
    else:
        export.save(
            model,
            out,
            report,
            tokenizer=tokenizer,
            overwrite=overwrite,
            model_dir=path,
            recipe=recipe,
        )


def _release(block: torch.nn.Module, offload: str) -> None:
    if offload == "disk":
        from .streaming import release

        release(block)


def _plan_fields(data: dict) -> dict:
    return {k: v for k, v in data.items() if k != "format"}


def evaluate(
    model,
    data: str | Path | torch.Tensor = "sample-eval",
    *,
    seqlen: int = 2048,
    max_windows: int | None = None,
    tokenizer=None,
    reference=None,
    device: str | torch.device | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> dict:
    """Perplexity of ``model`` (a path, a bundled name or a loaded model) on ``data``.

    With ``reference`` (another model, or its path), also the KL divergence from the
    reference's next-token distribution to the model's (``kl_to_reference``, nats per
    token). Models run on ``device`` (in float32 on CPU) without being changed.
    """
    dev = pick_device(device)
    if isinstance(model, str | Path):
        model, tokenizer, _, _ = load(model)
    if isinstance(reference, str | Path):
        reference = load(reference)[0]
    if isinstance(data, torch.Tensor):
        windows = data.long()
    else:
        _check_text_input(model, tokenizer, seqlen)
        windows = evaluation_windows(tokenizer, data, seqlen, max_windows)
    with contextlib.ExitStack() as stack:
        for m in (model, reference):
            if m is not None:
                stack.enter_context(on_device(m, dev, eval_dtype(next(m.parameters()).dtype, dev)))
        result = perplexity(
            model,
            windows,
            reference=reference,
            device=dev,
            batch_size=batch_size,
            progress=progress,
        )
    result["data"] = describe(data) if not isinstance(data, torch.Tensor) else "token windows"
    return result


def load_model(path: str | Path, trust_remote_code: bool = False):
    """``(model, tokenizer)`` from a checkpoint folder (dense or packed) or a bundled name."""
    model, tokenizer, _, _ = load(path, trust_remote_code=trust_remote_code)
    return model, tokenizer
