"""Where the time of a prune goes, against the floor of plain forward passes.

Measures, on SmolLM2-135M and the same calibration windows, both on the CPU and in
batches of the prune's default size (``prunella.engine.prune.default_batch_size``, also
handed to the prune explicitly so that both agree): (1) two plain forward
passes of the windows through the decoder blocks (no hooks, no pruning) -- the
floor that a two-pass pruner cannot beat and that the ratio below is measured
against -- and (2) a full prune, with its per-phase breakdown from the engine.
Prints prune time / floor, and the top operators of one block's prune from
``torch.profiler``.

    python benchmarks/profile_prune.py --solver sparsegpt --passes auto --json profile.json
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import record
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--solver", default="sparsegpt")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--passes", default="auto")
    parser.add_argument("--json", type=Path)
    a = parser.parse_args()
    passes = int(a.passes) if a.passes in ("1", "2") else a.passes

    import prunella
    from prunella.data import calibration_windows
    from prunella.engine.device import resolve_compute_dtype
    from prunella.engine.forward import capture, forward_precision, matmuls_in
    from prunella.engine.prune import default_batch_size
    from prunella.io.models import load

    model, tokenizer, _, adapter = load(a.model)
    windows = calibration_windows(tokenizer, "sample", a.nsamples, a.seqlen, 0)
    # the floor and the prune run on the CPU with the same windows per forward pass
    # (the prune's default batch size, handed to it explicitly)
    cpu = torch.device("cpu")
    batch = default_batch_size(a.seqlen, cpu)

    # the floor runs in the precision the prune's forward uses (on CPUs with native
    # bfloat16: float32 weights and activations, matrix products in bfloat16)
    dtype, matmul_dtype = forward_precision(
        resolve_compute_dtype(next(model.parameters()).dtype, cpu), cpu
    )
    plain = copy.deepcopy(model).to(dtype)
    with torch.no_grad(), matmuls_in(matmul_dtype, cpu):
        acts = capture(plain, adapter.blocks(plain), windows, batch, cpu, dtype)
        start = time.perf_counter()
        for _ in range(2):
            hidden = list(acts.hidden)
            for i, block in enumerate(adapter.blocks(plain)):
                for b in range(len(hidden)):
                    args, kwargs = acts.calls[b][i]
                    out = block(hidden[b], *args, **kwargs)
                    hidden[b] = out[0] if isinstance(out, tuple) else out
        floor = time.perf_counter() - start
    del plain, acts

    _, report = prunella.prune(
        copy.deepcopy(model),
        tokenizer=tokenizer,
        solver=a.solver,
        sparsity=a.sparsity,
        calibration=windows,
        device="cpu",
        batch_size=batch,
        passes=passes,
        progress=False,
    )
    prune_seconds = report["wall_seconds"] - report["seconds"].get("load", 0.0)

    small = copy.deepcopy(model)
    small.model.layers = small.model.layers[:1]
    small.config.num_hidden_layers = 1
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        prunella.prune(
            small,
            tokenizer=tokenizer,
            solver=a.solver,
            sparsity=a.sparsity,
            calibration=windows,
            device="cpu",
            batch_size=batch,
            passes=passes,
            progress=False,
        )
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)

    print(
        f"SmolLM2-135M, {a.solver} {a.sparsity:.0%}, {a.nsamples} x {a.seqlen} tokens, "
        f"passes={report['passes']}, forward in {report['compute_dtype']}, "
        f"{torch.get_num_threads()} threads\n"
    )
    print("| phase | seconds |\n|---|---|")
    for phase, seconds in report["seconds"].items():
        print(f"| {phase} | {seconds:.1f} |")
    print(f"| **prune (without load)** | **{prune_seconds:.1f}** |")
    print(f"| two plain forward passes (floor) | {floor:.1f} |")
    print(f"\nprune / floor = {prune_seconds / floor:.2f}\n")
    print("Top operators, one block (torch.profiler):\n")
    print(table)
    record.write(
        a.json,
        {
            "phases": report["seconds"],
            "prune_seconds": prune_seconds,
            "floor_seconds": floor,
            "ratio": prune_seconds / floor,
            "passes": report["passes"],
        },
    )


if __name__ == "__main__":
    main()
