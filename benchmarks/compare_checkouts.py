"""Check that two checkouts of Prunella prune bit for bit alike (a refactor changed nothing).

Runs the same ``prunella prune`` command lines with each of two checkouts of this
repository (``--base``, e.g. the code before a refactor, and ``--head``, by default
this one), each prune in its own process with the current Python interpreter and
``PYTHONPATH=<checkout>/src`` (so both use the same installed dependencies and
each its own Prunella; the script checks which ``prunella`` each one imports).
It then reads every tensor of both pruned checkpoints (all ``*.safetensors``
shards, matched by tensor name, whatever the sharding) and compares them:

* the tensor names of the two checkpoints must be the same;
* the weights must be identical bit for bit (``torch.equal`` on the raw bytes of
  every tensor, same dtype and shape); where they are not, the largest absolute
  difference is reported;
* the pruning masks (``tensor == 0``) must be identical.

The default rows are the prunes of ``benchmarks/prune_smollm2.py`` (SmolLM2-135M;
magnitude, Wanda and SparseGPT at 50% unstructured and at 2:4) and the OWL and
AlphaPruning runs at 70% with Wanda and SparseGPT of
``benchmarks/allocation_smollm2.py``, with their calibration (the shipped
``sample`` text, the CLI's default; 32 windows of 512 tokens). Like those
benchmarks, the rows leave ``--passes`` at its default (``auto``; since the
one-pipeline redesign it depends on the model and calibration size only, but
older checkouts chose from the free memory); give ``--passes 1`` or ``--passes 2``
to pin it (the ``passes`` each run used is in the JSON rows, and a note is printed
when they differ). The command lines use only options that old and new
checkouts both accept.

Prints a Markdown table: per command, the number of tensors compared, whether
masks and weights are identical, the largest absolute difference, and for each
checkout the wall time and peak resident memory of its process. ``--json PATH``
also writes the raw rows. The exit status is 1 if any row differs or any prune
failed (a failed prune is reported as one line naming the checkout and the
command, followed by the end of its stderr), 2 if a checkout cannot be used.

    python benchmarks/compare_checkouts.py --base /path/to/old/checkout --json compare.json

A quick check on a small local checkpoint, a few rows only:

    python benchmarks/compare_checkouts.py --base /path/to/old/checkout \\
        --model /path/to/small/checkpoint --nsamples 4 --seqlen 64 --only magnitude
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

LABELS = ("base", "head")


def default_rows() -> list[list[str]]:
    """The prune options of each row (model, output, calibration size added later)."""
    rows = []
    # benchmarks/prune_smollm2.py: every solver at 50% unstructured and at 2:4
    for pattern in ("unstructured", "2:4"):
        for solver in ("magnitude", "wanda", "sparsegpt"):
            rows.append(
                [
                    "--solver",
                    solver,
                    "--pattern",
                    pattern,
                    *(["--sparsity", "0.5"] if pattern == "unstructured" else []),
                ]
            )
    # benchmarks/allocation_smollm2.py: OWL, AlphaPruning and ERK at 70%
    for solver in ("wanda", "sparsegpt"):
        for method in ("owl", "alphapruning", "erk"):
            rows.append(["--solver", solver, "--sparsity", "0.7", "--allocation", method])
    # benchmarks/high_sparsity_smollm2.py: TRIM's row budgets and ALPS at 70%
    rows.append(["--solver", "sparsegpt", "--sparsity", "0.7", "--rows", "trim"])
    rows.append(["--solver", "alps", "--sparsity", "0.7"])
    # the searches and the learned allocation, with a fixed budget (evaluations, steps)
    rows.append(["--solver", "sparsegpt", "--sparsity", "0.7", "--allocation", "dsa",
                 "--allocation-opt", "formula=W:(ABSLOG)-(VAR)-(ATAN,ASIN)"])  # fmt: skip
    rows.append(["--solver", "sparsegpt", "--sparsity", "0.7", "--allocation", "evopress",
                 "--allocation-opt", "evaluations=40", "--allocation-opt", "offspring=8",
                 "--allocation-opt", "survivors=2,1", "--allocation-opt", "tokens=1024,2048",
                 "--allocation-opt", "minutes=60"])  # fmt: skip
    rows.append(["--solver", "wanda", "--sparsity", "0.7", "--allocation", "lua",
                 "--allocation-opt", "steps=5"])  # fmt: skip
    return rows


def checkout_env(checkout: Path) -> dict[str, str]:
    env = os.environ.copy()
    env["PYTHONPATH"] = str(checkout / "src")
    return env


def check_checkout(label: str, checkout: Path) -> str:
    """Fail unless Python run in ``checkout`` with its ``src`` imports that ``prunella``."""
    if not (checkout / "src" / "prunella").is_dir():
        unusable(f"{label} checkout {checkout} has no src/prunella")
    done = subprocess.run(
        [sys.executable, "-c", "import prunella; print(prunella.__file__)"],
        cwd=checkout,
        env=checkout_env(checkout),
        capture_output=True,
        text=True,
    )
    if done.returncode:
        tail = "\n".join("    " + line for line in done.stderr.strip().splitlines()[-15:])
        unusable(f"{label} checkout {checkout}: 'import prunella' failed:\n{tail}")
    imported = Path(done.stdout.strip().splitlines()[-1]).resolve()
    if not imported.is_relative_to((checkout / "src").resolve()):
        unusable(
            f"{label} checkout {checkout} imports prunella from {imported}, "
            f"not from {checkout / 'src'}"
        )
    return str(imported)


def unusable(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def describe(checkout: Path) -> str:
    """The commit of a checkout, and whether it has uncommitted changes."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
        )
        status = subprocess.run(
            ["git", "-C", str(checkout), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
        )
    except OSError:
        return "not a git checkout"
    if commit.returncode:
        return "not a git checkout"
    return commit.stdout.strip() + (", uncommitted changes" if status.stdout.strip() else "")


def run_prune(checkout: Path, argv: list[str], logs: Path) -> dict:
    """Run one prune in ``checkout``; its wall time and peak RSS (that process alone).

    The peak RSS is read by ``/usr/bin/time`` (a small process of its own): a child
    forked straight from this script would report this script's own peak, which
    grows while it compares the checkpoints, because Linux keeps the parent's
    high-water mark across fork and exec.
    """
    logs.mkdir(parents=True, exist_ok=True)
    rss_file = logs / "max_rss_kib.txt"
    with open(logs / "stdout.txt", "wb") as out, open(logs / "stderr.txt", "wb") as err:
        start = time.perf_counter()
        done = subprocess.run(
            ["/usr/bin/time", "-f", "%M", "-o", str(rss_file), *argv],
            cwd=checkout,
            # a cache of its own: a search builds its level database afresh, not the other's
            env=checkout_env(checkout) | {"PRUNELLA_HOME": str(logs / "home")},
            stdout=out,
            stderr=err,
        )
        seconds = time.perf_counter() - start
    rss_kib = int(rss_file.read_text().split()[-1])
    return {
        "returncode": done.returncode,
        "seconds": seconds,
        "peak_rss_mb": rss_kib / 1024,
        "stderr": (logs / "stderr.txt").read_text(errors="replace"),
    }


def tensor_index(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors shard that holds it, over all shards of a checkpoint."""
    from safetensors import safe_open

    index: dict[str, Path] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
                if key in index:
                    raise ValueError(f"{key} is in both {index[key].name} and {shard.name}")
                index[key] = shard
    return index


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def max_abs_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    x, y = a.double(), b.double()
    same = (x == y) | (x.isnan() & y.isnan())
    diff = torch.where(same, torch.zeros_like(x), (x - y).abs())
    diff = torch.nan_to_num(diff, nan=float("inf"))
    return diff.max().item() if diff.numel() else 0.0


def compare_checkpoints(base: Path, head: Path) -> dict:
    """Compare two pruned checkpoints tensor by tensor (by name over all their shards)."""
    from safetensors import safe_open

    index = {"base": tensor_index(base), "head": tensor_index(head)}
    common = sorted(index["base"].keys() & index["head"].keys())
    result = {
        "tensors": len(common),
        "only_in_base": sorted(index["base"].keys() - index["head"].keys()),
        "only_in_head": sorted(index["head"].keys() - index["base"].keys()),
        "mismatched_dtype_or_shape": [],
        "different_weights": [],
        "equal_values_different_bits": [],
        "different_masks": [],
        "mask_elements_differing": 0,
        "max_abs_diff": 0.0,
    }
    with contextlib.ExitStack() as stack:
        handles = {
            label: {
                shard: stack.enter_context(safe_open(shard, framework="pt"))
                for shard in set(index[label].values())
            }
            for label in LABELS
        }
        for key in common:
            a = handles["base"][index["base"][key]].get_tensor(key)
            b = handles["head"][index["head"][key]].get_tensor(key)
            if a.dtype != b.dtype or a.shape != b.shape:
                result["mismatched_dtype_or_shape"].append(
                    f"{key}: {a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)}"
                )
                continue
            if not torch.equal(a == 0, b == 0):
                result["different_masks"].append(key)
                result["mask_elements_differing"] += int(((a == 0) != (b == 0)).sum())
            if not torch.equal(as_bytes(a), as_bytes(b)):
                if torch.equal(a, b):  # e.g. -0.0 against 0.0
                    result["equal_values_different_bits"].append(key)
                else:
                    result["different_weights"].append(key)
                    result["max_abs_diff"] = max(result["max_abs_diff"], max_abs_difference(a, b))
    same_keys = not (
        result["only_in_base"] or result["only_in_head"] or result["mismatched_dtype_or_shape"]
    )
    result["identical_masks"] = same_keys and not result["different_masks"]
    result["identical_weights"] = (
        same_keys and not result["different_weights"] and not result["equal_values_different_bits"]
    )
    return result


def report_field(out: Path, field: str):
    try:
        return json.loads((out / "prune_report.json").read_text()).get(field)
    except (OSError, ValueError):
        return None


def run_row(a, i: int, flags: list[str], checkouts: dict[str, Path], work: Path) -> dict:
    command = " ".join(flags)
    common = ["--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen)]
    common += ["--seed", str(a.seed)] if a.seed is not None else []
    common += ["--passes", a.passes] if a.passes is not None else []
    row: dict = {"command": command, "argv": {}, "failed": []}
    outs = {}
    for label in LABELS:
        out = work / label
        outs[label] = out
        argv = [sys.executable, "-m", "prunella", "prune", a.model, "--out", str(out)]
        argv += [*flags, *common, "--quiet"]
        row["argv"][label] = argv
        print(f"{label}: prune {a.model} {command}", file=sys.stderr)
        run = run_prune(checkouts[label], argv, work / f"{label}-logs")
        stderr = run.pop("stderr")
        ok = run["returncode"] == 0 and any(out.glob("*.safetensors"))
        row[label] = run | {"ok": ok, "passes": report_field(out, "passes")}
        if not ok:
            row["failed"].append(label)
            tail = "\n".join("    " + line for line in stderr.rstrip().splitlines()[-20:])
            row[label]["stderr_tail"] = stderr.rstrip().splitlines()[-20:]
            print(
                f"FAILED: {label} checkout {checkouts[label]}, exit status {run['returncode']}: "
                f"python -m prunella prune {a.model} --out OUT {command} {' '.join(common)} "
                f"--quiet\n{tail or '    (no stderr)'}",
                file=sys.stderr,
            )
    if not row["failed"]:
        try:
            row |= compare_checkpoints(outs["base"], outs["head"])
        except Exception as exc:  # an unreadable checkpoint is a difference, not a crash
            row["failed"].append("compare")
            row["compare_error"] = f"{type(exc).__name__}: {exc}"
            print(f"FAILED: comparing the checkpoints of {command}: {exc}", file=sys.stderr)
        if row["base"]["passes"] != row["head"]["passes"]:
            print(
                f"note: {command}: base ran {row['base']['passes']} pass(es) per block, head "
                f"{row['head']['passes']} (--passes auto); pin it with --passes",
                file=sys.stderr,
            )
    row["identical"] = not row["failed"] and row["identical_masks"] and row["identical_weights"]
    if a.keep:
        for label in LABELS:
            if outs[label].exists():
                shutil.move(outs[label], a.keep / f"{i}-{label}")
    verdict = "FAILED" if row["failed"] else "identical" if row["identical"] else "DIFFERENT"
    print(f"done: {command}: {verdict}", file=sys.stderr)
    return row


def print_table(a, checkouts: dict[str, Path], rows: list[dict]) -> None:
    print(
        f"`prunella prune {a.model} --out OUT <command> --nsamples {a.nsamples} "
        f"--seqlen {a.seqlen}"
        + (f" --seed {a.seed}" if a.seed is not None else "")
        + (f" --passes {a.passes}" if a.passes is not None else "")
        + " --quiet`"
    )
    for label in LABELS:
        print(f"- {label}: {checkouts[label]} ({describe(checkouts[label])})")
    print(
        f"- {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, Python {platform.python_version()}\n"
    )
    print(
        "| command | tensors compared | identical masks | identical weights | max abs diff "
        "| base time (s) | base peak RSS (MiB) | head time (s) | head peak RSS (MiB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["failed"]:
            what = ", ".join(r["failed"])
            masks = weights = f"failed ({what})"
            tensors = diff = "-"
        else:
            tensors = str(r["tensors"])
            masks = "yes" if r["identical_masks"] else "no"
            weights = "yes" if r["identical_weights"] else "no"
            if r["equal_values_different_bits"] and not r["different_weights"]:
                weights = "no (equal values, different bits)"
            if r["only_in_base"] or r["only_in_head"] or r["mismatched_dtype_or_shape"]:
                masks += " (tensor names/shapes differ)"
            diff = f"{r['max_abs_diff']:.3g}"
        cells = []
        for label in LABELS:
            run = r[label]
            cells += [f"{run['seconds']:.1f}", f"{run['peak_rss_mb']:.0f}"]
        print(
            f"| `{r['command']}` | {tensors} | {masks} | {weights} | {diff} | "
            + " | ".join(cells)
            + " |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=Path("/tmp/prunella-base"))
    parser.add_argument("--head", type=Path, default=Path("."))
    parser.add_argument("--model", default="smollm2-135m", help="bundled name or checkpoint")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--seed", type=int, help="pass --seed (default: the CLI's, 0)")
    parser.add_argument("--passes", choices=("1", "2", "auto"), help="pass --passes")
    parser.add_argument(
        "--only",
        action="append",
        metavar="SUBSTRING",
        help="run only the rows whose command contains this (repeatable)",
    )
    parser.add_argument("--keep", type=Path, help="keep the pruned checkpoints in this folder")
    parser.add_argument("--json", type=Path, help="also write the raw rows here")
    a = parser.parse_args()

    checkouts = {"base": a.base.resolve(), "head": a.head.resolve()}
    if Path(a.model).exists():  # a local checkpoint: the prunes run in another folder
        a.model = str(Path(a.model).resolve())
    rows_flags = [
        flags for flags in default_rows() if not a.only or any(s in " ".join(flags) for s in a.only)
    ]
    if not rows_flags:
        parser.error(f"no row matches --only {a.only}")
    imported = {label: check_checkout(label, path) for label, path in checkouts.items()}
    for label in LABELS:
        print(f"{label}: {checkouts[label]} imports {imported[label]}", file=sys.stderr)
    if checkouts["base"] == checkouts["head"]:
        print("note: base and head are the same checkout", file=sys.stderr)
    if a.keep:
        a.keep.mkdir(parents=True, exist_ok=True)
    if not Path(a.model).exists():
        # a bundled name: build its cached checkpoint now and give both checkouts its
        # folder, so that no row's time includes the conversion (each prune has a
        # $PRUNELLA_HOME of its own, which would convert it again)
        done = subprocess.run(
            [sys.executable, "-c",
             f"from prunella.io.checkpoint import resolve; print(resolve({a.model!r}))"],
            cwd=checkouts["head"], env=checkout_env(checkouts["head"]),
            capture_output=True, text=True,
        )  # fmt: skip
        if done.returncode:
            unusable(f"cannot resolve {a.model!r}: {done.stderr.strip().splitlines()[-1:]}")
        a.model = done.stdout.strip().splitlines()[-1]

    rows = []
    for i, flags in enumerate(rows_flags):
        with tempfile.TemporaryDirectory(prefix=f"compare-{i}-") as tmp:
            rows.append(run_row(a, i, flags, checkouts, Path(tmp)))

    print_table(a, checkouts, rows)
    if a.json:
        a.json.write_text(
            json.dumps(
                {
                    "args": {k: str(v) if v is not None else None for k, v in vars(a).items()},
                    "checkouts": {
                        label: {
                            "path": str(checkouts[label]),
                            "imports": imported[label],
                            "commit": describe(checkouts[label]),
                        }
                        for label in LABELS
                    },
                    "torch": torch.__version__,
                    "rows": rows,
                },
                indent=2,
            )
        )
    sys.exit(0 if all(r["identical"] for r in rows) else 1)


if __name__ == "__main__":
    main()
