"""Structured pruning of SmolLM2-135M to a fraction of its decoder blocks' parameters:
Prunella's allocated structure against ShortGPT (whole blocks only) and uniform MLP
channels by activation-weighted magnitude without reconstruction, at the same budget.

Each cut is its own ``prunella prune --params P`` process (its time and peak RSS its
own); each checkpoint is then measured as transformers loads it, in a fresh process
per model: perplexity and KL to the dense model on the held-out shipped text
(``prunella eval --reference``), parameters, bytes on disk, prefill tokens/s (one
``--prompt``-token forward), decode tokens/s (greedy ``generate`` with the KV cache, batch
1: ``(new - 1) / (t(new) - t(1))``, so the prompt's prefill is not counted), each the
median of ``--repeats``, and that process's peak RSS. The speeds are timed last, one
checkpoint after the other, the dense model first and last (its row gives their mean;
the JSON both). Prints a Markdown table; ``--json PATH`` also writes the raw numbers.

    python benchmarks/structure_smollm2.py --params 0.8,0.7 --json structure.json
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import record
from smollm2_runs import measured, run, smollm2_parser

# each variant: its flags; "prunella" is the default (depth x width, SlimGPT, least KL)
VARIANTS = {
    "prunella": [],
    "shortgpt": ["--cut", "depth"],
    "channels": ["--cut", "width", "--width-method", "magnitude"],
    # the candidates' winner, then EvoPress over depth and width together
    "evopress": ["--allocation", "evopress", "--allocation-opt", "minutes=12"],
    # the same, TPE over the same genome
    "tpe": ["--allocation", "tpe", "--allocation-opt", "minutes=12"],
}

SPEED = r"""
import json, statistics, sys, time
import torch
from transformers import AutoModelForCausalLM
from prunella.io.checkpoint import resolve

path, prompt, new, repeats = resolve(sys.argv[1]), *map(int, sys.argv[2:5])
model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
ids = torch.randint(100, 20000, (1, prompt), generator=torch.Generator().manual_seed(0))

def seconds(fn):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)

def generate(n):
    return lambda: model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)

with torch.inference_mode():
    generate(4)()  # warm-up
    prefill = seconds(lambda: model(ids))
    one, many = seconds(generate(1)), seconds(generate(new))
blocks = model.get_decoder().layers
print(json.dumps({
    "prefill_tokens_per_s": prompt / prefill,
    "decode_tokens_per_s": (new - 1) / (many - one),
    "parameters": sum(p.numel() for p in model.parameters()),
    "block_parameters": sum(p.numel() for p in blocks.parameters()),
    "blocks": len(blocks),
    "intermediate_size": model.config.intermediate_size,
    "kv_heads": model.config.num_key_value_heads,
}))
"""


def speed(model: str, a) -> dict:
    """Parameters, prefill and decode tokens/s and peak RSS of ``model`` in transformers."""
    done = measured(["-c", SPEED, model, str(a.prompt), str(a.new), str(a.repeats)])
    return {**json.loads(done["stdout"]), "peak_rss_mb": done["peak_rss_mb"]}


def evaluate(model: str, a) -> dict:
    out = run(["eval", model, "--data", a.data, "--seqlen", str(a.seqlen), "--reference",
               a.model, "--json", "--quiet"])  # fmt: skip
    return json.loads(out)


def table(dense: dict, rows: list[dict], a) -> None:
    """The Markdown table of a run (``a``: its arguments), and the ratio to the better
    baseline per budget."""
    print(f"SmolLM2-135M, {a.nsamples} x {a.seqlen} calibration tokens ({a.calib}), "
          f"perplexity and KL on {a.data} at {a.seqlen}; decode: {a.new} tokens after a "
          f"{a.prompt}-token prompt, batch 1, median of {a.repeats}\n")  # fmt: skip
    print("| params kept | variant | blocks | MLP | KV heads | block params | ppl | KL | "
          "MiB | prefill tok/s | decode tok/s | decode vs dense | peak RSS MiB | "
          "prune s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in [{"params": 1.0, "variant": "dense", **dense}, *rows]:
        mib = f"{r['checkpoint_bytes'] / 2**20:.1f}" if r.get("checkpoint_bytes") else "-"
        print(f"| {r['params']:.0%} | {r['variant']} | {r['blocks']} | "
              f"{r['intermediate_size']} | {r['kv_heads']} | {r['block_parameters']:,} | "
              f"{r['perplexity']:.3f} | {r.get('kl_to_reference', 0.0):.4f} | {mib} | "
              f"{r['prefill_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.1f} | "
              f"{r['decode_tokens_per_s'] / dense['decode_tokens_per_s']:.3f}x | "
              f"{r['peak_rss_mb']:.0f} | {r.get('prune_seconds', 0):.0f} |")  # fmt: skip
    for params in sorted({r["params"] for r in rows}, reverse=True):
        same = {r["variant"]: r for r in rows if r["params"] == params}
        baselines = [same[v]["perplexity"] for v in ("shortgpt", "channels") if v in same]
        if "prunella" in same and baselines:
            ratio = same["prunella"]["perplexity"] / min(baselines)
            print(f"\n{params:.0%}: Prunella's perplexity is {ratio:.3f}x the better baseline's")


def main() -> None:
    parser = smollm2_parser(__doc__)
    parser.add_argument("--params", default="0.8,0.7", help="fractions kept, comma-separated")
    parser.add_argument(
        "--variants",
        default="prunella,shortgpt,channels",
        help=f"comma-separated, of {', '.join(VARIANTS)}",
    )
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--new", type=int, default=64, help="tokens decoded")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--print", type=Path, help="only print the table of a JSON written before")
    a = parser.parse_args()
    if a.print is not None:
        run = json.loads(a.print.read_text())
        argv = run["command"].split()[2:]
        table(**run["results"], a=parser.parse_args(argv))
        return

    dense = evaluate(a.model, a)
    rows, outs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for params in (float(p) for p in a.params.split(",")):
            for variant in a.variants.split(","):
                out = Path(tmp) / f"{variant}-{params}"
                argv = ["prune", a.model, "--out", str(out), "--params", f"{params:g}",
                        *VARIANTS[variant], "--calib", a.calib, "--nsamples", str(a.nsamples),
                        "--seqlen", str(a.seqlen), "--quiet"]  # fmt: skip
                pruned = measured(argv)
                report = json.loads((out / "prune_report.json").read_text())["structure"]
                rows.append({
                    "params": params, "variant": variant, **evaluate(str(out), a),
                    "kept_fraction": report["kept_fraction"],
                    "removed_blocks": report["removed_blocks"],
                    "fitness_kl": report["kl"], "candidates": report["candidates"],
                    "candidate_kl": report["candidate_kl"], "search": report["search"],
                    "checkpoint_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors")),
                    "prune_seconds": pruned["wall_seconds"],
                    "prune_peak_rss_mb": pruned["peak_rss_mb"],
                })  # fmt: skip
                outs.append(str(out))
                print(f"pruned {variant} at {params:g}", file=sys.stderr, flush=True)
        # the speeds last, one after the other, the dense model first and last (its figure
        # is their mean; their spread says how steady the machine was)
        print("timing decode and prefill", file=sys.stderr, flush=True)
        first = speed(a.model, a)
        for row, out in zip(rows, outs, strict=True):
            row.update(speed(out, a))
        last = speed(a.model, a)
        dense.update(first)
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "peak_rss_mb"):
            dense[key] = (first[key] + last[key]) / 2
            dense[f"{key}_first_last"] = [first[key], last[key]]
        dense["checkpoint_bytes"] = None

    table(dense, rows, a)
    record.write(a.json, {"dense": dense, "rows": rows})


if __name__ == "__main__":
    main()
