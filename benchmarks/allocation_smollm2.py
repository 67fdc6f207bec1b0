"""Allocation methods on SmolLM2-135M: every allocation, with Wanda and SparseGPT.

For each target sparsity, each allocation method makes its plan once with
``prunella allocate --json`` in its own process (wall time and peak RSS measured
from outside): the plans of the methods below do not depend on the solver.
Each solver then prunes with ``--allocation-file`` (its own process, timed), and
the result is evaluated by ``prunella eval --reference`` on the held-out shipped
text: perplexity and the KL divergence to the dense model. The search methods
(``evopress``, ``tpe``, ``dsa``) score candidates pruned by the solver, so they
run inside ``prunella prune`` per solver, with ``--search-minutes`` each after
their level database is built (the allocation time then includes the build).

Prints a Markdown table; ``--json PATH`` writes the raw numbers (after every run, so
a stopped run keeps what it measured), ``--table A.json B.json`` prints the table of
saved runs, and the allocation pictures are copied to ``--figures DIR`` when given.

    python benchmarks/allocation_smollm2.py --sparsities 0.7,0.6 --json alloc.json \
        --methods uniform,owl,alphapruning,erk,ecoflap,layerif,layerif+helpful,lua \
        --opt ecoflap:perturb=block --opt ecoflap:crop=128 --opt ecoflap:batch=4 \
        --opt lua:steps=50
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import record
from smollm2_runs import measured, run, smollm2_parser

METHODS = {
    "uniform": [],
    "owl": ["--allocation", "owl"],
    "alphapruning": ["--allocation", "alphapruning"],
    "alphapruning+farms": ["--allocation", "alphapruning", "--allocation-opt", "farms=true"],
    "erk": ["--allocation", "erk", "--granularity", "layer"],  # per block it is uniform here
    "ecoflap": ["--allocation", "ecoflap"],
    "layerif": ["--allocation", "layerif"],
    "layerif+helpful": ["--allocation", "layerif", "--allocation-opt", "aggregate=helpful"],
    "lua": ["--allocation", "lua"],
}
SEARCHES = {"evopress": ["--granularity", "layer"], "tpe": [], "dsa": []}


def evaluation(model: str, a) -> dict:
    out = run(["eval", model, "--data", a.data, "--seqlen", str(a.seqlen), "--reference",
               a.model, "--json", "--quiet"])  # fmt: skip
    return json.loads(out)


def method_flags(method: str, a) -> list[str]:
    """The method's flags plus ``--opt NAME:KEY=VALUE`` given on the command line (``NAME``
    the allocation's name: ``--opt layerif:length=64`` applies to both layerif rows)."""
    if method in METHODS:
        flags = list(METHODS[method])
    else:
        flags = ["--allocation", method, *SEARCHES[method]]
    if method in SEARCHES:
        flags += ["--allocation-opt", f"minutes={a.search_minutes}"]
    for option in a.opt or []:
        name, _, value = option.partition(":")
        if name == method.split("+")[0]:
            flags += ["--allocation-opt", value]
    return flags


def main() -> None:
    parser = smollm2_parser(__doc__)
    parser.add_argument("--sparsities", default="0.6,0.7")
    parser.add_argument("--solvers", default="wanda,sparsegpt")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--search-minutes", type=float, default=8.0)
    parser.add_argument("--opt", action="append", help="METHOD:KEY=VALUE, an allocation option")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--figures", type=Path, help="copy allocation.png of each run here")
    parser.add_argument(
        "--table", type=Path, nargs="+", help="print the table of these --json files"
    )
    a = parser.parse_args()
    if a.table:
        print(table([record.read(path) for path in a.table], a))
        return
    calib = ["--calib", a.calib, "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen)]

    dense = evaluation(a.model, a)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for sparsity in a.sparsities.split(","):
            for method in a.methods.split(","):
                plan, made = Path(tmp) / f"{method}-{sparsity}.json", None
                if method not in SEARCHES:
                    allocate = ["allocate", a.model, "--sparsity", sparsity]
                    made = measured(
                        [*allocate, *method_flags(method, a), *calib, "--json", str(plan)]
                    )
                for solver in a.solvers.split(","):
                    out = Path(tmp) / f"{solver}-{method}-{sparsity}"
                    given = ["--allocation-file", str(plan)] if made else method_flags(method, a)
                    prune = ["prune", a.model, "--out", str(out), "--solver", solver]
                    pruned = measured([*prune, "--sparsity", sparsity, *given, *calib, "--quiet"])
                    report = json.loads((out / "prune_report.json").read_text())
                    if a.figures:
                        a.figures.mkdir(parents=True, exist_ok=True)
                        picture = f"allocation-{method}-{solver}-{sparsity}.png"
                        shutil.copy(out / "allocation.png", a.figures / picture)
                    result = evaluation(str(out), a)
                    allocation_s = made["wall_seconds"] if made else report["seconds"]["allocation"]
                    rows.append(
                        {
                            "sparsity": float(sparsity),
                            "solver": solver,
                            "method": method,
                            "achieved": report["sparsity"],
                            "ppl": result["perplexity"],
                            "kl": result["kl_to_reference"],
                            "allocation_seconds": allocation_s,
                            "allocation_peak_mb": (made or pruned)["peak_rss_mb"],
                            "prune_seconds": pruned["wall_seconds"],
                            "prune_peak_mb": pruned["peak_rss_mb"],
                            "block_sparsity_range": _block_range(report),
                        }
                    )
                    shutil.rmtree(out)
                    print(f"done: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
                    # so far, in case the run is stopped
                    record.write(a.json, {"dense": dense, "rows": rows})
    model_mb = _model_mb(a.model)
    result = {"args": {k: str(v) for k, v in vars(a).items()}, "dense": dense,
              "model_mb": model_mb, "rows": rows}  # fmt: skip
    record.write(a.json, result)
    print(table([result], a))


def table(results: list[dict], a) -> str:
    """The Markdown table of one or more runs' JSON (e.g. one per target sparsity)."""
    rows = [r for result in results for r in result["rows"]]
    model_mb = _model_mb(a.model)
    dense = next((x["dense"]["perplexity"] for x in results if "dense" in x), None)
    lines = [
        f"SmolLM2-135M ({model_mb:.0f} MB checkpoint), calibration {a.calib} ({a.nsamples} x "
        f"{a.seqlen} tokens), perplexity and KL to the dense model on {a.data} (seqlen "
        f"{a.seqlen})" + (f"; dense perplexity {dense:.2f}" if dense else "") + "\n",
        "| sparsity | solver | allocation | ppl | vs uniform | KL | block sparsity range "
        "| allocation (s) | allocation peak (MB, x model) | prune (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        base = next(
            x["ppl"] for x in rows
            if x["sparsity"] == r["sparsity"] and x["solver"] == r["solver"]
            and x["method"] == "uniform"
        )  # fmt: skip
        low, high = r["block_sparsity_range"]
        peak = r["allocation_peak_mb"]
        lines.append(
            f"| {r['sparsity']:.0%} | {r['solver']} | {r['method']} | {r['ppl']:.2f} | "
            f"{r['ppl'] / base - 1:+.1%} | {r['kl']:.4f} | {low:.1%}-{high:.1%} | "
            f"{r['allocation_seconds']:.1f} | {peak:.0f} ({peak / model_mb:.1f}x) | "
            f"{r['prune_seconds']:.1f} |"
        )
    return "\n".join(lines)


def _model_mb(model: str) -> float:
    """The checkpoint's size in MB (float32 for SmolLM2): the unit of the memory multiples."""
    return json.loads(run(["inspect", model, "--json"]))["bytes"] / 2**20


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
