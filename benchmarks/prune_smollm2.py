"""Prune SmolLM2-135M with every solver at 50% unstructured and 2:4.

Each prune runs as its own ``prunella prune`` process (so its peak RSS is its
own) and each result is evaluated by ``prunella eval`` on the held-out shipped
text. Prints a Markdown table; ``--json PATH`` also writes the raw numbers.

    python benchmarks/prune_smollm2.py --nsamples 32 --seqlen 512 --json bench.json
"""

from __future__ import annotations

import json
import platform
import sys
import tempfile
from pathlib import Path

import record
import torch
from smollm2_runs import evaluate, run, smollm2_parser


def main() -> None:
    parser = smollm2_parser(__doc__)
    parser.add_argument("--solvers", default="magnitude,wanda,sparsegpt")
    parser.add_argument("--patterns", default="unstructured,2:4")
    parser.add_argument("--json", type=Path, help="also write the results here")
    a = parser.parse_args()

    dense = evaluate(a.model, a)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for pattern in a.patterns.split(","):
            for solver in a.solvers.split(","):
                out = Path(tmp) / f"{solver}-{pattern.replace(':', 'of')}"
                run(
                    [
                        "prune",
                        a.model,
                        "--out",
                        str(out),
                        "--solver",
                        solver,
                        "--pattern",
                        pattern,
                        *(["--sparsity", "0.5"] if pattern == "unstructured" else []),
                        "--calib",
                        a.calib,
                        "--nsamples",
                        str(a.nsamples),
                        "--seqlen",
                        str(a.seqlen),
                        "--quiet",
                    ]
                )
                report = json.loads((out / "prune_report.json").read_text())
                result = evaluate(str(out), a)
                rows.append(
                    {
                        "solver": solver,
                        "pattern": pattern,
                        "sparsity": report["sparsity"],
                        "ppl_dense": dense["perplexity"],
                        "ppl": result["perplexity"],
                        "prune_seconds": report["wall_seconds"],
                        "peak_rss_mb": report["peak_rss_mb"],
                        "seconds": report["seconds"],
                    }
                )
                print(f"done: {solver} {pattern}", file=sys.stderr)

    print(
        f"SmolLM2-135M, calibration {a.calib} ({a.nsamples} x {a.seqlen} tokens), "
        f"perplexity on {a.data} ({dense['tokens']} tokens, seqlen {a.seqlen}); "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}\n"
    )
    print(
        "| solver | pattern | sparsity | ppl dense | ppl pruned | prune time (s) | peak RSS (MiB) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['solver']} | {r['pattern']} | {r['sparsity']:.1%} | {r['ppl_dense']:.2f} | "
            f"{r['ppl']:.2f} | {r['prune_seconds']:.1f} | {r['peak_rss_mb']:.0f} |"
        )
    record.write(a.json, {"dense": dense, "rows": rows})


if __name__ == "__main__":
    main()
