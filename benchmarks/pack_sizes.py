"""Size on disk of packed (sparse-bitmask) checkpoints, as a ratio of the dense save.

Prunes SmolLM2-135M to 50% and 70% unstructured and to 2:4 (the mask, not the
solver, decides the size, so the fast magnitude solver is used), in float32 and
bfloat16, packs each result, checks the round trip is bit-exact, and prints the
sizes. The embedding matrix (tied to the LM head) is not pruned and stays dense.

    python benchmarks/pack_sizes.py --json pack_sizes.json
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import record
import torch
from safetensors.torch import load_file


def size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def linear_bytes(folder: Path, packed: bool) -> int:
    """Bytes of the prunable linear weights alone (packed parts, or dense weights)."""
    total = 0
    for file in folder.glob("*.safetensors"):
        for name, tensor in load_file(file).items():
            inside = ".layers." in name
            if inside and (
                name.rsplit(".", 1)[-1] in ("compressed", "bitmask", "shape", "row_offsets")
                if packed
                else name.endswith("proj.weight")
            ):
                total += tensor.numel() * tensor.element_size()
    return total


def run(args: list[str]) -> None:
    subprocess.run(
        [sys.executable, "-m", "prunella", *args], check=True, capture_output=True, text=True
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--json", type=Path)
    a = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prunella.io.checkpoint import resolve
    from prunella.io.pack import packed_tensors

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sources = {"float32": resolve(a.model), "bfloat16": tmp / "bf16"}
        AutoModelForCausalLM.from_pretrained(
            sources["float32"], dtype=torch.bfloat16
        ).save_pretrained(sources["bfloat16"])
        AutoTokenizer.from_pretrained(sources["float32"]).save_pretrained(sources["bfloat16"])
        for dtype, src in sources.items():
            for label, extra in [
                ("50%", ["--sparsity", "0.5"]),
                ("70%", ["--sparsity", "0.7"]),
                ("2:4", ["--pattern", "2:4"]),
            ]:
                dense = tmp / f"{dtype}-{label.replace(':', '-').rstrip('%')}"
                packed = dense.with_name(dense.name + "-packed")
                run(
                    [
                        "prune",
                        str(src),
                        "--out",
                        str(dense),
                        "--solver",
                        "magnitude",
                        "--nsamples",
                        "1",
                        "--seqlen",
                        "64",
                        "--quiet",
                        *extra,
                    ]
                )
                run(["pack", str(dense), "--out", str(packed), "--quiet"])
                reference = {}
                for file in dense.glob("*.safetensors"):
                    reference.update(load_file(file))
                exact = all(
                    torch.equal(t, reference[n]) and t.dtype == reference[n].dtype
                    for n, t, _, _ in packed_tensors(packed)
                )
                rows.append(
                    {
                        "dtype": dtype,
                        "sparsity": label,
                        "dense_mb": size(dense) / 2**20,
                        "packed_mb": size(packed) / 2**20,
                        "exact_round_trip": exact,
                        "linear_ratio": linear_bytes(packed, True) / linear_bytes(dense, False),
                    }
                )
                print(f"done: {dtype} {label}", file=sys.stderr)

    print(
        "| dtype | sparsity | dense (MiB) | packed (MiB) | packed / dense | linear layers "
        "only | bit-exact round trip |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['dtype']} | {r['sparsity']} | {r['dense_mb']:.1f} | {r['packed_mb']:.1f} | "
            f"{r['packed_mb'] / r['dense_mb']:.3f} | {r['linear_ratio']:.3f} | "
            f"{'yes' if r['exact_round_trip'] else 'NO'} |"
        )
    record.write(a.json, rows)


if __name__ == "__main__":
    main()
