"""The Python API: ``prunella.prune``, ``prunella.prune_to_dir``, ``prunella.evaluate``,
``prunella.load``.

    import prunella
    model, report = prunella.prune("smollm2-135m", sparsity=0.5, solver="sparsegpt",
                                   nsamples=32, seqlen=512)
    prunella.save(model, "out/", report)   # tokenizer copied from the source checkpoint

The keyword arguments are the recipe's options (:class:`prunella.Recipe`, the same
as ``prunella prune``'s flags); both functions run the one pipeline
(:mod:`prunella.pipeline`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import PrunellaError
from .io.models import load
from .methods.heapr import check_ratio, heapr
from .methods.plan import Plan
from .pipeline import allocate_only, run
from .recipe import Recipe, build
from .report.evaluation import evaluate

__all__ = ["allocate", "evaluate", "heapr_to_dir", "load_model", "prune", "prune_to_dir"]


def prune(
    model,
    *,
    calibration: str | Path | torch.Tensor | None = None,
    allocation: str | dict | Plan | Path | None = None,
    tokenizer=None,
    progress: bool = True,
    **options,
) -> tuple[torch.nn.Module, dict]:
    """Prune ``model`` (a checkpoint path, a bundled name, or a loaded HF causal LM) in
    memory; returns the pruned model and the report (a JSON-serialisable dict).

    ``options`` are the recipe's (``sparsity``, ``pattern``, ``solver``, ``nsamples``,
    ``seqlen``, ``passes``, ... and every axis's own); a method field (``solver``,
    ``allocation``, ``rows``, ...) is a method's name or ``{"name": ..., "options":
    {...}}``, and ``FIELD_options`` (``solver_options``, ...) adds options.
    ``calibration`` is a text source (a file, ``"sample"``, ``"wikitext2"``, ``"c4"``) or
    ready token windows ``LongTensor[n, seqlen]``; ``allocation`` may also be a
    :class:`Plan` or the path of a plan file. For a checkpoint on disk,
    :func:`prune_to_dir` adds resuming and models larger than memory.
    """
    if options.get("out") is not None:
        raise PrunellaError(
            "prunella.prune returns the model in memory: save it with prunella.save, "
            "or use prunella.prune_to_dir to prune a checkpoint into an output folder"
        )
    windows = calibration if isinstance(calibration, torch.Tensor) else None
    if calibration is not None and windows is None:
        options["calib"] = str(calibration)
    plan = allocation if isinstance(allocation, Plan) else None
    if plan is None:
        _allocation(allocation, options)
    loaded = model if isinstance(model, torch.nn.Module) else None
    if loaded is None:
        options["model"] = str(model)
    recipe = build(**options)
    store, report = run(
        recipe, model=loaded, tokenizer=tokenizer, windows=windows, plan=plan, progress=progress
    )
    return store.model, report


def allocate(
    model,
    *,
    calibration: str | Path | torch.Tensor | None = None,
    tokenizer=None,
    progress: bool = True,
    **options,
) -> Plan:
    """The plan the recipe's allocation gives ``model`` (a checkpoint path, a bundled
    name, or a loaded model), without compressing: ``prunella allocate``. ``options``
    and ``calibration`` are as for :func:`prune`; ``plan.save(path)`` writes it for
    ``allocation=path``."""
    windows = calibration if isinstance(calibration, torch.Tensor) else None
    if calibration is not None and windows is None:
        options["calib"] = str(calibration)
    loaded = model if isinstance(model, torch.nn.Module) else None
    if loaded is None:
        options["model"] = str(model)
    plan, _ = allocate_only(
        build(**options), model=loaded, tokenizer=tokenizer, windows=windows, progress=progress
    )
    return plan


def prune_to_dir(
    recipe: Recipe | str | Path | None = None,
    *,
    overwrite: bool = False,
    resume: bool = False,
    restart: bool = False,
    progress: bool = True,
    **options,
) -> dict:
    """Prune ``recipe.model`` into ``recipe.out`` (a :class:`Recipe`, a recipe file, or the
    options as keyword arguments, which override the recipe's; ``allocation`` may be the
    path of a plan file, as for :func:`prune`); returns the report.

    Progress is kept in ``OUT.partial`` after every block; re-running the same recipe
    continues from the last finished block (``resume=True`` insists on it,
    ``restart=True`` discards it). By default (``offload="auto"``) the checkpoint is
    streamed, one block in memory at a time.
    """
    _allocation(options.pop("allocation", None), options)
    if isinstance(recipe, Recipe):
        recipe = build(**{**recipe.model_dump(), **options})
    else:
        recipe = build(recipe, **options)
    _, report = run(recipe, overwrite=overwrite, resume=resume, restart=restart, progress=progress)
    return report


def heapr_to_dir(
    model: str | Path,
    out: str | Path,
    *,
    ratio: float = 0.25,
    uniform: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    **options,
) -> dict:
    """Prune the checkpoint ``model`` with HEAPr (:func:`prunella.heapr`) into ``out``
    (written atomically, in the checkpoint's dtype, with ``heapr_report.json``),
    calibrated as the recipe ``options`` say (``calib``, ``nsamples``, ``seqlen``,
    ``seed``, ``text_field``, ``device``); returns the report. The scores are computed in
    float32 on the device (``auto``: a GPU when there is one)."""
    from .data import calibration, check_token_ids
    from .engine.device import pick_device
    from .io.checkpoint import check_checkpoint, check_dense
    from .io.folders import atomic_folder, check_out_dir, write_json

    check_ratio(ratio)  # bad input stops before the model is read
    recipe = build(model=str(model), out=str(out), **options)
    device = pick_device(recipe.device)
    path = check_checkpoint(recipe.model)[0]
    check_dense(path)
    out = check_out_dir(recipe.out, path, overwrite)
    hf_model, tokenizer, path, _ = load(recipe.model)
    dtype = next(hf_model.parameters()).dtype  # the checkpoint's: scored in float32, saved so
    hf_model.to(device=device, dtype=torch.float32)
    windows, calib_info = calibration(
        tokenizer, recipe.calib, recipe.nsamples, recipe.seqlen, recipe.seed,
        getattr(hf_model.config, "max_position_embeddings", None), recipe.text_field,
    )  # fmt: skip
    check_token_ids(windows, hf_model)
    report = heapr(hf_model, windows, ratio, uniform, recipe.batch_size or 1, progress)
    report |= {"model": str(path), "calibration": calib_info}
    hf_model.to(device="cpu", dtype=dtype)
    with atomic_folder(out) as tmp:
        hf_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / "heapr_report.json", report)
    return report


def _allocation(allocation, options: dict) -> None:
    """``allocation`` as the recipe takes it: a plan file's path, or a method (name or
    ``{name, options}``)."""
    if isinstance(allocation, Path) or str(allocation).endswith(".json"):
        options["allocation_file"] = str(allocation)
    elif allocation is not None:
        options["allocation"] = allocation


def load_model(path: str | Path, trust_remote_code: bool = False):
    """``(model, tokenizer)`` from a checkpoint folder (dense or packed) or a bundled name."""
    model, tokenizer, _, _ = load(path, trust_remote_code=trust_remote_code)
    return model, tokenizer
