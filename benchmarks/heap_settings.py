"""Time and peak memory of one CLI prune under different heap and forward-dtype settings.

Runs ``prunella prune smollm2-135m --passes 1`` (SparseGPT 50%, 32 x 512 tokens by
default) ``--repeat`` times per setting (3 by default, the settings interleaved),
each in its own process under ``/usr/bin/time -v``, reads wall time, peak RSS and
minor page faults from the OS, and prints each setting's median with its range. A
setting is the dtype of the forward passes (``--compute-dtype``), glibc's mmap
threshold (``default`` leaves glibc's own, dynamic one, and its arenas; a fixed
threshold comes with one arena) and whether the heap is trimmed after each layer's
solve and each block; the last two are set by patching ``prunella.engine.heap`` before the
CLI starts. The shipped default is bfloat16 (on a CPU with native bfloat16), a
32 MiB threshold, one arena and the trims (see ``prunella/heap.py``).

    python benchmarks/heap_settings.py --json heap.json
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import record

# (forward dtype, mmap threshold in MiB or None for glibc's default, trims)
SETTINGS = [
    ("float32", 1, False),
    ("bfloat16", None, False),
    ("bfloat16", 32, False),
    ("bfloat16", 32, True),
]

LAUNCH = """
import sys
import prunella.cli, prunella.engine.prune, prunella.engine.heap, prunella.pipeline
threshold, trim = sys.argv[1], sys.argv[2] == "1"
if threshold == "default":
    prunella.cli.limit_heap_growth = lambda: None
    prunella.pipeline.limit_heap_growth = lambda: None
else:
    prunella.engine.heap.MMAP_THRESHOLD = int(threshold) << 20
if not trim:
    prunella.engine.prune.trim_heap = lambda: None
sys.exit(prunella.cli.main(sys.argv[3:]))
"""


def measured(a, dtype: str, threshold: int | None, trim: bool, out: Path) -> dict:
    argv = ["prune", a.model, "--out", str(out), "--sparsity", str(a.sparsity)]
    argv += ["--solver", a.solver, "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen)]
    argv += ["--passes", "1", "--compute-dtype", dtype, "--quiet"]
    setting = ["default" if threshold is None else str(threshold), "1" if trim else "0"]
    done = subprocess.run(
        ["/usr/bin/time", "-v", sys.executable, "-c", LAUNCH, *setting, *argv],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        sys.exit(f"prune failed ({dtype}, {threshold}, {trim}):\n{done.stderr[-3000:]}")

    def field(label: str) -> str:
        return re.search(rf"{label}: (\S+)", done.stderr).group(1)

    minutes, seconds = field(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\)").split(":")[-2:]
    return {
        "compute_dtype": dtype,
        "mmap_threshold_mb": threshold,
        "trim_after_block": trim,
        "wall_seconds": int(minutes) * 60 + float(seconds),
        "peak_rss_mb": int(field(r"Maximum resident set size \(kbytes\)")) / 1024,
        "minor_faults": int(field(r"Minor \(reclaiming a frame\) page faults")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--solver", default="sparsegpt")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3, help="runs per setting")
    parser.add_argument("--json", type=Path)
    a = parser.parse_args()

    runs: list[list[dict]] = [[] for _ in SETTINGS]
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.repeat):  # interleaved, so drift over time hits every setting
            for i, (dtype, threshold, trim) in enumerate(SETTINGS):
                runs[i].append(measured(a, dtype, threshold, trim, Path(tmp) / f"run{r}-{i}"))
                print(f"done: {runs[i][-1]}", file=sys.stderr)

    def cell(values: list[float], digits: int) -> str:
        median = f"{statistics.median(values):,.{digits}f}"
        if len(values) == 1:
            return median
        return f"{median} ({min(values):,.{digits}f}-{max(values):,.{digits}f})"

    print(
        f"prunella prune {a.model} --solver {a.solver} --sparsity {a.sparsity} --nsamples "
        f"{a.nsamples} --seqlen {a.seqlen} --passes 1 (streamed), one process per run; median "
        f"(min-max) of {a.repeat} runs per setting\n"
    )
    print(
        "| forward dtype | mmap threshold | trims (layer, block) | wall (s) | peak RSS (MiB) "
        "| minor page faults |"
    )
    print("|---|---|---|---|---|---|")
    for (dtype, threshold, trim), setting in zip(SETTINGS, runs, strict=True):
        where = "glibc default" if threshold is None else f"{threshold} MiB"
        print(
            f"| {dtype} | {where} | {'yes' if trim else 'no'} "
            f"| {cell([r['wall_seconds'] for r in setting], 1)} "
            f"| {cell([r['peak_rss_mb'] for r in setting], 0)} "
            f"| {cell([r['minor_faults'] for r in setting], 0)} |"
        )
    if a.json:
        rows = [run for setting in runs for run in setting]
        record.write(a.json, {"rows": rows})


if __name__ == "__main__":
    main()
