"""Allocation methods on SmolLM2-135M: uniform, OWL, AlphaPruning, AlphaPruning + FARMS.

For each target sparsity and solver, every allocation method prunes the same
model on the same calibration windows (each prune its own ``prunella prune``
process) and the result is evaluated by ``prunella eval`` on the held-out
shipped text. Prints a Markdown table (perplexity, prune wall time, time spent
on the allocation itself); ``--json PATH`` writes the raw numbers, and the
allocation pictures are copied to ``--figures DIR`` when given.

    python benchmarks/allocation_smollm2.py --sparsities 0.6,0.7 --json alloc.json
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from smollm2_runs import evaluate, run, smollm2_parser

METHODS = {
    "uniform": [],
    "owl": ["--allocation", "owl"],
    "alphapruning": ["--allocation", "alphapruning"],
    "alphapruning+farms": ["--allocation", "alphapruning", "--allocation-opt", "farms=true"],
    "erk": ["--allocation", "erk"],
}


def perplexity(model: str, a) -> float:
    return evaluate(model, a)["perplexity"]


def main() -> None:
    parser = smollm2_parser(__doc__)
    parser.add_argument("--sparsities", default="0.6,0.7")
    parser.add_argument("--solvers", default="wanda,sparsegpt")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--figures", type=Path, help="copy allocation.png of each run here")
    a = parser.parse_args()

    dense = perplexity(a.model, a)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for sparsity in a.sparsities.split(","):
            for solver in a.solvers.split(","):
                for method in a.methods.split(","):
                    out = Path(tmp) / f"{solver}-{method}-{sparsity}"
                    run(
                        [
                            "prune",
                            a.model,
                            "--out",
                            str(out),
                            "--solver",
                            solver,
                            "--sparsity",
                            sparsity,
                            *METHODS[method],
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
                    if a.figures:
                        a.figures.mkdir(parents=True, exist_ok=True)
                        shutil.copy(
                            out / "allocation.png",
                            a.figures / f"allocation-{method}-{solver}-{sparsity}.png",
                        )
                    rows.append(
                        {
                            "sparsity": float(sparsity),
                            "solver": solver,
                            "method": method,
                            "achieved": report["sparsity"],
                            "ppl": perplexity(str(out), a),
                            "prune_seconds": report["wall_seconds"],
                            "allocation_seconds": report["seconds"].get("allocation", 0.0),
                            "block_sparsity_range": _block_range(report),
                        }
                    )
                    print(
                        f"done: {sparsity} {solver} {method}: {rows[-1]['ppl']:.2f}",
                        file=sys.stderr,
                    )

    print(
        f"SmolLM2-135M, calibration {a.calib} ({a.nsamples} x {a.seqlen} tokens), perplexity "
        f"on {a.data} (seqlen {a.seqlen}); dense perplexity {dense:.2f}\n"
    )
    print(
        "| sparsity | solver | allocation | ppl | vs uniform | block sparsity range "
        "| prune time (s) | of which allocation (s) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = next(
            x["ppl"]
            for x in rows
            if x["sparsity"] == r["sparsity"]
            and x["solver"] == r["solver"]
            and x["method"] == "uniform"
        )
        low, high = r["block_sparsity_range"]
        print(
            f"| {r['sparsity']:.0%} | {r['solver']} | {r['method']} | {r['ppl']:.2f} | "
            f"{r['ppl'] / base - 1:+.1%} | {low:.1%}-{high:.1%} | {r['prune_seconds']:.1f} | "
            f"{r['allocation_seconds']:.1f} |"
        )
    if a.json:
        a.json.write_text(
            json.dumps(
                {"args": {k: str(v) for k, v in vars(a).items()}, "dense_ppl": dense, "rows": rows},
                indent=2,
            )
        )


def _block_range(report: dict) -> tuple[float, float]:
    pruned: dict[str, list[float]] = {}
    for layer in report["layers"]:
        block = ".".join(layer["name"].split(".")[:3])
        numel = layer["shape"][0] * layer["shape"][1]
        entry = pruned.setdefault(block, [0.0, 0.0])
        entry[0] += layer["sparsity"] * numel
        entry[1] += numel
    values = [p / n for p, n in pruned.values()]
    return min(values), max(values)


if __name__ == "__main__":
    main()
