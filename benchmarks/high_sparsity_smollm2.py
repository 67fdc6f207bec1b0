"""High sparsity on SmolLM2-135M: solvers {sparsegpt, alps} x rows {uniform, trim}.

Every combination prunes the same model on the same calibration windows (each its own
``prunella prune`` process, so its peak RSS is its own); then one ``prunella compare``
gives every result's perplexity on the held-out shipped text and its KL divergence to
the dense model. TRIM does not apply to ``N:M`` (the pattern fixes each row's count),
so those rows run with uniform rows only. ALPS with TRIM searches the row budgets with
SparseGPT inside TRIM's iterations (``--rows-opt proxy=sparsegpt``): with ALPS itself
every one of TRIM's re-prunes would be an ADMM run. The last lines give ALPS's time
against its floor, one float64 eigendecomposition per distinct layer input.

    python benchmarks/high_sparsity_smollm2.py --json high.json
    python benchmarks/high_sparsity_smollm2.py --table high-a.json high-b.json  # merge runs

With ``--table``, a row from a later file replaces an earlier one of the same level,
solver and rows (a re-measurement).
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import record
import torch
from smollm2_runs import run, smollm2_parser


def prune(out: Path, level: str, solver: str, rows: str, a) -> dict:
    pattern = ["--pattern", level] if ":" in level else ["--sparsity", level]
    extra = ["--rows-opt", "proxy=sparsegpt"] if rows == "trim" and solver == "alps" else []
    args = ["prune", a.model, "--out", str(out), "--solver", solver, "--rows", rows, *pattern]
    args += ["--calib", a.calib, "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen)]
    run([*args, *extra, "--quiet"])
    report = json.loads((out / "prune_report.json").read_text())
    layers = report["layers"]
    iterations = [r["iterations"] for r in layers if "iterations" in r]
    return {
        "level": level,
        "solver": solver,
        "rows": rows,
        "sparsity": report["sparsity"],
        "prune_seconds": report["wall_seconds"],
        "solve_seconds": report["seconds"].get("solve", 0.0),
        "peak_rss_mb": report["peak_rss_mb"],
        "alps_mean_iterations": statistics.mean(iterations) if iterations else None,
        "alps_not_converged": sum(1 for r in layers if r.get("converged") is False),
        "alps_fallbacks": sum(1 for r in layers if r.get("fallback")),
        "trim_layers_changed": sum(1 for r in layers if r.get("rows_rate", 0.0) != 0.0),
        "layers": len(layers),
    }


def eigh_floor(model_dir: str) -> dict:
    """Seconds of one float64 eigendecomposition per distinct layer input of a block
    (attention, attention output, MLP, MLP down), times the number of blocks."""
    from prunella.io.checkpoint import read_config, resolve

    config = read_config(resolve(model_dir))
    sizes = [config["hidden_size"]] * 3 + [config["intermediate_size"]]
    seconds = 0.0
    for n in sizes:
        a = torch.randn(n, n, dtype=torch.float64)
        h = a @ a.t() + n * torch.eye(n, dtype=torch.float64)
        times = []
        for _ in range(3):
            tick = time.perf_counter()
            torch.linalg.eigh(h)
            times.append(time.perf_counter() - tick)
        seconds += min(times)
    return {"blocks": config["num_hidden_layers"], "seconds": seconds * config["num_hidden_layers"]}


def table(rows: list[dict], dense_ppl: float, floor: dict | None) -> None:
    base = {r["level"]: r for r in rows if r["solver"] == "sparsegpt" and r["rows"] == "uniform"}
    print(
        "| pattern | solver | rows | ppl | vs SparseGPT | KL to dense | prune (s) | "
        "solve (s) | peak RSS (MiB) | ALPS iters (mean) | not converged / fallbacks |"
        " TRIM changed |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ref = base.get(r["level"])
        ratio = f"{r['ppl'] / ref['ppl']:.3f}" if ref else "-"
        iters = f"{r['alps_mean_iterations']:.0f}" if r["alps_mean_iterations"] else "-"
        alps = f"{r['alps_not_converged']} / {r['alps_fallbacks']}" if iters != "-" else "-"
        level = r["level"] if ":" in r["level"] else f"{float(r['level']):.0%}"
        trimmed = f"{r['trim_layers_changed']}/{r['layers']}" if r["rows"] == "trim" else "-"
        print(
            f"| {level} | {r['solver']} | {r['rows']} | {r['ppl']:.2f} | {ratio} | "
            f"{r['kl']:.4f} | {r['prune_seconds']:.0f} | {r['solve_seconds']:.0f} | "
            f"{r['peak_rss_mb']:.0f} | {iters} | {alps} | {trimmed} |"
        )
    print(f"\ndense perplexity {dense_ppl:.2f}")
    for r in rows:
        ref = base.get(r["level"])
        if r["solver"] == "alps" and r["rows"] == "uniform" and ref:
            print(
                f"ALPS {r['level']}: prune time {r['prune_seconds'] / ref['prune_seconds']:.2f} x "
                f"SparseGPT's; solve {r['solve_seconds']:.0f} s"
                + (
                    f" against an eigendecomposition floor of {floor['seconds']:.0f} s"
                    if floor
                    else ""
                )
            )


def main() -> None:
    parser = smollm2_parser(__doc__)
    parser.add_argument("--levels", default="0.6,0.7,0.8,2:4", help="sparsities and N:M patterns")
    parser.add_argument("--solvers", default="sparsegpt,alps")
    parser.add_argument("--rows", default="uniform,trim")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--table", type=Path, nargs="+", help="print one table from JSON files")
    a = parser.parse_args()

    if a.table:
        loaded = [record.read(p) for p in a.table]
        merged = {}  # a later file's row replaces an earlier one of the same combination
        for r in (r for data in loaded for r in data["rows"]):
            merged[r["level"], r["solver"], r["rows"]] = r
        rows = list(merged.values())
        table(rows, loaded[0]["dense_ppl"], loaded[0].get("floor"))
        return

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        outs = []
        for level in a.levels.split(","):
            for solver in a.solvers.split(","):
                for rows_method in a.rows.split(","):
                    if rows_method != "uniform" and ":" in level:
                        continue  # N:M fixes every row's count
                    out = Path(tmp) / f"{solver}-{rows_method}-{level.replace(':', 'of')}"
                    rows.append(prune(out, level, solver, rows_method, a))
                    outs.append(str(out))
                    print(f"done: {level} {solver} {rows_method}", file=sys.stderr)
        compared = json.loads(
            run(["compare", a.model, *outs, "--data", a.data, "--seqlen", str(a.seqlen), "--json"])
        )
    for r, c in zip(rows, compared[1:], strict=True):
        r["ppl"], r["kl"] = c["perplexity"], c["kl_to_first"]
    floor = eigh_floor(a.model) if "alps" in a.solvers else None

    print(
        f"SmolLM2-135M, calibration {a.calib} ({a.nsamples} x {a.seqlen} tokens), "
        f"perplexity and KL on {a.data} (seqlen {a.seqlen}); "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}\n"
    )
    table(rows, compared[0]["perplexity"], floor)
    record.write(a.json, {"dense_ppl": compared[0]["perplexity"], "floor": floor, "rows": rows})


if __name__ == "__main__":
    main()
