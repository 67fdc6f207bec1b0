"""Prune a SmolLM2-135M-shaped model on a CUDA GPU: every solver's time and peak memory,
and how close its masks are to the same prune on the CPU.

The model has SmolLM2-135M's configuration (30 blocks, hidden 576, MLP 1536, 9 query
and 3 key-value heads, vocabulary 49152) with seeded random weights, so the script
needs no checkpoint on the GPU machine; the solvers' time does not depend on what the
weights are. Calibration is random token windows (``--nsamples`` x ``--seqlen``, 128 x
2048 by default: the papers' setting). Each solver prunes a fresh copy to 50%
(``--sparsity``) with ``--device cuda``; each quantizer (``--quantizers``) quantizes a
fresh copy to ``--bits`` instead. ``--cpu-check`` also compresses the first blocks'
worth on the CPU and reports the share of weights whose mask agrees (for a quantizer:
whose value is the same).

    python benchmarks/gpu_prune.py --json gpu.json
    python benchmarks/gpu_prune.py --solvers sparsegpt --nsamples 32 --seqlen 512
    python benchmarks/gpu_prune.py --solvers "" --quantizers rtn,gptq --bits 4 --cpu-check
"""

from __future__ import annotations

import argparse
import copy
import platform
import time
from pathlib import Path

import record
import torch

import prunella


def smollm2_shaped(layers: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
        rope_theta=100000.0, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # trained-like scale: small weights, not the init's
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--solvers", default="magnitude,wanda,sparsegpt,alps")
    parser.add_argument("--quantizers", default="", help="e.g. rtn,gptq")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--cpu-check", action="store_true", help="compare masks with the CPU")
    parser.add_argument("--json", help="also write the rows here")
    a = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: this benchmark times the CUDA path")

    model = smollm2_shaped(a.layers).to(getattr(torch, a.dtype))
    gen = torch.Generator().manual_seed(0)
    windows = torch.randint(0, 49152, (a.nsamples, a.seqlen), generator=gen)
    rows = []
    runs = [("solver", name, {"solver": name, "sparsity": a.sparsity})
            for name in a.solvers.split(",") if name]  # fmt: skip
    runs += [("quantizer", name, {"quantizer": name, "bits": a.bits})
             for name in a.quantizers.split(",") if name]  # fmt: skip
    for kind, solver, options in runs:
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        tick = time.perf_counter()
        pruned, report = prunella.prune(
            copy.deepcopy(model), calibration=windows, device="cuda", progress=False, **options
        )
        torch.cuda.synchronize()
        row = {
            "solver": solver,
            "kind": kind,
            "seconds": time.perf_counter() - tick,
            "phases": report["seconds"],
            "sparsity": report["sparsity"],
            "peak_cuda_mb": report["peak_cuda_mb"],
            "passes": report["passes"],
            "compute_dtype": report["compute_dtype"],
        }
        if a.cpu_check:
            small = smollm2_shaped(2).to(getattr(torch, a.dtype))
            cpu, _ = prunella.prune(copy.deepcopy(small), calibration=windows[:8, :512],
                                    device="cpu", progress=False, **options)  # fmt: skip
            gpu, _ = prunella.prune(copy.deepcopy(small), calibration=windows[:8, :512],
                                    device="cuda", progress=False, **options)  # fmt: skip
            same = (lambda p, q: (p == 0) == (q == 0)) if kind == "solver" else torch.eq
            agree = [
                same(p, q).float().mean().item()
                for p, q in zip(cpu.parameters(), gpu.parameters(), strict=True)
                if p.dim() == 2
            ]
            row["mask_agreement_min"] = min(agree)
        rows.append(row)
        print(f"done: {solver} in {row['seconds']:.1f}s", flush=True)
        del pruned

    device = torch.cuda.get_device_name()
    print(
        f"\nSmolLM2-135M-shaped model ({a.layers} blocks, random weights, {a.dtype}), "
        f"{a.nsamples} x {a.seqlen} calibration tokens, {a.sparsity:.0%} unstructured "
        f"(solvers) or {a.bits} bits (quantizers); "
        f"{device}, torch {torch.__version__}, Python {platform.python_version()}\n"
    )
    print("| method | time (s) | solve (s) | statistics (s) | propagate (s) | peak CUDA (MiB) |"
          + (" agreement vs CPU |" if a.cpu_check else ""))  # fmt: skip
    print("|---|---|---|---|---|---|" + ("---|" if a.cpu_check else ""))
    for r in rows:
        p = r["phases"]
        line = (
            f"| {r['solver']} | {r['seconds']:.1f} | {p.get('solve', 0):.1f} | "
            f"{p.get('statistics', 0):.1f} | {p.get('propagate', 0):.1f} | "
            f"{r['peak_cuda_mb']:.0f} |"
        )
        if a.cpu_check:
            line += f" {r['mask_agreement_min']:.4f} |"
        print(line)
    record.write(a.json and Path(a.json), {"device": device, "rows": rows})


if __name__ == "__main__":
    main()
