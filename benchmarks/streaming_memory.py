"""Peak memory of pruning in memory and streamed from disk (``--offload disk``).

Each prune runs as its own process under ``/usr/bin/time -v``; its peak RSS is
read from the OS and reported as a ratio to the checkpoint's size on disk.
Besides SmolLM2-135M, a synthetic Llama-architecture checkpoint of about 3.1 GiB
(12 blocks, hidden 2048, MLP 5632, untied 49152-word embeddings and LM head of
384 MiB each; random weights from a config) is built in a temporary folder and
pruned streamed, to show that peak memory follows one block, not the model.

The floor of a streamed prune is printed too: the runtime (a process that imports
Prunella and builds the model skeleton with no weights, measured the same way),
plus the larger of one block and the largest tensor outside the blocks, plus the
calibration activations (``nsamples x seqlen x hidden`` float32 numbers).

With ``--params P`` each run is a structure cut to ``P`` of the blocks' parameters
instead (no sparsity): in memory the cut holds the dense model; streamed, one block.

    python benchmarks/streaming_memory.py --json streaming.json
    python benchmarks/streaming_memory.py --params 0.8 --json streaming_structure.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import record
import torch
from smollm2_runs import measured


def synthetic_checkpoint(folder: Path, layers: int, hidden: int, ffn: int, vocab: int) -> Path:
    """A Llama checkpoint with random weights (float32), written shard by shard."""
    code = f"""
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from prunella.io.checkpoint import resolve
config = LlamaConfig(hidden_size={hidden}, intermediate_size={ffn}, num_hidden_layers={layers},
                     num_attention_heads={hidden // 128}, num_key_value_heads={hidden // 128},
                     vocab_size={vocab}, max_position_embeddings=2048, tie_word_embeddings=False)
torch.manual_seed(0)
with torch.device("cpu"):
    model = LlamaForCausalLM(config)
model.save_pretrained("{folder}", max_shard_size="1GB")
AutoTokenizer.from_pretrained(resolve("smollm2-135m")).save_pretrained("{folder}")
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    return folder


def floor_mb(model: Path, nsamples: int, seqlen: int) -> dict:
    """Runtime + max(one block, largest tensor outside the blocks) + activations, in MiB."""
    runtime = measured(
        [
            "-c",
            f"import prunella.pipeline\nfrom prunella.io.checkpoint import empty_model\n"
            f"empty_model({str(model)!r})",
        ]
    )["peak_rss_mb"]
    from safetensors import safe_open

    from prunella.io.safetensors_io import CheckpointReader

    reader = CheckpointReader(model)
    block, outside = {}, []
    for key, file in reader.files.items():
        with safe_open(file, framework="pt") as handle:
            shape = handle.get_slice(key).get_shape()
        nbytes = 4 * int(torch.tensor(shape).prod()) if shape else 4
        if ".layers." in key:
            index = key.split(".layers.")[1].split(".")[0]
            block[index] = block.get(index, 0) + nbytes
        else:
            outside.append(nbytes)
    config = json.loads((model / "config.json").read_text())
    activations = nsamples * seqlen * config["hidden_size"] * 4
    largest = max(max(block.values()), max(outside))
    return {
        "runtime_mb": runtime,
        "block_mb": max(block.values()) / 2**20,
        "largest_outside_mb": max(outside) / 2**20,
        "activations_mb": activations / 2**20,
        "floor_mb": runtime + (largest + activations) / 2**20,
    }


def size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--synthetic-layers", type=int, default=12)
    parser.add_argument("--synthetic-hidden", type=int, default=2048)
    parser.add_argument("--synthetic-ffn", type=int, default=5632)
    parser.add_argument("--skip-in-memory-synthetic", action="store_true")
    parser.add_argument("--params", help="a structure cut to this fraction instead of pruning")
    a = parser.parse_args()

    from prunella.io.checkpoint import resolve

    rows = []
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        tmp = Path(tmp)
        smol = resolve("smollm2-135m")
        synth = synthetic_checkpoint(
            tmp / "synthetic", a.synthetic_layers, a.synthetic_hidden, a.synthetic_ffn, 49152
        )
        cases = [
            ("SmolLM2-135M", smol, "sparsegpt", "none", 32, 512),
            ("SmolLM2-135M", smol, "sparsegpt", "disk", 32, 512),
        ]
        if not a.skip_in_memory_synthetic:
            cases.append(("synthetic Llama", synth, "wanda", "none", 4, 256))
        cases.append(("synthetic Llama", synth, "wanda", "disk", 4, 256))
        for name, model, solver, offload, nsamples, seqlen in cases:
            out = tmp / f"out-{len(rows)}"
            result = measured(
                [
                    "prune",
                    str(model),
                    "--out",
                    str(out),
                    *(["--params", a.params] if a.params else ["--solver", solver]),
                    "--offload",
                    offload,
                    "--nsamples",
                    str(nsamples),
                    "--seqlen",
                    str(seqlen),
                    "--quiet",
                ]
            )
            rows.append(
                {
                    "model": name,
                    "checkpoint_mb": size_mb(model),
                    "solver": f"structure {a.params}" if a.params else solver,
                    "offload": offload,
                    "calibration": f"{nsamples} x {seqlen}",
                    **result,
                    **(floor_mb(model, nsamples, seqlen) if offload == "disk" else {}),
                }
            )
            print(f"done: {name} {offload}: {result['peak_rss_mb']:.0f} MiB", file=sys.stderr)
            subprocess.run(["rm", "-rf", str(out)], check=True)

    print(
        "| model | checkpoint (MiB, fp32) | solver | calibration | offload | peak RSS (MiB) "
        "| peak RSS / checkpoint | floor (MiB) | floor / checkpoint | wall (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = r["peak_rss_mb"] / r["checkpoint_mb"]
        floor = (
            f"{r['floor_mb']:.0f} | {r['floor_mb'] / r['checkpoint_mb']:.2f}"
            if "floor_mb" in r
            else "- | -"
        )
        print(
            f"| {r['model']} | {r['checkpoint_mb']:.0f} | {r['solver']} | {r['calibration']} | "
            f"{r['offload']} | {r['peak_rss_mb']:.0f} | {ratio:.2f} | {floor} | "
            f"{r['wall_seconds']:.0f} |"
        )
    for r in rows:
        if "floor_mb" in r:
            print(
                f"floor of {r['model']} streamed: runtime {r['runtime_mb']:.0f} MiB + "
                f"max(one block {r['block_mb']:.0f}, largest tensor outside the blocks "
                f"{r['largest_outside_mb']:.0f}) + activations {r['activations_mb']:.0f} MiB"
            )
    record.write(a.json, rows)


if __name__ == "__main__":
    main()
