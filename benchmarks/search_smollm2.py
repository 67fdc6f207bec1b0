"""Allocation search on SmolLM2-135M: uniform, OWL, AlphaPruning, EvoPress, TPE, DSA.

For each target (70% unstructured, and 4:8 with mixed N:8 levels), every allocation
prunes the same model with SparseGPT on the same calibration windows (one
``prunella prune`` process each); the search methods get the same wall-clock
budget (``--minutes``) after the level database has been built once (its build
time is reported on its own line). Each output is evaluated on the held-out
shipped text: perplexity and the KL divergence to the dense model. A last part
times one fitness evaluation against a plain forward pass of the model on the
same tokens (the floor). Prints Markdown tables; ``--json PATH`` writes the raw
numbers.

    python benchmarks/search_smollm2.py --minutes 20 --json search.json
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import record
from smollm2_runs import measured, run, smollm2_parser

BASELINES = {"uniform": [], "owl": ["--allocation", "owl"],
             "alphapruning": ["--allocation", "alphapruning"]}  # fmt: skip
SEARCHES = ("evopress", "tpe", "dsa")


def target_flags(target: str) -> list[str]:
    return ["--pattern", target] if ":" in target else ["--sparsity", target]


def evaluation(model: str, a) -> dict:
    out = run(["eval", model, "--data", a.data, "--seqlen", str(a.seqlen), "--reference",
               a.model, "--json", "--quiet"])  # fmt: skip
    return json.loads(out)


def search_flags(method: str, minutes: float, a) -> list[str]:
    flags = ["--allocation", method, "--allocation-opt", f"minutes={minutes}"]
    if method == "evopress":
        flags += ["--granularity", a.evopress_granularity]
    for option in a.opt or []:
        name, _, value = option.partition(":")
        if name == method:
            flags += ["--allocation-opt", value]
    return flags


def speed(a, cache: str) -> dict:
    """Tokens per second of one KL fitness evaluation and of a plain forward pass."""
    code = f"""
import json, time, torch
from prunella.data import calibration
from prunella.methods import AXES
from prunella.methods.allocation import ALLOCATIONS
from prunella.methods.allocation.run import AllocationRun
from prunella.methods.search import open_database, search_ladder
from prunella.methods.search.fitness import KLFitness
from prunella.recipe import build
from prunella.engine.store import open_store
from prunella.engine.device import resolve_compute_dtype
store, tok = open_store({a.model!r}, "none")
cpu = torch.device("cpu")
dtype = resolve_compute_dtype(next(store.model.parameters()).dtype, cpu, "auto")
windows, _ = calibration(tok, {a.calib!r}, {a.nsamples}, {a.seqlen}, 0)
recipe = build(sparsity=0.7, solver="sparsegpt", allocation="evopress", granularity="layer")
method = ALLOCATIONS.get("evopress")
run = AllocationRun(store, windows, recipe, AXES, AXES.budgets(recipe), method,
                    method.defaults(), cpu, dtype, max(1, 4096 // {a.seqlen}), False)
ladder = search_ladder(run, 8)
db, _ = open_database(run, ladder, __import__("pathlib").Path({cache!r}) / "search")
fit = KLFitness(store, windows, db, device=cpu, dtype=dtype,
                batch_size=max(1, 4096 // {a.seqlen}))
ids = list(range(min(32, len(windows))))
levels = dict.fromkeys(db.ladder.names, 0)
fit(levels, ids)  # the dense reference of these windows, once
tick = time.perf_counter(); fit(levels, ids); fitness_s = time.perf_counter() - tick
batch = max(1, 4096 // {a.seqlen})
from prunella.engine.forward import forward_precision, matmuls_in, on_device
run_dtype, matmul_dtype = forward_precision(dtype, cpu)  # the precision the fitness runs in
with torch.no_grad(), on_device(store.model, cpu, run_dtype), matmuls_in(matmul_dtype, cpu):
    tick = time.perf_counter()
    for b in range(0, len(ids), batch):
        store.model(input_ids=windows[ids[b:b + batch]], use_cache=False)
    forward_s = time.perf_counter() - tick
tokens = len(ids) * {a.seqlen}
print(json.dumps({{"tokens": tokens, "fitness_tok_s": tokens / fitness_s,
                  "forward_tok_s": tokens / forward_s}}))
"""
    return measured(["-c", code])


def main() -> None:
    parser = smollm2_parser(__doc__)
    parser.set_defaults(nsamples=128)
    parser.add_argument("--targets", default="0.7,4:8")
    parser.add_argument("--methods", default=",".join([*BASELINES, *SEARCHES]))
    parser.add_argument("--minutes", type=float, default=20.0, help="budget of each search")
    parser.add_argument("--evopress-granularity", default="layer")
    parser.add_argument("--opt", action="append", help="METHOD:KEY=VALUE, a search's option")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results here")
    a = parser.parse_args()
    methods = a.methods.split(",")
    common = ["--solver", "sparsegpt", "--calib", a.calib, "--nsamples", str(a.nsamples),
              "--seqlen", str(a.seqlen), "--quiet"]  # fmt: skip

    rows, builds = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        cache = os.environ.setdefault("PRUNELLA_HOME", str(Path(tmp) / "cache"))
        dense = evaluation(a.model, a)["perplexity"]
        for target in a.targets.split(","):
            if any(m in SEARCHES for m in methods):  # the level database, built once (a
                # search with no time: it builds the database and stops)
                tick = time.perf_counter()
                run(["allocate", a.model, *target_flags(target), *common, "--allocation",
                     "evopress", "--allocation-opt", "minutes=1e-9"])  # fmt: skip
                builds[target] = time.perf_counter() - tick
            for method in methods:
                out = str(Path(tmp) / f"{method}-{target.replace(':', '-')}")
                flags = BASELINES.get(method)
                if flags is None:
                    flags = search_flags(method, a.minutes, a)
                result = measured(["prune", a.model, "--out", out, *target_flags(target),
                                   *common, *flags])  # fmt: skip
                report = json.loads((Path(out) / "prune_report.json").read_text())
                search = report["plan"]["axes"]["sparsity"]["params"].get("search", {})
                scored = evaluation(out, a)
                rows.append({
                    "target": target, "method": method, "ppl": scored["perplexity"],
                    "kl": scored["kl_to_reference"], "achieved": report["sparsity"],
                    "evaluations": search.get("evaluations"),
                    "search_kl": search.get("best_kl"), "wall_s": result["wall_seconds"],
                    "peak_rss_mb": result["peak_rss_mb"],
                    "formula": report["plan"]["axes"]["sparsity"]["params"].get("formula"),
                })  # fmt: skip
                print(f"done: {target} {method}: ppl {rows[-1]['ppl']:.2f}", file=sys.stderr)
        floor = None if a.skip_speed else json.loads(speed(a, cache)["stdout"])

    print(
        f"{a.model}, SparseGPT, calibration {a.calib} ({a.nsamples} x {a.seqlen} tokens), "
        f"held-out {a.data} (seqlen {a.seqlen}); dense perplexity {dense:.2f}; "
        f"searches {a.minutes:g} min each\n"
    )
    print("| target | allocation | ppl | vs uniform | KL to dense | evaluations | "
          "wall (s) | peak RSS (MB) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = next(x["ppl"] for x in rows if x["target"] == r["target"]
                    and x["method"] == "uniform") if "uniform" in methods else r["ppl"]  # fmt: skip
        evaluations = "" if r["evaluations"] is None else str(r["evaluations"])
        print(
            f"| {r['target']} | {r['method']} | {r['ppl']:.2f} | {r['ppl'] / base - 1:+.1%} | "
            f"{r['kl']:.4f} | {evaluations} | {r['wall_s']:.0f} | {r['peak_rss_mb']:.0f} |"
        )
    for r in rows:
        if r["formula"]:
            print(f"\nDSA function found at {r['target']}: `{r['formula']}`")
    for name, seconds in builds.items():
        print(f"\nlevel database {name}: built in {seconds:.0f} s")
    if floor:
        print(
            f"\nfitness: {floor['fitness_tok_s']:.0f} tokens/s; plain forward pass: "
            f"{floor['forward_tok_s']:.0f} tokens/s ({floor['tokens']} tokens)"
        )
    record.write(
        a.json,
        {"dense_ppl": dense, "rows": rows, "builds": builds, "speed": floor, "minutes": a.minutes},
    )


if __name__ == "__main__":
    main()
