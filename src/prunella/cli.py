"""The ``prunella`` command line: thin, flags -> :class:`~prunella.recipe.Recipe`, printing only.

Every flag that names a recipe option is made from the recipe's field (one list of
options, :mod:`prunella.recipe`, the compression axes' fields included): ``prune``
and ``allocate`` take them all, and ``eval``, ``compare``, ``heapr`` and
``search-worker`` take the few they share (``--calib``, ``--seqlen``, ``--device``,
...) from the same declaration. Each method's own options are given as
``--FIELD-opt KEY=VALUE`` (``--solver-opt``, ``--allocation-opt``, ...; ``prunella
methods`` lists them). Every user mistake ends as one line on stderr (``error:
...``) and exit status 2, before anything is written; progress bars go to stderr,
results to stdout.
"""

from __future__ import annotations

import json
import sys
import types
import typing
from pathlib import Path

import click

from .engine.heap import limit_heap_growth
from .errors import PrunellaError

# recipe fields that concern compressing and saving, not `prunella allocate`
PRUNE_ONLY = (
    "out", "allocation_file", "expert_min_tokens", "passes", "eval_data", "eval_max_windows",
)  # fmt: skip


def _click_type(annotation, aliases=()):
    """The click type of a recipe field's annotation (``X | None`` is ``X``); a choice
    also takes ``aliases`` (earlier names of its values)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return click.Choice([*(str(a) for a in typing.get_args(annotation)), *aliases])
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return _click_type(args[0])
    return {float: float, int: int, str: str}.get(annotation, str)


def recipe_flags(fields, own_defaults: bool = False, helps: dict | None = None) -> list:
    """One flag per recipe field, and ``--FIELD-opt`` next to a field that names a method.
    The default is ``None`` (from the recipe, or its default), or with ``own_defaults``
    the field's default (a command that reads no recipe); ``helps`` words a flag for
    another use (``--seqlen`` of an evaluation)."""
    from .recipe import FORMAT_ALIASES, METHOD_FIELDS, Recipe

    flags = []
    for name in fields:
        field = Recipe.model_fields[name]
        flag = "--" + name.replace("_", "-")
        default = field.default.name if name in METHOD_FIELDS else field.default
        shown = f" [{default}]" if default is not None else ""
        names = {"out": [flag, "-o"], "format": [flag, "--save-format"]}.get(name, [flag])
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
                    names,
                    type=_click_type(field.annotation, FORMAT_ALIASES if name == "format" else ()),
                    default=default if own_defaults else None,
                    help=(helps or {}).get(name, field.description)
                    + ("" if own_defaults else shown),
                    show_default=own_defaults,
                )
            )
    return flags


def _build_recipe(recipe_file, **values):
    from .recipe import METHOD_FIELDS, build
    from .registry import parse_pairs

    options = {
        field: parse_pairs(values.pop(f"{field}_opt", ()), f"--{field.replace('_', '-')}-opt")
        for field in METHOD_FIELDS
        if f"{field}_opt" in values
    }
    return build(recipe_file, method_options=options, **values)


def _check_early(recipe, overwrite: bool) -> None:
    """Everything a user can get wrong, checked before any weight is read."""
    from . import data
    from .engine.device import pick_device
    from .io.checkpoint import check_checkpoint, check_dense
    from .io.folders import check_out_dir
    from .methods import AXES

    if recipe.model is None:
        raise PrunellaError("missing MODEL: give it as the first argument or in the recipe")
    AXES.budgets(recipe)
    pick_device(recipe.device)
    data.check_source(recipe.calib, recipe.text_field)
    if recipe.eval_data is not None:
        data.check_source(recipe.eval_data, recipe.text_field, split="test")
    path, _ = check_checkpoint(recipe.model)
    check_dense(path)
    if recipe.out is not None:
        check_out_dir(recipe.out, path, overwrite)
    if recipe.allocation_file is not None and not Path(recipe.allocation_file).is_file():
        raise PrunellaError(f"--allocation-file {recipe.allocation_file!r} not found")


def prune_command(model, recipe, resume, restart, overwrite, quiet, **values) -> None:
    """Compress MODEL and write a Hugging Face checkpoint, prune_report.json, report.html,
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
    axes = dict(report["axes"])
    done = [axes.pop("structure")["summary"]] if "structure" in axes else []  # a cut first
    if axes:
        summaries = "; ".join(axis["summary"] for axis in axes.values())
        done.append(f"compressed {report['prunable_parameters']:,} weights to {summaries}")
    click.echo("; then ".join(done) + f" in {report['wall_seconds']:.1f}s -> {options.out}")
    notes = report["notes"]
    for note in notes[:5]:
        click.echo(f"note: {note}", err=True)
    if len(notes) > 5:
        click.echo(f"note: ... and {len(notes) - 5} more in prune_report.json", err=True)
    if "evaluation" in report:
        ev = report["evaluation"]
        click.echo(
            f"perplexity on {ev['data']}: dense {ev['dense_perplexity']:.3f} -> pruned "
            f"{ev['perplexity']:.3f} ({ev['tokens']:,} tokens)"
        )


def allocate_command(model, recipe, json_out, quiet, **values) -> None:
    """Print the plan an allocation method gives MODEL (per block, on every axis the
    recipe asks for), without compressing."""
    if quiet:
        _quiet_transformers()
    from .engine.adapters import block_index
    from .pipeline import allocate_only

    options = _build_recipe(recipe, model=model, **values)
    _check_early(options, overwrite=False)
    plan, store = allocate_only(options, progress=not quiet)
    if plan.structure is not None:
        _echo_structure(plan.structure)
    sizes = {n: r * c for n, (r, c) in store.layers().items()}
    for name, axis in plan.axes.items():
        per_block: dict[int, list[float]] = {}
        for layer, value in axis.values.items():
            entry = per_block.setdefault(block_index(layer), [0.0, 0.0])
            entry[0] += value * sizes[layer]
            entry[1] += sizes[layer]
        metric_by_block: dict[int, list[float]] = {}
        for unit, value in axis.metric.items():
            metric_by_block.setdefault(block_index(unit + "."), []).append(value)
        header = f"{'block':>5}  {name:>8}"
        if axis.metric_name:
            header += f"  {axis.metric_name:>14}"
        click.echo(f"{axis.method} allocation, {name} target {axis.target:.4g}")
        click.echo(header)
        for b in sorted(per_block):
            line = f"{b:>5}  {per_block[b][0] / per_block[b][1]:>8.4f}"
            if axis.metric_name and b in metric_by_block:
                values_ = metric_by_block[b]
                line += f"  {sum(values_) / len(values_):>14.4f}"
            click.echo(line)
        mean = axis.mean(sizes)  # a fraction (sparsity), or the axis's own unit (bits)
        shown = f"{mean:.4%}" if name == "sparsity" else f"{mean:.4g}"
        click.echo(f"overall {shown} of {sum(sizes.values()):,} prunable weights")
    cost = plan.cost
    if cost:  # (a structure cut alone has no plan of layers)
        click.echo(
            f"checkpoint: {cost['bytes']:,} bytes ({cost['format']}), dense {cost['dense_bytes']:,}"
        )
    if json_out is not None:
        plan.save(json_out)
        click.echo(f"plan written to {json_out}")


def _echo_structure(report: dict) -> None:
    """The structure candidates compared (depth, width or experts, KL) and the one chosen."""
    moe = report.get("dense_experts") is not None
    unit = ("experts", "width") if moe else ("MLP", "KV")
    click.echo(f"{'removed blocks':<28}  {unit[0]:>7}  {unit[1]:>5}  {'params':>12}  {'KL':>8}")
    for c in report["candidates"]:
        removed = ",".join(map(str, c["removed_blocks"])) or "-"
        if moe:
            shown = (c["experts"] or report["dense_experts"],
                     c.get("expert_width") or report.get("dense_expert_width") or "-")  # fmt: skip
        else:
            shown = (c["intermediate_size"], c["kv_groups"])
        click.echo(
            f"{removed:<28}  {shown[0]:>7}  {shown[1]:>5}  {c['params']:>12,}  {c['kl']:>8.4f}"
        )
    click.echo(report["summary"])


def methods_command(as_json: bool) -> None:
    """Every method, by the recipe field that names it (solver, allocation, rows, ...):
    its paper, what it needs, its options."""
    from .recipe import METHOD_FIELDS

    listing = {field: [_describe(m) for m in map(reg.get, reg.names())]
               for field, reg in METHOD_FIELDS.items()}  # fmt: skip
    if as_json:
        click.echo(json.dumps(listing))
        return
    for kind, methods in listing.items():
        click.echo(f"{kind} (--{kind} NAME, --{kind}-opt KEY=VALUE):")
        for m in methods:
            needs = f" [needs: {', '.join(m['needs'])}]" if m["needs"] else ""
            click.echo(f"  {m['name']}{needs}\n      {m['paper']}")
            for o in m["options"]:
                allowed = f", {o['allowed']}" if o["allowed"] else ""
                click.echo(
                    f"      {o['name']} ({o['type']}, default {o['default']}{allowed}): {o['help']}"
                )
        click.echo("")


def _describe(method) -> dict:
    return {
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


def eval_command(model, data, text_field, seqlen, max_windows, reference, tasks, task_path,
                 limit, device, batch_size, as_json, quiet) -> None:  # fmt: skip
    """Perplexity of MODEL on non-overlapping windows of a text; KL to a reference; zero-shot
    tasks through lm-eval."""
    if quiet:
        _quiet_transformers()
    from . import data as data_module
    from .engine.device import pick_device
    from .io.checkpoint import check_checkpoint, readable
    from .io.models import load
    from .report.evaluation import evaluate, zero_shot

    _at_least(("--seqlen", seqlen, 2), ("--max-windows", max_windows, 1),
              ("--batch-size", batch_size, 1))  # fmt: skip
    if task_path is not None and not task_path.is_dir():
        raise PrunellaError(f"--task-path {task_path} is not a folder")
    dev = pick_device(device)
    data_module.check_source(data, text_field, split="test")
    path = readable(model)
    ref_path = check_checkpoint(reference)[0] if reference is not None else None
    hf_model, tokenizer, _, _ = load(path)
    result = evaluate(
        hf_model, data, seqlen=seqlen, max_windows=max_windows, text_field=text_field,
        tokenizer=tokenizer, reference=ref_path, device=dev, batch_size=batch_size,
        progress=not quiet,
    )  # fmt: skip
    result["model"] = str(path)
    if tasks:
        names = [t.strip() for t in tasks.split(",") if t.strip()]
        result["tasks"] = zero_shot(
            hf_model, tokenizer, names, include_path=str(task_path) if task_path else None,
            limit=limit, device=str(dev),
        )  # fmt: skip
    if as_json:
        click.echo(json.dumps(result))
        return
    line = (
        f"perplexity {result['perplexity']:.3f} on {result['tokens']:,} tokens "
        f"({result['windows']} windows of {result['seqlen']})"
    )
    if "kl_to_reference" in result:
        line += f", KL to reference {result['kl_to_reference']:.4f} nats/token"
    click.echo(line)
    for task, metrics in result.get("tasks", {}).items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if not k.endswith("stderr"))
        click.echo(f"{task}: {shown}")


def compare_command(models, data, text_field, seqlen, max_windows, device, as_json,
                    quiet) -> None:  # fmt: skip
    """One table for several checkpoints: perplexity, KL to the first, sparsity, size on disk."""
    if quiet:
        _quiet_transformers()
    from . import data as data_module
    from .engine.device import pick_device
    from .io.checkpoint import readable
    from .io.models import load
    from .report.evaluation import evaluate
    from .report.summary import checkpoint_summary

    _at_least(("--seqlen", seqlen, 2), ("--max-windows", max_windows, 1))
    if not models:
        raise PrunellaError("give at least one checkpoint to compare")
    dev = pick_device(device)
    data_module.check_source(data, text_field, split="test")
    paths = [readable(m) for m in models]
    reference, tokenizer, _, _ = load(paths[0])
    rows = []
    for i, path in enumerate(paths):
        model = reference if i == 0 else load(path)[0]
        result = evaluate(
            model, data, seqlen=seqlen, max_windows=max_windows, text_field=text_field,
            tokenizer=tokenizer, reference=None if i == 0 else reference, device=dev,
            progress=not quiet,
        )  # fmt: skip
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
        click.echo(json.dumps(rows))
        return
    width = max(len(r["model"]) for r in rows)
    click.echo(f"{'model':<{width}}  {'ppl':>9}  {'KL':>8}  {'sparsity':>8}  {'MiB':>8}  format")
    for r in rows:
        click.echo(
            f"{r['model']:<{width}}  {r['perplexity']:>9.3f}  {r['kl_to_first']:>8.4f}  "
            f"{r['sparsity']:>8.2%}  {r['mib']:>8.1f}  {r['format']}"
        )


def pack_command(model, out, overwrite, quiet) -> None:
    """Write a packed (sparse-bitmask) copy of a pruned checkpoint: about half the bytes at 50%."""
    from .io.checkpoint import check_checkpoint
    from .io.pack import pack

    path, _ = check_checkpoint(model)
    stats = pack(path, out, overwrite=overwrite, progress=not quiet)
    click.echo(
        f"packed {stats['packed_weights']:,} weights ({stats['global_sparsity']:.2%} "
        f"sparse): {stats['dense_bytes'] / 2**20:.1f} MiB -> {stats['bytes'] / 2**20:.1f} "
        f"MiB ({stats['bytes'] / stats['dense_bytes']:.1%}) -> {out}"
    )


def unpack_command(packed, out, overwrite, quiet) -> None:
    """Inflate a packed checkpoint back to a plain Hugging Face checkpoint."""
    from .io.pack import unpack

    unpack(packed, out, overwrite=overwrite, progress=not quiet)
    click.echo(f"unpacked {packed} -> {out}")


def heapr_command(model, out, ratio, uniform, overwrite, quiet, **values) -> None:
    """Remove atomic experts (one neuron of one expert) by HEAPr's output-space score."""
    from .api import heapr_to_dir

    _quiet_transformers()
    report = heapr_to_dir(
        model, out, ratio=ratio, uniform=uniform, overwrite=overwrite, progress=not quiet, **values
    )
    click.echo(
        f"HEAPr removed {report['atomic_experts_removed']:,} of {report['atomic_experts']:,} "
        f"atomic experts ({report['ranking']} ranking, written as {report['written_as']}): "
        f"expert parameters {report['expert_parameters_before']:,} -> "
        f"{report['expert_parameters_after']:,} in {report['seconds']:.1f}s -> {out}"
    )


def search_worker_command(storage, study, model, folder, device, parent, quiet) -> None:
    """Join an allocation search (evopress, tpe, dsa) and evaluate its candidates until it ends."""
    import os

    import torch

    from .methods.allocation import ALLOCATIONS
    from .methods.search import run_worker

    _quiet_transformers()
    if os.environ.get("PRUNELLA_THREADS"):
        torch.set_num_threads(int(os.environ["PRUNELLA_THREADS"]))
    count = run_worker(
        storage, study, ALLOCATIONS, model=model, folder=folder, device=device, parent=parent
    )
    if not quiet:
        click.echo(f"search-worker: evaluated {count} candidate(s) of {study}")


def inspect_command(model, as_json) -> None:
    """Per-layer sparsity and pattern of a checkpoint, pruned by Prunella or not."""
    from .report.summary import checkpoint_summary

    summary = checkpoint_summary(model)
    if as_json:
        click.echo(json.dumps(summary))
        return
    width = max((len(r["name"]) for r in summary["layers"]), default=5)
    click.echo(f"{'layer':<{width}}  {'shape':>11}  {'sparsity':>8}  pattern")
    for r in summary["layers"]:
        shape = f"{r['shape'][0]}x{r['shape'][1]}"
        click.echo(f"{r['name']:<{width}}  {shape:>11}  {r['sparsity']:>8.2%}  {r['pattern']}")
    click.echo(
        f"{summary['format']} checkpoint, {summary['bytes'] / 2**20:.1f} MiB; "
        f"{summary['sparsity']:.2%} of {summary['prunable_parameters']:,} prunable "
        "weights are zero"
    )


def _at_least(*checks) -> None:
    for flag, value, low in checks:
        if value is not None and value < low:
            raise PrunellaError(f"{flag} must be at least {low}, got {value}")


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


# the flags several commands share, declared once
MODEL = click.Argument(["model"], required=False)
OUT = click.Option(["--out", "-o"], type=click.Path(path_type=Path), required=True,
                   help="Output folder.")  # fmt: skip
RECIPE_FILE = click.Option(
    ["--recipe", "recipe"],
    type=click.Path(path_type=Path),
    help="YAML file of options; flags given here override it.",
)
OVERWRITE = click.Option(["--overwrite"], is_flag=True, help="Replace a non-empty output folder.")
QUIET = click.Option(["--quiet"], is_flag=True, help="No progress bars.")
AS_JSON = click.Option(["--json", "as_json"], is_flag=True, help="Print one JSON object.")
EVAL_DATA = click.Option(
    ["--data"],
    default="sample-eval",
    show_default=True,
    help="Text: a text, JSONL or Parquet file, a datasets folder, 'sample-eval' (shipped, held "
    "out), wikitext2 or c4.",
)
MAX_WINDOWS = click.Option(["--max-windows"], type=int, help="Evaluate at most this many windows.")
EVALUATED = ("text_field", "seqlen", "device")  # recipe fields eval and compare take
EVAL_HELPS = {"seqlen": "Tokens per evaluation window."}
CALIBRATED = ("calib", "text_field", "nsamples", "seqlen", "seed", "device")


def _command(name: str, callback, params: list) -> click.Command:
    return click.Command(name, callback=callback, params=params, help=callback.__doc__)


def build_app() -> click.Group:
    """The command line, its flags made from the recipe (the axes' fields included: the
    axes' entry points are loaded here, inside :func:`main`'s one-line errors)."""
    from .recipe import Recipe

    commands = [
        _command("prune", prune_command, [
            MODEL, RECIPE_FILE,
            *recipe_flags(f for f in Recipe.model_fields if f != "model"),
            click.Option(["--resume"], is_flag=True, help="Insist on resuming OUT.partial."),
            click.Option(["--restart"], is_flag=True, help="Discard OUT.partial and start over."),
            OVERWRITE, QUIET,
        ]),
        _command("allocate", allocate_command, [
            MODEL, RECIPE_FILE,
            *recipe_flags(f for f in Recipe.model_fields if f != "model" and f not in PRUNE_ONLY),
            click.Option(["--json", "json_out"], type=click.Path(path_type=Path),
                         help="Write the plan here (for prune --allocation-file)."),
            QUIET,
        ]),
        _command("methods", methods_command, [AS_JSON]),
        _command("eval", eval_command, [
            click.Argument(["model"]), EVAL_DATA,
            *recipe_flags(EVALUATED, own_defaults=True, helps=EVAL_HELPS),
            MAX_WINDOWS,
            click.Option(["--reference"], help="Dense model to measure the KL divergence to."),
            click.Option(["--tasks"],
                         help="Zero-shot lm-eval tasks, comma-separated (needs lm-eval)."),
            click.Option(["--task-path"], type=click.Path(path_type=Path),
                         help="Folder of extra lm-eval task YAML files (local tasks)."),
            click.Option(["--limit"], type=int,
                         help="lm-eval: at most this many examples per task."),
            click.Option(["--batch-size"], type=int, default=1, show_default=True,
                         help="Windows per forward pass."),
            AS_JSON, QUIET,
        ]),
        _command("compare", compare_command, [
            click.Argument(["models"], nargs=-1, metavar="MODELS..."), EVAL_DATA,
            *recipe_flags(EVALUATED, own_defaults=True, helps=EVAL_HELPS), MAX_WINDOWS, AS_JSON,
            QUIET,
        ]),
        _command("inspect", inspect_command, [click.Argument(["model"]), AS_JSON]),
        _command("pack", pack_command, [
            click.Argument(["model"]), OUT, OVERWRITE, QUIET,
        ]),
        _command("unpack", unpack_command, [
            click.Argument(["packed"], type=click.Path(path_type=Path)), OUT, OVERWRITE, QUIET,
        ]),
        _command("heapr", heapr_command, [
            click.Argument(["model"]), OUT,
            click.Option(["--ratio"], type=float, default=0.25, show_default=True,
                         help="Fraction of the routed experts' atomic experts to remove."),
            click.Option(["--uniform"], is_flag=True,
                         help="Remove the same number from every expert: the saved experts are "
                         "smaller (else the paper's global ranking, written as zeros)."),
            *recipe_flags(CALIBRATED, own_defaults=True), OVERWRITE, QUIET,
        ]),
        _command("search-worker", search_worker_command, [
            click.Option(["--storage"], required=True, envvar="PRUNELLA_SEARCH_STORAGE",
                         help="The search's optuna storage URL (e.g. postgresql://...)."),
            click.Option(["--study"], required=True,
                         help="The study's name (printed by the search)."),
            click.Option(["--model"],
                         help="The model's folder, where it differs from the search's."),
            click.Option(["--folder"],
                         help="The level database's folder, where it differs from the search's."),
            *recipe_flags(["device"], own_defaults=True),
            click.Option(["--parent"], type=int, hidden=True,
                         help="Stop when this process is gone."),
            click.Option(["--quiet"], is_flag=True, help="No messages."),
        ]),
    ]  # fmt: skip
    return click.Group(
        "prunella",
        commands=commands,
        no_args_is_help=True,
        help="One-shot compression of Hugging Face causal language models.",
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI, turning user mistakes into one line and exit status 2."""
    limit_heap_growth()
    try:
        result = build_app().main(args=argv, prog_name="prunella", standalone_mode=False)
    except PrunellaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, a read-only file system: what to fix, in one line
        from .io.folders import DISK_ERRORS, disk_error

        if exc.errno not in DISK_ERRORS:
            raise
        print(f"error: {disk_error(exc)}", file=sys.stderr)
        return 2
    except click.exceptions.Exit as exc:  # --help
        return exc.exit_code
    except click.Abort:
        print("error: interrupted", file=sys.stderr)
        return 130
    except click.ClickException as exc:  # bad values, missing arguments
        message = exc.format_message()
        if not argv and not sys.argv[1:]:  # no command at all: the usage, as help
            print(message, file=sys.stderr)
        else:
            print(f"error: {message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
