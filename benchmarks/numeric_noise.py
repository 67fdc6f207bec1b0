"""How much a prune's perplexity moves with rounding alone, the maths unchanged.

Prunes SmolLM2-135M in process (SparseGPT 2:4, two passes, 32 x 512 calibration
tokens by default) once per setting, and evaluates each result on held-out text.
A setting is the forward's precision (``--compute-dtype``) and the number of tokens
per Hessian accumulation step (``prunella.engine.stats.TOKENS``). Chunking changes only
the order of the float32 sums; each Hessian stays within ~1.5e-7 of a float64
reference. The spread of the perplexities is therefore the noise floor that any
comparison between two implementations of the same algorithm on this row has to
clear.

    python benchmarks/numeric_noise.py --json noise.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import record

SETTINGS = [
    ("bfloat16", 512),
    ("bfloat16", 1024),
    ("bfloat16", 2048),
    ("bfloat16", 4096),
    ("float32", 1024),
    ("float32", 4096),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--solver", default="sparsegpt")
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--sparsity", type=float, help="for --pattern unstructured")
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--json", type=Path)
    a = parser.parse_args()

    import prunella
    from prunella.engine import stats

    _, tokenizer = prunella.load(a.model)
    rows = []
    for dtype, tokens in SETTINGS:
        stats.TOKENS = tokens
        model, _ = prunella.prune(
            a.model,
            tokenizer=tokenizer,
            solver=a.solver,
            pattern=a.pattern,
            sparsity=a.sparsity,
            calibration="sample",
            nsamples=a.nsamples,
            seqlen=a.seqlen,
            seed=0,
            passes=a.passes,
            compute_dtype=dtype,
            progress=False,
        )
        ppl = prunella.evaluate(
            model, "sample-eval", tokenizer=tokenizer, seqlen=a.seqlen, progress=False
        )["perplexity"]
        rows.append({"compute_dtype": dtype, "tokens_per_step": tokens, "ppl": ppl})
        print(f"done: {rows[-1]}", flush=True, file=sys.stderr)

    low, high = min(r["ppl"] for r in rows), max(r["ppl"] for r in rows)
    print(
        f"{a.model}, {a.solver} {a.pattern}, {a.passes} passes, {a.nsamples} x {a.seqlen} "
        f"tokens (sample, seed 0), perplexity on sample-eval\n"
    )
    print("| forward precision | tokens per Hessian step | ppl |\n|---|---|---|")
    for r in rows:
        print(f"| {r['compute_dtype']} | {r['tokens_per_step']} | {r['ppl']:.2f} |")
    print(f"\nspread: {low:.2f} - {high:.2f} ({high / low - 1:.1%})")
    record.write(a.json, {"rows": rows})


if __name__ == "__main__":
    main()
