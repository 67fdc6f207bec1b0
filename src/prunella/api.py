"""The Python API: ``prunella.prune`` and ``prunella.evaluate``.

import prunella
model, report = prunella.prune("smollm2-135m", sparsity=0.5, solver="sparsegpt",
                               nsamples=32, seqlen=512)
prunella.save(model, "out/", report)   # tokenizer copied from the source checkpoint
"""

from __future__ import annotations

import platform
import resource
import time
from pathlib import Path

import torch

from . import __version__
from .adapters import Adapter, adapter_for
from .allocation import GRANULARITIES, Plan, build_plan, get_method, load_plan, method_options
from .data import calibration_windows, describe, evaluation_windows
from .engine import prune_blocks, visit_blocks
from .errors import PrunellaError
from .evaluation import perplexity
from .models import load
from .patterns import Pattern, Unstructured, parse_pattern
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


def compute_dtype(model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The model's own dtype on a GPU; float32 on CPU, where half precision is slow."""
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


def _default_batch_size(seqlen: int) -> int:
    return max(1, 16384 // seqlen)


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
    batch_size: int = 1,
    progress: bool = True,
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
        dtype=compute_dtype(next(model.parameters()).dtype, dev),
        batch_size=batch_size,
        progress=progress,
        desc=f"allocation ({method})",
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
    progress: bool = True,
) -> tuple[torch.nn.Module, dict]:
    """Prune ``model`` (a checkpoint path, a bundled name, or a loaded HF causal LM) in place.

    ``calibration`` is a text source (a file, ``"sample"``, ``"wikitext2"``, ``"c4"``)
    or ready token windows ``LongTensor[n, seqlen]``. ``allocation`` is a method name
    (``uniform``, ``owl``, ``alphapruning``), a :class:`Plan`, or the path of a plan
    written by ``prunella allocate --json``. Returns the pruned model and the report,
    a JSON-serialisable dict (see README, "The report").
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

    tick = time.perf_counter()
    windows, calib_name = _calibration(model, tokenizer, calibration, nsamples, seqlen, seed)
    nsamples, seqlen = windows.shape
    batch_size = batch_size or _default_batch_size(seqlen)
    timings["calibration_data"] = time.perf_counter() - tick

    tick = time.perf_counter()
    if isinstance(allocation, Plan):
        plan = allocation
    elif isinstance(allocation, Path) or str(allocation).endswith(".json"):
        plan = load_plan(allocation, prunable_layers(model, adapter), sparsity)
    else:
        plan = allocate(
            model,
            adapter,
            str(allocation),
            pattern,
            windows=windows,
            granularity=granularity,
            options=allocation_options,
            min_sparsity=min_sparsity,
            max_sparsity=max_sparsity,
            device=dev,
            batch_size=batch_size,
            progress=progress,
        )
    timings["allocation"] = time.perf_counter() - tick

    model_dtype = next(model.parameters()).dtype
    dtype = compute_dtype(model_dtype, dev)
    layers, phase_times = prune_blocks(
        model,
        adapter,
        windows,
        plan.patterns(),
        chosen,
        device=dev,
        dtype=dtype,
        batch_size=batch_size,
        solver_options=solver_options,
        progress=progress,
    )
    timings.update(phase_times)
    total = sum(r.shape[0] * r.shape[1] for r in layers)
    zeros = sum(r.sparsity * r.shape[0] * r.shape[1] for r in layers)
    report = {
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
            "source": calib_name,
            "nsamples": nsamples,
            "seqlen": seqlen,
            "tokens": nsamples * seqlen,
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
        "layers": [
            {
                "name": r.name,
                "shape": list(r.shape),
                "pattern": r.pattern,
                "target_sparsity": r.target_sparsity,
                "sparsity": r.sparsity,
                "rel_error": r.rel_error,
                **r.info,
            }
            for r in layers
        ],
    }
    return model, report


def evaluate(
    model,
    data: str | Path | torch.Tensor = "sample-eval",
    *,
    seqlen: int = 2048,
    max_windows: int | None = None,
    tokenizer=None,
    device: str | torch.device | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> dict:
    """Perplexity of ``model`` (a path, a bundled name or a loaded model) on ``data``.

    A loaded model is moved to ``device`` (and to float32 on CPU) in place.
    """
    dev = pick_device(device)
    if isinstance(model, str | Path):
        model, tokenizer, _, _ = load(model)
    if isinstance(data, torch.Tensor):
        windows = data.long()
    else:
        _check_text_input(model, tokenizer, seqlen)
        windows = evaluation_windows(tokenizer, data, seqlen, max_windows)
    dtype = compute_dtype(next(model.parameters()).dtype, dev)
    model.to(device=dev, dtype=dtype)
    result = perplexity(model, windows, device=dev, batch_size=batch_size, progress=progress)
    result["data"] = describe(data) if not isinstance(data, torch.Tensor) else "token windows"
    return result
