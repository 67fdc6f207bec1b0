"""Quantize SmolLM2-135M with round to nearest and GPTQ at 8, 4 and 3 bits (and 4 bits
on a 50% sparse model), written as compressed-tensors checkpoints; with ``--averages``,
also GPTQ at widths mixed by allocations (``--allocation``, comma-separated, default
``lwq``; a search's options by ``--allocation-opt METHOD:KEY=VALUE``) to those averages
in bits per weight, scales counted, each compared with the line joining the uniform
GPTQ rows (perplexity against block-layer bytes) and with uniform 3-bit GPTQ;
``--quantizer-opt KEY=VALUE`` sets a quantizer option for every run (``observer=mse``).

Each run is its own ``prunella prune`` process (its peak RSS its own), with perplexity
on the held-out shipped text twice: of the model in memory (``--eval-data``) and of
the written checkpoint as transformers loads it (``prunella eval``); bytes are those
of the block layers in the checkpoint (packed codes, scales) against their bfloat16
bytes. Prints a Markdown table; ``--json PATH`` also writes the raw numbers.

    python benchmarks/bits_smollm2.py --nsamples 32 --seqlen 512 --json bits.json
    python benchmarks/bits_smollm2.py --rows gptq:2,gptq:3,gptq:4,gptq:8 \
        --averages 2.5,3,3.5 --allocation lwq,evopress --allocation-opt evopress:minutes=4 \
        --granularity evopress:layer --json bits-curve.json
"""

from __future__ import annotations

import itertools
import json
import tempfile
from pathlib import Path

import record
from safetensors import safe_open
from smollm2_runs import evaluate, measured, smollm2_parser

ROWS = "rtn:8,gptq:8,rtn:4,gptq:4,rtn:3,gptq:3,gptq:4:0.5"  # quantizer:bits[:sparsity]


def parse_rows(text: str) -> list[tuple[str, float, float | None]]:
    rows = []
    for item in filter(None, text.split(",")):
        quantizer, bits, *sparsity = item.split(":")
        rows.append((quantizer, float(bits), float(sparsity[0]) if sparsity else None))
    return rows


def block_layer_bytes(out: Path, layers: list[str]) -> int:
    """Bytes of the block layers' tensors (packed codes, scales, shapes) in ``out``."""
    total = 0
    for file in out.glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118  (a safetensors handle, not a dict)
                if any(key.startswith(layer + ".") for layer in layers):
                    tensor = f.get_tensor(key)
                    total += tensor.numel() * tensor.element_size()
    return total


def main() -> None:
    parser = smollm2_parser(__doc__)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--rows", default=ROWS, help="quantizer:bits[:sparsity], comma-separated")
    parser.add_argument("--averages", default="", help="average bits (scales counted), GPTQ")
    parser.add_argument("--allocation", default="lwq", help="what mixes the widths (a, b, ...)")
    parser.add_argument("--allocation-opt", action="append", default=[],
                        help="METHOD:KEY=VALUE, an allocation's option")  # fmt: skip
    parser.add_argument("--granularity", action="append", default=[],
                        help="METHOD:block|layer, an allocation's units")  # fmt: skip
    parser.add_argument("--quantizer-opt", action="append", default=[],
                        help="KEY=VALUE, a quantizer option of every run")  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the results here")
    a = parser.parse_args()

    dense = evaluate(a.model, a)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = [(*row, "uniform") for row in parse_rows(a.rows)]
        averages = [float(b) for b in filter(None, a.averages.split(","))]
        allocations = list(filter(None, a.allocation.split(",")))
        runs += [("gptq", b, None, m) for m in allocations for b in averages]
        for quantizer, bits, sparsity, allocation in runs:
            out = Path(tmp) / f"{quantizer}-{bits}-{sparsity}-{allocation}"
            argv = ["prune", a.model, "--out", str(out), "--bits", f"{bits:g}",
                    "--allocation", allocation, *allocation_opts(a.allocation_opt, allocation),
                    *granularity(a.granularity, allocation),
                    "--quantizer", quantizer, "--group-size", str(a.group_size),
                    *(arg for opt in a.quantizer_opt for arg in ("--quantizer-opt", opt)),
                    *(["--sparsity", str(sparsity)] if sparsity else []),
                    "--calib", a.calib, "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen),
                    "--eval-data", a.data, "--quiet"]  # fmt: skip
            run = measured(argv)
            report = json.loads((out / "prune_report.json").read_text())
            loaded = evaluate(str(out), a)
            layers = [layer["name"] for layer in report["layers"]]
            bf16 = sum(2 * r * c for r, c in (layer["shape"] for layer in report["layers"]))
            packed = block_layer_bytes(out, layers)
            rows.append({
                "quantizer": quantizer, "bits": bits, "sparsity": sparsity,
                "allocation": allocation, "group_size": a.group_size,
                "quantizer_options": report["axes"]["bits"]["quantizer_options"],
                "bits_per_weight": report["axes"]["bits"]["bits_per_weight"],
                "zeros": report["sparsity"],
                "bits_per_weight_bitmask": bitmask_bits(report, bits) if sparsity else None,
                "widths": report["axes"]["bits"]["widths"],
                "ppl_in_memory": report["evaluation"]["perplexity"],
                "ppl_checkpoint": loaded["perplexity"],
                "block_layer_bytes": packed, "block_layer_bf16_bytes": bf16,
                "checkpoint_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors")),
                "seconds": run["wall_seconds"], "peak_rss_mb": run["peak_rss_mb"],
                "prune_seconds": report["seconds"],
            })  # fmt: skip

    print(f"SmolLM2-135M, {a.nsamples} x {a.seqlen} calibration tokens ({a.calib}), "
          f"perplexity on {a.data}; dense {dense['perplexity']:.3f}\n")  # fmt: skip
    print("| quantizer | bits | allocation | bits per weight (scales) | sparsity | "
          "bits per weight, sparse codes + bitmask | "
          "ppl (in memory) | ppl (checkpoint) | block layers vs bf16 | checkpoint MiB | "
          "time (s) | peak RSS (MiB) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['quantizer']} | {r['bits']:g} | {r['allocation']} | "
              f"{r['bits_per_weight']:.3f} | {r['sparsity'] or 0:.0%} | "
              f"{'' if r['sparsity'] is None else format(r['bits_per_weight_bitmask'], '.3f')} | "
              f"{r['ppl_in_memory']:.3f} | {r['ppl_checkpoint']:.3f} | "
              f"{r['block_layer_bytes'] / r['block_layer_bf16_bytes']:.3f}x | "
              f"{r['checkpoint_bytes'] / 2**20:.1f} | {r['seconds']:.1f} | "
              f"{r['peak_rss_mb']:.0f} |")  # fmt: skip
    for line in against_uniform(rows):
        print(line)
    record.write(a.json, {"dense_perplexity": dense["perplexity"], "rows": rows})


def bitmask_bits(report: dict, bits: float) -> float:
    """What a weight would cost if a sparse quantized layer kept only its non-zero codes
    and a one-bit mask (compressed-tensors' sparse-bitmask idea on codes; no engine
    serves it): ``bits (1 - zeros) + 1`` plus the scales."""
    with_scales = report["axes"]["bits"]["bits_per_weight"]
    return bits * (1 - report["sparsity"]) + 1 + (with_scales - bits)


def allocation_opts(given: list[str], method: str) -> list[str]:
    """``--allocation-opt KEY=VALUE`` for each ``METHOD:KEY=VALUE`` of ``method``."""
    return [arg for opt in given if opt.startswith(method + ":")
            for arg in ("--allocation-opt", opt.split(":", 1)[1])]  # fmt: skip


def granularity(given: list[str], method: str) -> list[str]:
    """``--granularity VALUE`` of a ``METHOD:VALUE``."""
    found = [g.split(":", 1)[1] for g in given if g.startswith(method + ":")]
    return ["--granularity", found[-1]] if found else []


def against_uniform(rows: list[dict]) -> list[str]:
    """Each allocated row's perplexity against the line joining the uniform GPTQ rows
    (by block-layer bytes) and against uniform 3-bit GPTQ."""
    uniform = sorted(
        (r["block_layer_bytes"], r["ppl_in_memory"], r["bits"]) for r in rows
        if r["allocation"] == "uniform" and r["quantizer"] == "gptq" and not r["sparsity"]
    )  # fmt: skip
    lines = []
    for r in rows:
        if r["allocation"] == "uniform":
            continue
        size, text = r["block_layer_bytes"], f"{r['allocation']} at {r['bits']:g} bits:"
        for (x0, y0, _), (x1, y1, _) in itertools.pairwise(uniform):
            if x0 <= size <= x1:
                line = y0 + (y1 - y0) * (size - x0) / (x1 - x0)
                r["ppl_uniform_line"] = line
                text += f" {r['ppl_in_memory'] / line:.3f}x the uniform line ({line:.3f})"
        three = [y for _, y, b in uniform if b == 3]
        if three:
            r["vs_uniform_3bit"] = r["ppl_in_memory"] / three[0]
            text += f", {r['vs_uniform_3bit']:.3f}x uniform 3-bit GPTQ"
        lines.append(text)
    return lines


if __name__ == "__main__":
    main()
