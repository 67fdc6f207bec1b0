"""Write the headline results table of docs/results.md from the committed benchmark runs.

Every row is computed from one JSON file under ``benchmarks/results/`` (written by a
benchmark's ``--json``: the command, commit, date, machine and raw numbers); the table
names the file, the command that wrote it and the commit it ran. ``tests/test_docs.py``
fails when docs/results.md differs from what this writes.

    python scripts/make_results.py           # rewrite the table
    python scripts/make_results.py --check   # exit 1 if it is out of date
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
PAGE = ROOT / "docs" / "results.md"
START = "<!-- headline table: scripts/make_results.py -->"
END = "<!-- end of headline table -->"


def _rows(run: dict) -> list[dict]:
    results = run.get("results", run)
    return results["rows"] if isinstance(results, dict) else results


def _find(table: list[dict], /, **match) -> dict:
    found = [r for r in table if all(r.get(k) == v for k, v in match.items())]
    if len(found) != 1:
        raise SystemExit(f"expected one row with {match}, found {len(found)}")
    return found[0]


def solvers(run: dict) -> str:
    rows = _rows(run)
    sgpt = _find(rows, solver="sparsegpt", pattern="unstructured")
    wanda = _find(rows, solver="wanda", pattern="unstructured")
    mag = _find(rows, solver="magnitude", pattern="unstructured")
    nm = _find(rows, solver="sparsegpt", pattern="2:4")
    return (
        f"50%: dense {sgpt['ppl_dense']:.2f} → SparseGPT {sgpt['ppl']:.2f}, Wanda "
        f"{wanda['ppl']:.2f}, magnitude {mag['ppl']:.2f}; 2:4: SparseGPT {nm['ppl']:.2f}"
    )


def bits(run: dict) -> str:
    rows = _rows(run)
    gptq = _find(rows, quantizer="gptq", bits=4, sparsity=None)
    rtn = _find(rows, quantizer="rtn", bits=4, sparsity=None)
    gptq3 = _find(rows, quantizer="gptq", bits=3, sparsity=None)
    rtn3 = _find(rows, quantizer="rtn", bits=3, sparsity=None)
    ratio = gptq["block_layer_bytes"] / gptq["block_layer_bf16_bytes"]
    same = all(r["ppl_checkpoint"] == r["ppl_in_memory"] for r in rows)
    return (
        f"4 bits, group 64: GPTQ {gptq['ppl_in_memory']:.2f} vs round to nearest "
        f"{rtn['ppl_in_memory']:.2f} (3 bits: {gptq3['ppl_in_memory']:.2f} vs "
        f"{rtn3['ppl_in_memory']:.2f}); block layers {ratio:.3f} × their bfloat16 bytes; "
        f"checkpoint perplexity {'equals' if same else 'differs from'} the in-memory model's"
    )


def bits_curve(run: dict) -> str:
    rows = _rows(run)
    three = _find(rows, allocation="uniform", bits=3)

    def ppl(allocation: str, bits: float) -> str:
        row = _find(rows, allocation=allocation, bits=bits)
        ratio = row["ppl_in_memory"] / three["ppl_in_memory"]
        return f"{row['ppl_in_memory']:.2f} ({ratio:.2f} × uniform 3-bit)"

    return (
        f"mixed widths, GPTQ group 64, bits per weight with scales: at 3.0 LWQ "
        f"{ppl('lwq', 3)}, EvoPress {ppl('evopress', 3)}; at 3.5 LWQ {ppl('lwq', 3.5)}; "
        f"uniform 3 bits (3.25) {three['ppl_in_memory']:.2f}"
    )


def bits_curve_mse(run: dict) -> str:
    rows = _rows(run)
    uniform = {b: _find(rows, allocation="uniform", bits=b)["ppl_in_memory"] for b in (2, 3)}
    lwq = {b: _find(rows, allocation="lwq", bits=b)["ppl_in_memory"] for b in (3, 3.5)}
    below = sum(r["ppl_in_memory"] < r["ppl_uniform_line"] for r in rows if "ppl_uniform_line" in r)
    allocated = sum(r["allocation"] != "uniform" for r in rows)
    return (
        f"GPTQ from MSE-chosen ranges, group 64: uniform 3 bits {uniform[3]:.2f}, 2 bits "
        f"{uniform[2]:.2f}; LWQ's mix at 3.0 {lwq[3]:.2f} ({lwq[3] / uniform[3]:.2f} × uniform "
        f"3-bit), at 3.5 {lwq[3.5]:.2f} ({lwq[3.5] / uniform[3]:.2f} ×); {below} of "
        f"{allocated} allocated points below the line joining the uniform ones"
    )


def packing(run: dict) -> str:
    rows = _rows(run)
    row = _find(rows, dtype="float32", sparsity="70%")
    exact = all(r["exact_round_trip"] for r in rows)
    return (
        f"packed float32 checkpoint at 70%: {row['packed_mb'] / row['dense_mb']:.3f} × the "
        f"dense bytes, {'bit-exact' if exact else 'NOT exact'} round trip"
    )


def streaming(run: dict) -> str:
    row = _find(_rows(run), model="synthetic Llama", offload="disk")
    return (
        f"a synthetic Llama checkpoint of {row['checkpoint_mb']:.0f} MiB, "
        f"{row['solver'].capitalize()} on {row['calibration'].replace(' x ', ' × ')} windows, "
        f"streamed: peak RSS {row['peak_rss_mb'] / row['checkpoint_mb']:.2f} × its size"
    )


def vs_llmcompressor(run: dict) -> str:
    def one_pass(config: str) -> dict:
        rows = [r for r in _rows(run) if str(r["prunella"]["passes"]) == "1"]
        row = _find(rows, config=config)
        if not (row["prunella"]["ok"] and row["llm-compressor"]["ok"]):
            raise SystemExit(f"{config}: a prune failed")
        return row

    def ratios(config: str, name: str) -> str:
        row = one_pass(config)
        ours, theirs = row["prunella"], row["llm-compressor"]
        return (
            f"{name}: {ours['prune_seconds'] / theirs['prune_seconds']:.2f} × llm-compressor's "
            f"time, {ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f} × its peak RSS, "
            f"perplexity {ours['ppl']:.2f} vs {theirs['ppl']:.2f}"
        )

    sparsegpt, wanda = ratios("sparsegpt-50", "SparseGPT 50%"), ratios("wanda-50", "Wanda 50%")
    return f"{sparsegpt}; {wanda} (one pass)"


def vs_llmcompressor_gptq(run: dict) -> str:
    row = _find(_rows(run), config="gptq-w4a16-g64")
    ours, theirs = row["prunella"], row["llm-compressor"]
    if not (ours["ok"] and theirs["ok"]):
        raise SystemExit("gptq-w4a16-g64: a run failed")
    return (
        f"GPTQ 4 bits, group 64: {ours['prune_seconds'] / theirs['prune_seconds']:.2f} × "
        f"llm-compressor's time, {ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f} × its peak "
        f"RSS, perplexity {ours['ppl']:.2f} vs {theirs['ppl']:.2f}, checkpoints "
        f"{ours['checkpoint_bytes'] / theirs['checkpoint_bytes']:.3f} × its bytes"
    )


def vs_llmcompressor_gptq3(run: dict) -> str:
    parts = []
    for config, name in (("gptq-w3a16-g64", "min-max"), ("gptq-w3a16-g64-mse", "MSE")):
        row = _find(_rows(run), config=config)
        ours, theirs = row["prunella"], row["llm-compressor"]
        if not (ours["ok"] and theirs["ok"]):
            raise SystemExit(f"{config}: a run failed")
        parts.append(
            f"{name} ranges {ours['ppl']:.2f} vs {theirs['ppl']:.2f} in "
            f"{ours['prune_seconds'] / theirs['prune_seconds']:.2f} × its time"
        )
    return "GPTQ 3 bits, group 64, against llm-compressor: " + "; ".join(parts)


def structure(run: dict) -> str:
    results = run["results"]
    dense, rows = results["dense"], results["rows"]
    parts = []
    for params in sorted({r["params"] for r in rows}, reverse=True):
        ours = _find(rows, params=params, variant="prunella")
        depth = _find(rows, params=params, variant="shortgpt")
        channels = _find(rows, params=params, variant="channels")
        better = min(depth["perplexity"], channels["perplexity"])
        parts.append(
            f"{params:.0%} of the blocks' parameters: Prunella {ours['perplexity']:.2f} "
            f"({ours['perplexity'] / better:.3f} × the better baseline), ShortGPT "
            f"{depth['perplexity']:.2f}, uniform channels {channels['perplexity']:.2f}; decode "
            f"{ours['decode_tokens_per_s'] / dense['decode_tokens_per_s']:.2f} × dense"
        )
    return f"dense {dense['perplexity']:.2f}; " + "; ".join(parts)


def llama_cpp(run: dict) -> str:
    rows = run["results"]["rows"]
    dense = rows["dense-f16"]

    def faster(name: str) -> str:
        return f"{rows[name]['decode_tokens_per_s'] / dense['decode_tokens_per_s']:.2f} ×"

    both = rows["params-0.8+q4_0"]
    return (
        f"llama.cpp decode against the dense F16 GGUF: GPTQ q8_0 {faster('gptq-q8_0')}, "
        f"q4_0 {faster('gptq-q4_0')}; structure cut to 80% {faster('params-0.8')}, 70% "
        f"{faster('params-0.7')}; cut to 80% then q4_0 {faster('params-0.8+q4_0')} in "
        f"{both['gguf_bytes'] / dense['gguf_bytes']:.2f} × the bytes"
    )


def vs_llmcompressor_reap(run: dict) -> str:
    results = run["results"]
    families = sorted({r["family"] for r in results["rows"]})
    return (
        f"REAP's experts, tiny {', '.join(families)}: the same as llm-compressor's in "
        f"{results['matched_same_attention']} of {results['blocks']} blocks on the attention "
        f"it ran ({results['matched']} of {results['blocks']} with causal attention: "
        "llm-compressor 0.14 ran some of them without the causal mask)"
    )


def high_sparsity(run: dict) -> str:
    rows = _rows(run)
    parts = []
    for level in ("0.7", "0.8"):
        alps = _find(rows, level=level, solver="alps", rows="uniform")
        sgpt = _find(rows, level=level, solver="sparsegpt", rows="uniform")
        parts.append(
            f"{float(level):.0%}: ALPS {alps['ppl']:.2f} vs SparseGPT {sgpt['ppl']:.2f} "
            f"({alps['prune_seconds'] / sgpt['prune_seconds']:.1f} × the time)"
        )
    return "; ".join(parts)


def calibration(run: dict) -> str:
    results = run["results"]
    biggest = max(results["draws"], key=lambda d: d["bytes"])
    after, args = biggest["after"], results["args"]
    return (
        f"{args['nsamples']} × {args['seqlen']} calibration windows from a "
        f"{biggest['bytes'] / 1e9:.0f} GB text file: {after['draw_seconds']:.1f} s, peak RSS "
        f"{after['peak_rss_mb']:.0f} MB (Python, torch and the tokenizer alone: "
        f"{results['floor_mb']:.0f} MB)"
    )


def search(run: dict) -> str:
    results = run["results"]
    rows = results["rows"]
    uniform = _find(rows, target="0.7", method="uniform")["ppl"]

    def cell(method: str) -> str:
        ppl = _find(rows, target="0.7", method=method)["ppl"]
        return f"{ppl:.2f} ({ppl / uniform - 1:+.1%})"

    return (
        f"70%, SparseGPT, 128 × 512 calibration windows, {results['minutes']:g}-min searches: "
        f"DSA {cell('dsa')}, TPE {cell('tpe')}, OWL {cell('owl')} vs uniform {uniform:.2f}"
    )


def allocation(run: dict) -> str:
    rows = _rows(run)

    def ppl(solver: str, method: str) -> str:
        return f"{_find(rows, sparsity=0.7, solver=solver, method=method)['ppl']:.2f}"

    return (
        f"70%, allocation from the loss: Lua-LLM {ppl('sparsegpt', 'lua')} (SparseGPT) / "
        f"{ppl('wanda', 'lua')} (Wanda) vs uniform {ppl('sparsegpt', 'uniform')} / "
        f"{ppl('wanda', 'uniform')}; ECoFLaP {ppl('sparsegpt', 'ecoflap')} / "
        f"{ppl('wanda', 'ecoflap')}"
    )


# (file under benchmarks/results, its row, the page with the full table)
HEADLINE: list[tuple[str, Callable[[dict], str], str]] = [
    ("prune_smollm2.json", solvers, "[solvers](solvers.md)"),
    ("bits_smollm2.json", bits, "[bits](bits.md)"),
    ("bits_curve.json", bits_curve, "[bits](bits.md#allocated-widths-perplexity-against-bytes)"),
    ("bits_curve_mse.json", bits_curve_mse, "[bits](bits.md#mse-ranges-perplexity-against-bytes)"),
    ("pack_sizes.json", packing, "[packing](packing.md)"),
    ("streaming_memory.json", streaming, "[streaming](streaming.md)"),
    ("vs_llmcompressor.json", vs_llmcompressor, "[speed](speed.md)"),
    ("vs_llmcompressor_gptq.json", vs_llmcompressor_gptq, "[bits](bits.md)"),
    ("vs_llmcompressor_gptq3.json", vs_llmcompressor_gptq3, "[bits](bits.md#3-bits)"),
    ("structure_smollm2.json", structure, "[structure](structure.md#results)"),
    ("vs_llmcompressor_reap.json", vs_llmcompressor_reap, "[structure](structure.md#experts)"),
    ("llama_cpp_smollm2.json", llama_cpp, "[GGUF](gguf.md#in-llamacpp)"),
    ("calibration_scale.json", calibration, "[calibration data](calibration-data.md)"),
    ("high_sparsity_smollm2.json", high_sparsity, "[high sparsity](high-sparsity.md)"),
    ("search_smollm2.json", search, "[search](search.md)"),
    ("allocation_smollm2.json", allocation, "[allocation](allocation.md#results)"),
]


def table() -> str:
    lines = ["| result | run (command, commit, date) | full table |", "|---|---|---|"]
    for name, row, page in HEADLINE:
        run = json.loads((RESULTS / name).read_text(encoding="utf-8"))
        when = f"`{run['commit'][:7]}`" + (f", {run['date'][:10]}" if "date" in run else "")
        source = f"[`{name}`](../benchmarks/results/{name}): `{run['command']}`, {when}"
        lines.append(f"| {row(run)} | {source} | {page} |")
    return "\n".join(lines)


def page(text: str) -> str:
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table()}\n{END}{tail}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if out of date")
    a = parser.parse_args()
    text = PAGE.read_text(encoding="utf-8")
    if a.check:
        sys.exit(0 if text == page(text) else 1)
    PAGE.write_text(page(text), encoding="utf-8")


if __name__ == "__main__":
    main()
