"""The ``prunella`` command line: ``prune`` and ``eval``.

Every user mistake ends as one line on stderr (``error: ...``) and exit status 2,
before anything is written; progress bars go to stderr, results to stdout.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from .errors import PrunellaError
from .heap import limit_heap_growth

ALLOCATION_HELP = "Where the sparsity goes: uniform, owl or alphapruning."
GRANULARITY_HELP = "block (all layers of a block share one sparsity) or layer."
LAMBDA_HELP = "OWL: sparsities stay within target +- lambda (default 0.08)."
OUTLIER_M_HELP = "OWL: a score is an outlier above M times the mean (default 5)."
EPSILON_HELP = "AlphaPruning: sparsities span target x [1 - eps, 1 + eps] (default 0.3)."
FARMS_HELP = "AlphaPruning: estimate alpha with FARMS sub-matrix sampling."


def _allocation_options(lam, outlier_m, epsilon, farms) -> dict:
    """The method options given on the command line (the method rejects foreign ones)."""
    given = {"lam": lam, "outlier_m": outlier_m, "epsilon": epsilon, "farms": farms}
    return {key: value for key, value in given.items() if value is not None}


app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="One-shot pruning of Hugging Face causal language models.",
)


def _opt(help_text: str, *names: str):
    """A prune option whose default (None) means: from the recipe, or the recipe's default."""
    return typer.Option(*names, help=help_text, show_default=False)


@app.command("prune")
def prune_command(
    model: Annotated[
        str | None,
        typer.Argument(
            help="Checkpoint folder, or a bundled name (smollm2-135m).", show_default=False
        ),
    ] = None,
    out: Annotated[
        Path | None, _opt("Output folder for the pruned checkpoint.", "--out", "-o")
    ] = None,
    recipe: Annotated[
        Path | None, _opt("YAML file of options; flags given here override it.")
    ] = None,
    sparsity: Annotated[
        float | None, _opt("Fraction of weights to prune, in [0, 1) [0.5].")
    ] = None,
    pattern: Annotated[str | None, _opt("'unstructured' or N:M, e.g. 2:4 [unstructured].")] = None,
    solver: Annotated[str | None, _opt("magnitude, wanda or sparsegpt [sparsegpt].")] = None,
    calib: Annotated[
        str | None, _opt("Calibration text: a file, 'sample' (shipped), wikitext2 or c4 [sample].")
    ] = None,
    nsamples: Annotated[int | None, _opt("Number of calibration windows [128].")] = None,
    seqlen: Annotated[int | None, _opt("Tokens per calibration window [2048].")] = None,
    seed: Annotated[int | None, _opt("Seed for drawing the calibration windows [0].")] = None,
    device: Annotated[str | None, _opt("auto, cpu, cuda or cuda:N [auto].")] = None,
    batch_size: Annotated[
        int | None, _opt("Calibration windows per forward pass [16384 tokens' worth].")
    ] = None,
    allocation: Annotated[str | None, _opt(ALLOCATION_HELP + " [uniform]")] = None,
    allocation_file: Annotated[
        Path | None, _opt("A plan from 'prunella allocate --json' (overrides --allocation).")
    ] = None,
    granularity: Annotated[str | None, _opt(GRANULARITY_HELP + " [block]")] = None,
    min_sparsity: Annotated[float | None, _opt("Lowest sparsity any layer gets [0].")] = None,
    max_sparsity: Annotated[float | None, _opt("Highest sparsity any layer gets [0.99].")] = None,
    lam: Annotated[float | None, _opt(LAMBDA_HELP, "--lambda")] = None,
    outlier_m: Annotated[float | None, _opt(OUTLIER_M_HELP)] = None,
    epsilon: Annotated[float | None, _opt(EPSILON_HELP)] = None,
    farms: Annotated[bool | None, _opt(FARMS_HELP, "--farms/--no-farms")] = None,
    offload: Annotated[
        str | None,
        _opt("none (whole model in memory), disk (one block at a time) or auto [auto]."),
    ] = None,
    passes: Annotated[
        str | None,
        _opt(
            "Forward passes per block: 1 (all windows as one batch; each layer sees the "
            "already-pruned layers before it), 2 (statistics pass, then the pruned block, as "
            "in the papers), or auto (1 when it fits in memory) [auto]."
        ),
    ] = None,
    compute_dtype: Annotated[
        str | None,
        _opt(
            "dtype of the calibration forward passes: float32, bfloat16, float16, or auto "
            "(the model's on a GPU; bfloat16 on a CPU with native bfloat16, else float32) "
            "[auto]. On a CPU only the matrix products narrow (autocast); activations "
            "and solver maths are float32 always."
        ),
    ] = None,
    save_format: Annotated[
        str | None, _opt("dense (a plain checkpoint) or packed (sparse-bitmask) [dense].")
    ] = None,
    eval_data: Annotated[
        str | None, _opt("Evaluate perplexity before and after pruning on this text.")
    ] = None,
    eval_max_windows: Annotated[int | None, _opt("At most this many evaluation windows.")] = None,
    resume: Annotated[bool, typer.Option(help="Insist on resuming OUT.partial.")] = False,
    restart: Annotated[bool, typer.Option(help="Discard OUT.partial and start over.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty output folder.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Prune MODEL and write a Hugging Face checkpoint, prune_report.json, allocation.png and
    recipe.yaml to --out. Progress is kept in OUT.partial: re-running the same command after
    a crash continues from the last finished block."""
    if quiet:
        _quiet_transformers()
    from . import api, data, export, models
    from .patterns import parse_pattern
    from .recipe import build

    options = build(
        recipe,
        model=model,
        out=str(out) if out is not None else None,
        sparsity=sparsity,
        pattern=pattern,
        solver=solver,
        calib=calib,
        nsamples=nsamples,
        seqlen=seqlen,
        seed=seed,
        device=device,
        batch_size=batch_size,
        allocation=allocation,
        allocation_file=str(allocation_file) if allocation_file is not None else None,
        granularity=granularity,
        min_sparsity=min_sparsity,
        max_sparsity=max_sparsity,
        lam=lam,
        outlier_m=outlier_m,
        epsilon=epsilon,
        farms=farms,
        offload=offload,
        passes=int(passes) if passes in ("1", "2") else passes,
        compute_dtype=compute_dtype,
        save_format=save_format,
        eval_data=eval_data,
        eval_max_windows=eval_max_windows,
    )
    if options.model is None:
        raise PrunellaError("missing MODEL: give it as the first argument or in the recipe")
    if options.out is None:
        raise PrunellaError("missing --out: give it on the command line or in the recipe")
    if resume and restart:
        raise PrunellaError("--resume and --restart exclude each other")
    parse_pattern(options.pattern, options.sparsity)
    api.pick_device(options.device)
    data.check_source(options.calib)
    if options.eval_data is not None:
        data.check_source(options.eval_data)
    path, _ = models.check_checkpoint(options.model)
    export.check_out_dir(options.out, path, overwrite)
    if options.allocation_file is not None and not Path(options.allocation_file).is_file():
        raise PrunellaError(f"allocation file {options.allocation_file} not found")
    from .allocation import get_method, method_options

    method_options(get_method(options.allocation), options.allocation_options())

    report = api.prune_to_dir(
        options, overwrite=overwrite, resume=resume, restart=restart, progress=not quiet
    )
    typer.echo(
        f"pruned {report['prunable_parameters']:,} weights to {report['sparsity']:.2%} sparsity "
        f"({report['pattern']}, {report['solver']}, {report['allocation']['method']} allocation) "
        f"in {report['wall_seconds']:.1f}s -> {options.out}"
    )


@app.command("allocate")
def allocate_command(
    model: Annotated[str, typer.Argument(help="Checkpoint folder, or a bundled name.")],
    allocation: Annotated[str, typer.Option(help=ALLOCATION_HELP)] = "owl",
    sparsity: Annotated[
        float | None, typer.Option(help="Target fraction of weights to prune (default 0.5).")
    ] = None,
    pattern: Annotated[str, typer.Option(help="'unstructured' or N:M, e.g. 2:4.")] = "unstructured",
    granularity: Annotated[str, typer.Option(help=GRANULARITY_HELP)] = "block",
    min_sparsity: Annotated[float, typer.Option(help="Lowest sparsity any layer gets.")] = 0.0,
    max_sparsity: Annotated[float, typer.Option(help="Highest sparsity any layer gets.")] = 0.99,
    lam: Annotated[float | None, typer.Option("--lambda", help=LAMBDA_HELP)] = None,
    outlier_m: Annotated[float | None, typer.Option(help=OUTLIER_M_HELP)] = None,
    epsilon: Annotated[float | None, typer.Option(help=EPSILON_HELP)] = None,
    farms: Annotated[bool | None, typer.Option("--farms/--no-farms", help=FARMS_HELP)] = None,
    calib: Annotated[str, typer.Option(help="Calibration text (for owl).")] = "sample",
    nsamples: Annotated[int, typer.Option(help="Number of calibration windows.")] = 128,
    seqlen: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 2048,
    seed: Annotated[int, typer.Option(help="Seed for drawing the calibration windows.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    json_out: Annotated[
        Path | None,
        typer.Option("--json", help="Write the plan here (for prune --allocation-file)."),
    ] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Print the sparsity plan an allocation method gives MODEL, without pruning."""
    if quiet:
        _quiet_transformers()
    from . import api, data, models
    from .allocation import get_method
    from .patterns import parse_pattern
    from .plots import block_index

    chosen = parse_pattern(pattern, sparsity)
    method = get_method(allocation)
    options = _allocation_options(lam, outlier_m, epsilon, farms)
    if method.needs:
        if nsamples < 1:
            raise PrunellaError(f"--nsamples must be at least 1, got {nsamples}")
        data.check_source(calib)
    dev = api.pick_device(device)
    path, _ = models.check_checkpoint(model)
    hf_model, tokenizer, _, adapter = models.load(path)
    windows = None
    if method.needs:
        windows, _ = api._calibration(hf_model, tokenizer, calib, nsamples, seqlen, seed)
    plan = api.allocate(
        hf_model,
        adapter,
        allocation,
        chosen,
        windows=windows,
        granularity=granularity,
        options=options,
        min_sparsity=min_sparsity,
        max_sparsity=max_sparsity,
        device=dev,
        batch_size=api._default_batch_size(seqlen),
        progress=not quiet,
    )
    sizes = {n: r * c for n, (r, c) in api.prunable_layers(hf_model, adapter).items()}
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
    typer.echo(f"{allocation} allocation, target {plan.target:.2%} ({chosen})")
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


@app.command("eval")
def eval_command(
    model: Annotated[
        str, typer.Argument(help="Checkpoint folder (dense or packed), or a bundled name.")
    ],
    data: Annotated[
        str, typer.Option(help="Text: a file, 'sample-eval' (shipped, held out), wikitext2 or c4.")
    ] = "sample-eval",
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
    from . import api, models
    from . import data as data_module
    from .evaluation import zero_shot

    if seqlen < 2:
        raise PrunellaError(f"--seqlen must be at least 2, got {seqlen}")
    if max_windows is not None and max_windows < 1:
        raise PrunellaError(f"--max-windows must be at least 1, got {max_windows}")
    if batch_size < 1:
        raise PrunellaError(f"--batch-size must be at least 1, got {batch_size}")
    if task_path is not None and not task_path.is_dir():
        raise PrunellaError(f"--task-path {task_path} is not a folder")
    dev = api.pick_device(device)
    data_module.check_source(data)
    path, _ = models.check_checkpoint(model)
    ref_path = models.check_checkpoint(reference)[0] if reference is not None else None
    hf_model, tokenizer, _, _ = models.load(path)
    result = api.evaluate(
        hf_model,
        data,
        seqlen=seqlen,
        max_windows=max_windows,
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
    from .models import check_checkpoint
    from .pack import pack

    path, _ = check_checkpoint(model)
    stats = pack(path, out, overwrite=overwrite, progress=not quiet)
    typer.echo(
        f"packed {stats['packed_weights']:,} weights ({stats['global_sparsity']:.2%} "
        f"sparse): {stats['dense_bytes'] / 2**20:.1f} MiB -> {stats['bytes'] / 2**20:.1f} "
        f"MiB ({stats['bytes'] / stats['dense_bytes']:.1%}) -> {out}"
    )


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
    from .pack import unpack

    unpack(packed, out, overwrite=overwrite, progress=not quiet)
    typer.echo(f"unpacked {packed} -> {out}")


@app.command("inspect")
def inspect_command(
    model: Annotated[str, typer.Argument(help="Any checkpoint folder: dense, packed or legacy.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Per-layer sparsity and pattern of a checkpoint, pruned by Prunella or not."""
    from .summary import checkpoint_summary

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
    data: Annotated[str, typer.Option(help="Evaluation text.")] = "sample-eval",
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
    from . import api, models
    from . import data as data_module
    from .summary import checkpoint_summary

    if seqlen < 2:
        raise PrunellaError(f"--seqlen must be at least 2, got {seqlen}")
    dev = api.pick_device(device)
    data_module.check_source(data)
    paths = [models.check_checkpoint(m)[0] for m in models_]
    reference, tokenizer, _, _ = models.load(paths[0])
    rows = []
    for i, path in enumerate(paths):
        model = reference if i == 0 else models.load(path)[0]
        result = api.evaluate(
            model,
            data,
            seqlen=seqlen,
            max_windows=max_windows,
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
    try:
        result = command.main(args=argv, prog_name="prunella", standalone_mode=False)
    except PrunellaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except typer.Abort:
        print("error: interrupted", file=sys.stderr)
        return 130
    except typer.TyperException as exc:  # usage errors: bad option values, missing arguments
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        print(f"error: {message}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
