"""Where ALPS spends its time: one block of SmolLM2-135M's shapes, against SparseGPT.

Prunes the seven linear layers of one block with the shapes of SmolLM2-135M (q,
k, v, o: inputs of 576; gate, up: 1536 x 576; down: 576 x 1536) under Hessians of
random correlated inputs, once with ALPS and once with SparseGPT, and splits ALPS's
time into the eigendecompositions (one per distinct input: the floor), the
projections onto the pattern, the ADMM's matrix products, the PCG refit and the
SparseGPT fallback check. Prints a Markdown table; ``--json PATH`` writes it.

    python benchmarks/alps_profile.py --sparsity 0.7 --json alps-profile.json
"""

from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path

import record
import torch

from prunella.engine.stats import HESSIAN, LayerStats
from prunella.methods.sparsity import alps, sparsegpt
from prunella.methods.sparsity.patterns import Unstructured
from prunella.methods.sparsity.solvers import SOLVERS

HIDDEN, FFN = 576, 1536
LAYERS = [  # name, rows, the input it reads
    ("q_proj", HIDDEN, "attention"),
    ("k_proj", 192, "attention"),
    ("v_proj", 192, "attention"),
    ("o_proj", HIDDEN, "attention output"),
    ("gate_proj", FFN, "mlp"),
    ("up_proj", FFN, "mlp"),
    ("down_proj", HIDDEN, "mlp down"),
]


def layer_stats(n: int, tokens: int, generator: torch.Generator) -> LayerStats:
    x = torch.randn(tokens, n, generator=generator)
    x = x @ (torch.eye(n) + torch.randn(n, n, generator=generator) / n**0.5)
    stats = LayerStats(n, {HESSIAN}, torch.device("cpu"))
    stats.add(x)
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--json", type=Path)
    a = parser.parse_args()

    g = torch.Generator().manual_seed(0)
    sizes = {"attention": HIDDEN, "attention output": HIDDEN, "mlp": HIDDEN, "mlp down": FFN}
    inputs = {name: layer_stats(n, a.tokens, g) for name, n in sizes.items()}
    weights = {
        name: torch.randn(rows, sizes[inp], generator=g) * 0.02 for name, rows, inp in LAYERS
    }
    pattern = Unstructured(a.sparsity)
    options = {name: SOLVERS.get(name).defaults() for name in ("alps", "sparsegpt")}

    spent: collections.Counter = collections.Counter()
    originals = {}
    parts = [
        (alps, "_eigen", "eigendecompositions (the floor)"),
        (alps, "project", "projections onto the pattern"),
        (alps, "pcg", "PCG refit"),
        (sparsegpt, "prune", "SparseGPT fallback check"),
    ]
    for module, attr, label in parts:
        original = originals[(module, attr)] = getattr(module, attr)

        def timed(*args, _f=original, _label=label, **kwargs):
            tick = time.perf_counter()
            result = _f(*args, **kwargs)
            spent[_label] += time.perf_counter() - tick
            return result

        setattr(module, attr, timed)
    tick = time.perf_counter()
    iterations = []
    for name, _, inp in LAYERS:
        _, info = alps.prune(weights[name].clone(), pattern, inputs[inp], **options["alps"])
        iterations.append(info["iterations"])
    alps_seconds = time.perf_counter() - tick
    for (module, attr), original in originals.items():
        setattr(module, attr, original)

    for stats in inputs.values():
        stats.derived.clear()
    tick = time.perf_counter()
    for name, _, inp in LAYERS:
        sparsegpt.prune(weights[name].clone(), pattern, inputs[inp], **options["sparsegpt"])
    sparsegpt_seconds = time.perf_counter() - tick

    rows = [(label, spent[label]) for _, _, label in parts]
    rows.insert(2, ("ADMM matrix products and updates", alps_seconds - sum(spent.values())))
    print(
        f"one block of SmolLM2-135M's shapes at {a.sparsity:.0%}: ALPS {alps_seconds:.2f} s "
        f"(mean {sum(iterations) / len(iterations):.0f} ADMM iterations per layer), "
        f"SparseGPT {sparsegpt_seconds:.2f} s ({alps_seconds / sparsegpt_seconds:.0f} x); "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}\n"
    )
    print("| part of ALPS | seconds | share |")
    print("|---|---|---|")
    for label, seconds in rows:
        print(f"| {label} | {seconds:.2f} | {seconds / alps_seconds:.0%} |")
    record.write(
        a.json,
        {
            "sparsity": a.sparsity,
            "alps_seconds": alps_seconds,
            "sparsegpt_seconds": sparsegpt_seconds,
            "iterations": iterations,
            "parts": dict(rows),
        },
    )


if __name__ == "__main__":
    main()
