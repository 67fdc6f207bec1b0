"""The ``prunella`` command line: thin, flags -> :class:`~prunella.recipe.Recipe`, printing only.

``prune`` and ``allocate`` take their flags from the recipe's fields (one list of
options, :mod:`prunella.recipe`); each method's own options are given as
``--solver-opt``, ``--allocation-opt`` and ``--rows-opt KEY=VALUE`` (``prunella methods``
lists them). Every user mistake ends as one line on stderr (``error: ...``) and
exit status 2, before anything is written; progress bars go to stderr, results to
stdout.
"""

from __future__ import annotations

import json
import sys
import types
import typing
from pathlib import Path
from typing import Annotated

import click
import typer

from .engine.heap import limit_heap_growth
from .errors import PrunellaError
from .recipe import METHOD_FIELDS, Recipe

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="One-shot pruning of Hugging Face causal language models.",
)

TEXT_FIELD_HELP = "The text field of JSONL/Parquet/datasets records (or chat messages)."
# the recipe fields that `prunella allocate` takes (the rest concern pruning and saving)
ALLOCATE_FIELDS = (
    "sparsity",
    "pattern",
    "solver",
    "allocation",
    "granularity",
    "min_sparsity",
    "max_sparsity",
    "calib",
    "text_field",
    "nsamples",
    "seqlen",
    "seed",
    "device",
    "batch_size",
    "offload",
    "compute_dtype",
)


def _click_type(annotation):
    """The click type of a recipe field's annotation (``X | None`` is ``X``)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return click.Choice([str(a) for a in typing.get_args(annotation)])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return _click_type(args[0])
    return {float: float, int: int, str: str}.get(annotation, str)


def recipe_flags(fields) -> list[click.Option]:
    """One flag per recipe field (default ``None``: from the recipe, or its default), and
    ``--solver-opt``/``--allocation-opt``/``--rows-opt`` next to the method flags."""
    flags = []
    for name in fields:
        field = Recipe.model_fields[name]
        flag = "--" + name.replace("_", "-")
        default = field.default.name if name in METHOD_FIELDS else field.default
        shown = f" [{default}]" if default is not None else ""
        names = [flag, "-o"] if name == "out" else [flag]
        if name in METHOD_FIELDS:
            flags.append(click.Option(names, help=field.description + shown))
            flags.append(
                click.Option(
                    [flag + "-opt"],
                    multiple=True,
                    metavar="KEY=VALUE",
                    help=f"An option of the chosen {name} (repeatable; see 'prunella methods').",
                )
            )
        else:
            flags.append(
                click.Option(
                    names, type=_click_type(field.annotation), help=field.description + shown
                )
            )
    return flags


def _build_recipe(recipe_file, **values) -> Recipe:
    from .recipe import build
    from .registry import parse_pairs

    options = {
        f"{field}_options": parse_pairs(values.pop(f"{field}_opt", ()), f"--{field}-opt")
        for field in METHOD_FIELDS
    }
    return build(recipe_file, **options, **values)


def _check_early(recipe: Recipe, overwrite: bool) -> None:
    """Everything a user can get wrong, checked before any weight is read."""
    from . import data
    from .engine.device import pick_device
    from .io.checkpoint import check_checkpoint
    from .io.folders import check_out_dir
    from .methods.sparsity.patterns import parse_pattern

    if recipe.model is None:
        raise PrunellaError("missing MODEL: give it as the first argument or in the recipe")
    parse_pattern(recipe.pattern, recipe.sparsity)
    pick_device(recipe.device)
    data.check_source(recipe.calib, recipe.text_field)
    if recipe.eval_data is not None:
        data.check_source(recipe.eval_data, recipe.text_field, split="test")
    path, _ = check_checkpoint(recipe.model)
    if recipe.out is not None:
        check_out_dir(recipe.out, path, overwrite)
    if recipe.allocation_file is not None and not Path(recipe.allocation_file).is_file():
        raise PrunellaError(f"allocation file {recipe.allocation_file} not found")


def prune_command(model, recipe, resume, restart, overwrite, quiet, **values) -> None:
    """Prune MODEL and write a Hugging Face checkpoint, prune_report.json, report.html,
    allocation.png and recipe.yaml to --out. Progress is kept in OUT.partial: re-running
    the same command after a crash continues from the last finished block."""
    if quiet:
        _quiet_transformers()
    from .pipeline import run

    options = _build_recipe(recipe, model=model, **values)
    if options.out is None:
        raise PrunellaError("missing --out: give it on the command line or in the recipe")
    _check_early(options, overwrite)
    _, report = run(
        options, overwrite=overwrite, resume=resume, restart=restart, progress=not quiet
    )
    typer.echo(
        f"pruned {report['prunable_parameters']:,} weights to {report['sparsity']:.2%} sparsity "
        f"({report['pattern']}, {report['solver']}, {report['allocation']['method']} allocation, "
        f"{report['rows']} rows) "
        f"in {report['wall_seconds']:.1f}s -> {options.out}"
    )
    notes = report["notes"]
    for note in notes[:5]:
        typer.echo(f"note: {note}", err=True)
    if len(notes) > 5:
        typer.echo(f"note: ... and {len(notes) - 5} more in prune_report.json", err=True)
    if "evaluation" in report:
        ev = report["evaluation"]
        typer.echo(
            f"perplexity on {ev['data']}: dense {ev['dense_perplexity']:.3f} -> pruned "
            f"{ev['perplexity']:.3f} ({ev['tokens']:,} tokens)"
        )


def allocate_command(model, recipe, json_out, quiet, **values) -> None:
    """Print the sparsity plan an allocation method gives MODEL, without pruning."""
    if quiet:
        _quiet_transformers()
    from .engine.adapters import block_index
    from .engine.device import pick_device, resolve_compute_dtype
    from .engine.prune import default_batch_size
    from .engine.stats import WEIGHTS
    from .engine.store import open_store
    from .methods.allocation import get_method
    from .methods.sparsity.patterns import parse_pattern
    from .pipeline import calibrate, make_plan

    options = _build_recipe(recipe, model=model, **values)
    _check_early(options, overwrite=False)
    pattern = parse_pattern(options.pattern, options.sparsity)
    dev = pick_device(options.device)
    store, tokenizer = open_store(options.model, options.offload)
    method = get_method(options.allocation.name)
    needs_data = method.needs - {WEIGHTS} or hasattr(method.module, "search")
    windows = calibrate(options, store, tokenizer)[0] if needs_data else None
    dtype = resolve_compute_dtype(next(store.model.parameters()).dtype, dev, options.compute_dtype)
    batch_size = options.batch_size or default_batch_size(options.seqlen, dev)
    plan = make_plan(options, store, pattern, windows, dev, dtype, batch_size, not quiet)
    sizes = {n: r * c for n, (r, c) in store.layers().items()}
    per_block: dict[int, list[float]] = {}
    for name, value in plan.sparsity.items():
        entry = per_block.setdefault(block_index(name), [0.0, 0.0])
        entry[0] += value * sizes[name]
        entry[1] += sizes[name]
    metric_by_block: dict[int, list[float]] = {}
    for unit, value in plan.metric.items():
        metric_by_block.setdefault(block_index(unit + "."), []).append(value)
    header = f"{'block':>5}  {'sparsity':>8}"
    if plan.metric_name:
        header += f"  {plan.metric_name:>14}"
    typer.echo(f"{plan.method} allocation, target {plan.target:.2%} ({pattern})")
    typer.echo(header)
    for b in sorted(per_block):
        line = f"{b:>5}  {per_block[b][0] / per_block[b][1]:>8.2%}"
        if plan.metric_name and b in metric_by_block:
            values = metric_by_block[b]
            line += f"  {sum(values) / len(values):>14.4f}"
        typer.echo(line)
    achieved = sum(plan.sparsity[n] * sizes[n] for n in sizes) / sum(sizes.values())
    typer.echo(f"overall {achieved:.4%} of {sum(sizes.values()):,} prunable weights")
    if json_out is not None:
        plan.save(json_out)
        typer.echo(f"plan written to {json_out}")


MODEL_ARGUMENT = click.Argument(["model"], required=False)
RECIPE_FLAG = click.Option(
    ["--recipe", "recipe"],
    type=click.Path(path_type=Path),
    help="YAML file of options; flags given here override it.",
)
QUIET_FLAG = click.Option(["--quiet"], is_flag=True, help="No progress bars.")


def _command(name: str, callback, params: list) -> click.Command:
    return click.Command(name, callback=callback, params=params, help=callback.__doc__)


PRUNE = _command(
    "prune",
    prune_command,
    [
        MODEL_ARGUMENT,
        RECIPE_FLAG,
        *recipe_flags(f for f in Recipe.model_fields if f != "model"),
        click.Option(["--resume"], is_flag=True, help="Insist on resuming OUT.partial."),
        click.Option(["--restart"], is_flag=True, help="Discard OUT.partial and start over."),
        click.Option(["--overwrite"], is_flag=True, help="Replace a non-empty output folder."),
        QUIET_FLAG,
    ],
)
ALLOCATE = _command(
    "allocate",
    allocate_command,
    [
        MODEL_ARGUMENT,
        RECIPE_FLAG,
        *recipe_flags(ALLOCATE_FIELDS),
        click.Option(
            ["--json", "json_out"],
            type=click.Path(path_type=Path),
            help="Write the plan here (for prune --allocation-file).",
        ),
        QUIET_FLAG,
    ],
)


@app.command("methods")
def methods_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Every solver, allocation and row method: its paper, what it needs, its options."""
    from .recipe import registry

    listing = {
        field: [
            {
                "name": method.name,
                "paper": method.paper,
                "needs": sorted(method.needs),
                "options": [
                    {
                        "name": o.name,
                        "type": o.type.__name__,
                        "default": o.default,
                        "allowed": o.bounds(),
                        "help": o.help,
                    }
                    for o in method.options
                ],
            }
            for method in map(registry(field).get, registry(field).names())
        ]
        for field in METHOD_FIELDS
    }
    if as_json:
        typer.echo(json.dumps(listing))
        return
    for kind, methods in listing.items():
        typer.echo(f"{kind} (--{kind} NAME, --{kind}-opt KEY=VALUE):")
        for m in methods:
            needs = f" [needs: {', '.join(m['needs'])}]" if m["needs"] else ""
            typer.echo(f"  {m['name']}{needs}\n      {m['paper']}")
            for o in m["options"]:
                allowed = f", {o['allowed']}" if o["allowed"] else ""
                typer.echo(
                    f"      {o['name']} ({o['type']}, default {o['default']}{allowed}): {o['help']}"
                )
        typer.echo("")


@app.command("eval")
def eval_command(
    model: Annotated[
        str, typer.Argument(help="Checkpoint folder (dense or packed), or a bundled name.")
    ],
    data: Annotated[
        str,
        typer.Option(
            help="Text: a text, JSONL or Parquet file, a datasets folder, 'sample-eval' "
            "(shipped, held out), wikitext2 or c4."
        ),
    ] = "sample-eval",
    text_field: Annotated[str, typer.Option(help=TEXT_FIELD_HELP)] = "text",
    seqlen: Annotated[int, typer.Option(help="Tokens per window.")] = 2048,
    max_windows: Annotated[
        int | None, typer.Option(help="Evaluate at most this many windows.")
    ] = None,
    reference: Annotated[
        str | None, typer.Option(help="Dense model to measure the KL divergence to.")
    ] = None,
    tasks: Annotated[
        str | None, typer.Option(help="Zero-shot lm-eval tasks, comma-separated (needs lm-eval).")
    ] = None,
    task_path: Annotated[
        Path | None, typer.Option(help="Folder of extra lm-eval task YAML files (local tasks).")
    ] = None,
    limit: Annotated[
        int | None, typer.Option(help="lm-eval: at most this many examples per task.")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Perplexity of MODEL on non-overlapping windows of a text; KL to a reference; zero-shot
    tasks through lm-eval."""
    if quiet:
        _quiet_transformers()
    from . import data as data_module
    from .engine.device import pick_device
    from .io.checkpoint import check_checkpoint
    from .io.models import load
    from .report.evaluation import evaluate, zero_shot

    if seqlen < 2:
        raise PrunellaError(f"--seqlen must be at least 2, got {seqlen}")
    if max_windows is not None and max_windows < 1:
        raise PrunellaError(f"--max-windows must be at least 1, got {max_windows}")
    if batch_size < 1:
        raise PrunellaError(f"--batch-size must be at least 1, got {batch_size}")
    if task_path is not None and not task_path.is_dir():
        raise PrunellaError(f"--task-path {task_path} is not a folder")
    dev = pick_device(device)
    data_module.check_source(data, text_field, split="test")
    path, _ = check_checkpoint(model)
    ref_path = check_checkpoint(reference)[0] if reference is not None else None
    hf_model, tokenizer, _, _ = load(path)
    result = evaluate(
        hf_model,
        data,
        seqlen=seqlen,
        max_windows=max_windows,
        text_field=text_field,
        tokenizer=tokenizer,
        reference=ref_path,
        device=dev,
        batch_size=batch_size,
        progress=not quiet,
    )
    result["model"] = str(path)
    if tasks:
        names = [t.strip() for t in tasks.split(",") if t.strip()]
        result["tasks"] = zero_shot(
            hf_model,
            tokenizer,
            names,
            include_path=str(task_path) if task_path else None,
            limit=limit,
            device=str(dev),
        )
    if as_json:
        typer.echo(json.dumps(result))
        return
    line = (
        f"perplexity {result['perplexity']:.3f} on {result['tokens']:,} tokens "
        f"({result['windows']} windows of {result['seqlen']})"
    )
    if "kl_to_reference" in result:
        line += f", KL to reference {result['kl_to_reference']:.4f} nats/token"
    typer.echo(line)
    for task, metrics in result.get("tasks", {}).items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if not k.endswith("stderr"))
        typer.echo(f"{task}: {shown}")


@app.command("pack")
def pack_command(
    model: Annotated[str, typer.Argument(help="A dense checkpoint folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for the packed copy.")],
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output folder.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Write a packed (sparse-bitmask) copy of a pruned checkpoint: about half the bytes at 50%."""
    from .io.checkpoint import check_checkpoint
    from .io.pack import pack

    path, _ = check_checkpoint(model)
    stats = pack(path, out, overwrite=overwrite, progress=not quiet)
    typer.echo(
        f"packed {stats['packed_weights']:,} weights ({stats['global_sparsity']:.2%} "
        f"sparse): {stats['dense_bytes'] / 2**20:.1f} MiB -> {stats['bytes'] / 2**20:.1f} "
        f"MiB ({stats['bytes'] / stats['dense_bytes']:.1%}) -> {out}"
    )


@app.command("heapr")
def heapr_command(
    model: Annotated[str, typer.Argument(help="A mixture-of-experts checkpoint folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")],
    ratio: Annotated[
        float, typer.Option(help="Fraction of the routed experts' atomic experts to remove.")
    ] = 0.25,
    uniform: Annotated[
        bool,
        typer.Option(
            help="Remove the same number from every expert: the saved experts are smaller "
            "(else the paper's global ranking, written as zeros)."
        ),
    ] = False,
    calib: Annotated[str, typer.Option(help="Calibration text (as for prune).")] = "sample",
    nsamples: Annotated[int, typer.Option(help="Calibration windows.")] = 128,
    seqlen: Annotated[int, typer.Option(help="Tokens per window.")] = 2048,
    seed: Annotated[int, typer.Option(help="Seed for drawing the windows.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output folder.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Remove atomic experts (one neuron of one expert) by HEAPr's output-space score."""
    from .methods.heapr import heapr_to_dir

    _quiet_transformers()
    report = heapr_to_dir(
        model, out, ratio=ratio, uniform=uniform, calib=calib, nsamples=nsamples,
        seqlen=seqlen, seed=seed, device=device, overwrite=overwrite, progress=not quiet,
    )  # fmt: skip
    typer.echo(
        f"HEAPr removed {report['atomic_experts_removed']:,} of {report['atomic_experts']:,} "
        f"atomic experts ({report['ranking']} ranking, written as {report['written_as']}): "
        f"expert parameters {report['expert_parameters_before']:,} -> "
        f"{report['expert_parameters_after']:,} in {report['seconds']:.1f}s -> {out}"
    )


@app.command("search-worker")
def search_worker_command(
    storage: Annotated[
        str,
        typer.Option(
            help="The search's optuna storage URL (e.g. postgresql://...).",
            envvar="PRUNELLA_SEARCH_STORAGE",
        ),
    ],
    study: Annotated[str, typer.Option(help="The study's name (printed by the search).")],
    model: Annotated[
        str | None, typer.Option(help="The model's folder, where it differs from the search's.")
    ] = None,
    folder: Annotated[
        str | None,
        typer.Option(help="The level database's folder, where it differs from the search's."),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    parent: Annotated[
        int | None, typer.Option(help="Stop when this process is gone.", hidden=True)
    ] = None,
    quiet: Annotated[bool, typer.Option(help="No messages.")] = False,
) -> None:
    """Join an allocation search (evopress, tpe, dsa) and evaluate its candidates until it ends."""
    import os

    import torch

    from .methods.search import run_worker

    _quiet_transformers()
    if os.environ.get("PRUNELLA_THREADS"):
        torch.set_num_threads(int(os.environ["PRUNELLA_THREADS"]))
    count = run_worker(storage, study, model=model, folder=folder, device=device, parent=parent)
    if not quiet:
        typer.echo(f"search-worker: evaluated {count} candidate(s) of {study}")


@app.command("unpack")
def unpack_command(
    packed: Annotated[
        Path,
        typer.Argument(
            help="A packed checkpoint (Prunella's, or legacy "
            "compressed-tensors sparse-bitmask/sparse-24-bitmask)."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for the dense copy.")],
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output folder.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Inflate a packed checkpoint back to a plain Hugging Face checkpoint."""
    from .io.pack import unpack

    unpack(packed, out, overwrite=overwrite, progress=not quiet)
    typer.echo(f"unpacked {packed} -> {out}")


@app.command("inspect")
def inspect_command(
    model: Annotated[str, typer.Argument(help="Any checkpoint folder: dense, packed or legacy.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Per-layer sparsity and pattern of a checkpoint, pruned by Prunella or not."""
    from .report.summary import checkpoint_summary

    summary = checkpoint_summary(model)
    if as_json:
        typer.echo(json.dumps(summary))
        return
    width = max((len(r["name"]) for r in summary["layers"]), default=5)
    typer.echo(f"{'layer':<{width}}  {'shape':>11}  {'sparsity':>8}  pattern")
    for r in summary["layers"]:
        shape = f"{r['shape'][0]}x{r['shape'][1]}"
        typer.echo(f"{r['name']:<{width}}  {shape:>11}  {r['sparsity']:>8.2%}  {r['pattern']}")
    typer.echo(
        f"{summary['format']} checkpoint, {summary['bytes'] / 2**20:.1f} MiB; "
        f"{summary['sparsity']:.2%} of {summary['prunable_parameters']:,} prunable "
        "weights are zero"
    )


@app.command("compare")
def compare_command(
    models_: Annotated[
        list[str],
        typer.Argument(metavar="MODELS...", help="Checkpoints; the first is the reference for KL."),
    ],
    data: Annotated[str, typer.Option(help="Evaluation text (as for 'prunella eval').")] = (
        "sample-eval"
    ),
    text_field: Annotated[str, typer.Option(help=TEXT_FIELD_HELP)] = "text",
    seqlen: Annotated[int, typer.Option(help="Tokens per window.")] = 2048,
    max_windows: Annotated[
        int | None, typer.Option(help="Evaluate at most this many windows.")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON array.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """One table for several checkpoints: perplexity, KL to the first, sparsity, size on disk."""
    if quiet:
        _quiet_transformers()
    from . import data as data_module
    from .engine.device import pick_device
    from .io.checkpoint import check_checkpoint
    from .io.models import load
    from .report.evaluation import evaluate
    from .report.summary import checkpoint_summary

    if seqlen < 2:
        raise PrunellaError(f"--seqlen must be at least 2, got {seqlen}")
    dev = pick_device(device)
    data_module.check_source(data, text_field, split="test")
    paths = [check_checkpoint(m)[0] for m in models_]
    reference, tokenizer, _, _ = load(paths[0])
    rows = []
    for i, path in enumerate(paths):
        model = reference if i == 0 else load(path)[0]
        result = evaluate(
            model,
            data,
            seqlen=seqlen,
            max_windows=max_windows,
            text_field=text_field,
            tokenizer=tokenizer,
            reference=None if i == 0 else reference,
            device=dev,
            progress=not quiet,
        )
        summary = checkpoint_summary(path)
        rows.append(
            {
                "model": str(path),
                "perplexity": result["perplexity"],
                "kl_to_first": result.get("kl_to_reference", 0.0),
                "sparsity": summary["sparsity"],
                "format": summary["format"],
                "mib": summary["bytes"] / 2**20,
                "tokens": result["tokens"],
            }
        )
        del model
    if as_json:
        typer.echo(json.dumps(rows))
        return
    width = max(len(r["model"]) for r in rows)
    typer.echo(f"{'model':<{width}}  {'ppl':>9}  {'KL':>8}  {'sparsity':>8}  {'MiB':>8}  format")
    for r in rows:
        typer.echo(
            f"{r['model']:<{width}}  {r['perplexity']:>9.3f}  {r['kl_to_first']:>8.4f}  "
            f"{r['sparsity']:>8.2%}  {r['mib']:>8.1f}  {r['format']}"
        )


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI, turning user mistakes into one line and exit status 2."""
    limit_heap_growth()
    command = typer.main.get_command(app)
    command.add_command(PRUNE)
    command.add_command(ALLOCATE)
    try:
        result = command.main(args=argv, prog_name="prunella", standalone_mode=False)
    except PrunellaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # typer carries a click of its own for the typer commands; prune and allocate are
    # built with click itself, so both families of exceptions can arrive here
    except (click.exceptions.Exit, typer.Exit) as exc:  # --help
        return exc.exit_code
    except (click.Abort, typer.Abort):
        print("error: interrupted", file=sys.stderr)
        return 130
    except (click.ClickException, typer.TyperException) as exc:  # bad values, missing arguments
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        if not argv and not sys.argv[1:]:  # no command at all: the usage, as help
            print(message, file=sys.stderr)
        else:
            print(f"error: {message}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
