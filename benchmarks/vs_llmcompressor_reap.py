"""REAP's choice of experts: Prunella against llm-compressor's ``REAPPruningModifier``.

Both remove the same number of experts from every mixture-of-experts block of the same
tiny random model (a config per ``--families``, seeded), on the same calibration
windows (random token ids, seeded, handed to both), and each says which experts every
block keeps: llm-compressor through its ``report_path``, Prunella through its report's
``retained_experts`` (``--params`` set to the fraction of the blocks' parameters that
dropping ``--drop`` experts per block keeps, ``--cut experts``). Prints, per family and
block, both choices and whether they match; ``--json PATH`` also writes them.

llm-compressor 0.14.0.1 (with transformers 5.17) runs some of these models' attention
*without its causal mask* in its sequential pipeline: the input of block 0's MLP in its
run equals a forward in which every position attends to every other (the script
checks this per family: ``llm-compressor's attention``). Its saliencies past block 0
then differ from a causal model's, and so may its choices. Prunella is therefore also
run with that attention reproduced (the family's mask functions replaced by an
all-true mask), and the last columns compare the two tools on the same attention.

llm-compressor needs its own environment (see ``vs_llmcompressor.py``); this script runs
in it and runs Prunella from ``--prunella-python``:

    .venv-bench/bin/python benchmarks/vs_llmcompressor_reap.py \\
        --prunella-python .venv/bin/python --json reap.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import record

CONFIG = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              max_position_embeddings=512, num_experts=8, num_local_experts=8,
              num_experts_per_tok=2, moe_intermediate_size=64,
              tie_word_embeddings=False)  # fmt: skip

PRUNELLA = r"""
import importlib, json, sys
import torch
from safetensors.torch import load_file
from transformers import AutoConfig
import prunella

path, windows, params = sys.argv[1], load_file(sys.argv[2])["windows"], float(sys.argv[3])
if sys.argv[4] == "bidirectional":  # attention without its causal mask, as llm-compressor ran
    family = AutoConfig.from_pretrained(path).model_type
    modeling = importlib.import_module(f"transformers.models.{family}.modeling_{family}")

    def everything(*args, **kwargs):
        embeds = kwargs.get("inputs_embeds", kwargs.get("input_embeds"))
        n = embeds.shape[1]
        return torch.ones(embeds.shape[0], 1, n, n, dtype=torch.bool, device=embeds.device)

    for name in ("create_causal_mask", "create_sliding_window_causal_mask"):
        if hasattr(modeling, name):
            setattr(modeling, name, everything)
_, report = prunella.prune(path, calibration=windows, params=params, cut="experts",
                           progress=False)
print(json.dumps(report["structure"]))
"""


def build(family: str, folder: Path, seed: int) -> dict:
    """A tiny random ``family`` model saved in ``folder``; its expert count and what one
    expert of every mixture-of-experts block owns (for ``--params``)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from prunella.io.checkpoint import resolve

    torch.manual_seed(seed)
    keys = AutoConfig.for_model(family).to_dict()
    config = AutoConfig.for_model(family, **{k: v for k, v in CONFIG.items() if k in keys})
    model = AutoModelForCausalLM.from_config(config).float().eval()
    model.save_pretrained(folder)
    # a tokenizer beside it (llm-compressor insists on a processor; the windows are ids)
    AutoTokenizer.from_pretrained(resolve("smollm2-135m")).save_pretrained(folder)
    return {"experts": CONFIG["num_experts"]}


def llmcompressor_choice(folder: Path, windows, drop: int, experts: int, report: Path) -> dict:
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import REAPPruningModifier
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    loader = torch.utils.data.DataLoader(
        [{"input_ids": w[None], "attention_mask": torch.ones_like(w)[None]} for w in windows],
        batch_size=None,
    )
    oneshot(model=model, dataset=loader, pipeline="sequential",
            recipe=REAPPruningModifier(sparsity=drop / experts, report_path=str(report)),
            num_calibration_samples=len(windows), max_seq_length=windows.shape[1])  # fmt: skip
    return json.loads(report.read_text())


def llmcompressor_attention(folder: Path, windows) -> str:
    """Whether llm-compressor's sequential pipeline ran the model's attention causally:
    the input of block 0's MLP in its run against a plain forward of the model
    (``causal``) and a forward with every position attending to every other
    (``bidirectional``), on the first window."""
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import REAPPruningModifier
    from transformers import AutoModelForCausalLM

    def mlp_input(model, run) -> torch.Tensor:
        seen = []
        handle = model.model.layers[0].mlp.register_forward_pre_hook(
            lambda m, args: seen.append(args[0].detach().reshape(-1, args[0].shape[-1]).clone())
            if args[0].device.type == "cpu" else None
        )  # fmt: skip
        with torch.no_grad():
            run()
        handle.remove()
        return seen[0]

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    first = windows[:1]
    loader = torch.utils.data.DataLoader(
        [{"input_ids": first, "attention_mask": torch.ones_like(first)}], batch_size=None
    )
    theirs = mlp_input(model, lambda: oneshot(
        model=model, dataset=loader, pipeline="sequential",
        recipe=REAPPruningModifier(sparsity=0.25), num_calibration_samples=1,
        max_seq_length=windows.shape[1]))  # fmt: skip
    plain = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    n = windows.shape[1]
    everything = torch.ones(1, 1, n, n, dtype=torch.bool)
    causal = mlp_input(plain, lambda: plain(first))
    bidirectional = mlp_input(plain, lambda: plain(first, attention_mask=everything))
    gaps = {
        "causal": (theirs - causal).abs().max(),
        "bidirectional": (theirs - bidirectional).abs().max(),
    }
    return min(gaps, key=gaps.get)


def params_for(folder: Path, drop: int, python: str) -> float:
    """The fraction of the blocks' parameters left when ``drop`` experts of every
    mixture-of-experts block go (half an expert of slack, so the count is exact)."""
    code = (
        "import sys, torch; from transformers import AutoModelForCausalLM; "
        "from prunella.methods.structure import reap; "
        "from prunella.methods.structure.cut import block_params; "
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); "
        "blocks = m.model.layers; e = [reap.experts_of(m, b) for b in blocks]; "
        "e = [x for x in e if x is not None]; total = sum(block_params(m)); "
        "print((total - len(e) * (int(sys.argv[2]) - 0.5) * e[0].per_expert) / total)"
    )
    done = subprocess.run([python, "-c", code, str(folder), str(drop)], capture_output=True,
                          text=True, check=True)  # fmt: skip
    return float(done.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="qwen3_moe,mixtral,olmoe")
    parser.add_argument("--drop", type=int, default=2, help="experts removed per block")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prunella-python", default=sys.executable)
    parser.add_argument("--json", type=Path, help="also write the results here")
    a = parser.parse_args()

    import torch
    from safetensors.torch import save_file

    rows = []
    generator = torch.Generator().manual_seed(a.seed)
    windows = torch.randint(3, CONFIG["vocab_size"], (a.nsamples, a.seqlen), generator=generator)
    with tempfile.TemporaryDirectory() as tmp:
        save_file({"windows": windows}, Path(tmp) / "windows.safetensors")
        for family in a.families.split(","):
            folder = Path(tmp) / family
            info = build(family, folder, a.seed)
            theirs = llmcompressor_choice(folder, windows, a.drop, info["experts"],
                                          Path(tmp) / f"{family}-reap.json")  # fmt: skip
            params = params_for(folder, a.drop, a.prunella_python)
            ours = {}
            for attention in ("causal", "bidirectional"):
                done = subprocess.run(
                    [a.prunella_python, "-c", PRUNELLA, str(folder),
                     str(Path(tmp) / "windows.safetensors"), repr(params), attention],
                    capture_output=True, text=True,
                )  # fmt: skip
                if done.returncode:
                    sys.exit(f"prunella failed on {family}:\n{done.stderr[-2000:]}")
                report = json.loads(done.stdout.strip().splitlines()[-1])
                ours[attention] = report["retained_experts"]
            inputs = llmcompressor_attention(folder, windows)
            for layer in sorted(theirs):
                rows.append({
                    "family": family, "layer": layer, "llmcompressor": sorted(theirs[layer]),
                    "prunella": sorted(ours["causal"].get(layer, [])),
                    "prunella_bidirectional": sorted(ours["bidirectional"].get(layer, [])),
                    "llmcompressor_attention": inputs,
                })  # fmt: skip

    print(f"{a.drop} of {CONFIG['num_experts']} experts removed per block, "
          f"{a.nsamples} x {a.seqlen} random calibration tokens (seed {a.seed})\n")  # fmt: skip
    print("| family | block | llm-compressor's attention | llm-compressor keeps | "
          "Prunella keeps | same | Prunella, on llm-compressor's attention | same |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        causal = r["llmcompressor_attention"] == "causal"
        r["prunella_same_attention"] = r["prunella" if causal else "prunella_bidirectional"]
        same = "yes" if r["llmcompressor"] == r["prunella"] else "**no**"
        alike = "yes" if r["llmcompressor"] == r["prunella_same_attention"] else "**no**"
        print(f"| {r['family']} | {r['layer']} | {r['llmcompressor_attention']} | "
              f"{r['llmcompressor']} | {r['prunella']} | {same} | "
              f"{r['prunella_same_attention']} | {alike} |")  # fmt: skip
    matched = sum(r["llmcompressor"] == r["prunella"] for r in rows)
    alike = sum(r["llmcompressor"] == r["prunella_same_attention"] for r in rows)
    print(f"\n{matched} of {len(rows)} blocks chose the same experts; on the attention "
          f"llm-compressor ran, {alike} of {len(rows)}")  # fmt: skip
    record.write(a.json, {"rows": rows, "matched": matched, "matched_same_attention": alike,
                          "blocks": len(rows)})  # fmt: skip


if __name__ == "__main__":
    main()
