"""SmolLM2-135M's GGUF exports in llama.cpp: prefill and decode tokens/s of each against
the dense F16 file, by llama.cpp's own ``llama-bench``, and perplexity by its
``llama-perplexity`` on the shipped held-out text.

Each row is its own ``prunella prune ... --format gguf`` process (the ``ROWS`` below:
GPTQ at GGML's q8_0, q5_0 and q4_0 grids (and q4_1, q5_1; q4_0 from ranges chosen
by the MSE observer), llama.cpp's own round to
nearest at q4_0 and q4_1, a mix of GPTQ's grids allocated by LWQ to an average,
structure cut to 80% and 70% of the blocks' parameters, and a cut then quantized); the
dense row is the model written as F16 with nothing pruned. The speeds are timed one file
after the other, the dense file first and last (its row gives their mean, the JSON both):
``llama-bench -p PROMPT -n NEW -r REPEATS -t THREADS``, the mean of its repetitions.
``llama-perplexity -c SEQLEN`` scores the second half of each window (llama.cpp's way),
so its perplexity is comparable across rows, not with ``prunella eval``'s.

llama.cpp is not a dependency of Prunella; build its two tools once from any recent
source (the ``llama-cpp-python`` source package vendors one):

    pip download --no-deps --no-binary :all: llama-cpp-python && tar xzf llama_cpp_python-*.tar.gz
    cmake -S llama_cpp_python-*/vendor/llama.cpp -B llama-build -DCMAKE_BUILD_TYPE=Release \\
        -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF
    cmake --build llama-build --target llama-bench llama-perplexity -j
    python benchmarks/llama_cpp_smollm2.py --bin llama-build/bin --json llama_cpp.json

On a virtual machine whose CPU reports AMX but whose kernel does not grant it, a native
build (``-DGGML_NATIVE=ON``, the default) stops with SIGILL in GGML's AMX Q8_0 kernels:
configure with ``-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON
-DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF`` (and
the other ISA flags the CPU has) instead, as the committed run did.

Prints a Markdown table; ``--json PATH`` also writes the raw numbers, ``--print PATH``
prints the table of a JSON written before.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import record
from smollm2_runs import measured, smollm2_parser

MSE = ("--quantizer-opt", "observer=mse")
ROWS = {
    "dense-f16": ["--sparsity", "0", "--format", "gguf"],
    "gptq-q8_0": ["--bits", "8", "--format", "gguf"],
    "gptq-q5_0": ["--bits", "5", "--format", "gguf"],
    "gptq-q4_0": ["--bits", "4", "--format", "gguf"],
    # llama.cpp's own round to nearest (what its quantize tool writes without an imatrix)
    "rtn-q4_0": ["--sparsity", "0", "--format", "gguf", "--gguf-type", "q4_0"],
    "rtn-q4_1": ["--sparsity", "0", "--format", "gguf", "--gguf-type", "q4_1"],
    # GPTQ on the grids with a float16 minimum per block
    "gptq-q4_1": ["--bits", "4", "--symmetric", "false", "--format", "gguf"],
    "gptq-q5_1": ["--bits", "5", "--symmetric", "false", "--format", "gguf"],
    # GPTQ from each block's range shrunk to least error (the MSE observer; not on q4_1,
    # where the bundled model's weights already lie on Q4_1 blocks)
    "gptq-q4_0-mse": ["--bits", "4", "--format", "gguf", *MSE],
    "lwq-5.0": ["--bits", "5.0", "--allocation", "lwq", "--format", "gguf"],
    "params-0.8": ["--params", "0.8", "--format", "gguf"],
    "params-0.7": ["--params", "0.7", "--format", "gguf"],
    "params-0.8+q4_0": ["--params", "0.8", "--bits", "4", "--format", "gguf"],
}


def bench(tool: Path, gguf: Path, a) -> dict:
    """Prefill and decode tokens/s (mean and spread of ``--repeats``) by llama-bench."""
    done = subprocess.run(
        [str(tool), "-m", str(gguf), "-p", str(a.prompt), "-n", str(a.new),
         "-r", str(a.repeats), "-t", str(a.threads), "-o", "json"],
        capture_output=True, text=True,
    )  # fmt: skip
    if done.returncode:
        sys.exit(f"llama-bench failed on {gguf}:\n{done.stderr[-2000:]}")
    tests = json.loads(done.stdout)
    prefill = next(t for t in tests if t["n_gen"] == 0)
    decode = next(t for t in tests if t["n_prompt"] == 0)
    return {
        "prefill_tokens_per_s": prefill["avg_ts"],
        "prefill_stddev": prefill["stddev_ts"],
        "decode_tokens_per_s": decode["avg_ts"],
        "decode_stddev": decode["stddev_ts"],
        "llama_cpp_model_bytes": decode["model_size"],
        "llama_cpp_params": decode["model_n_params"],
        "llama_cpp_build": f"{decode['build_commit']} ({decode['build_number']})",
    }


def perplexity(tool: Path, gguf: Path, text: Path, a) -> float:
    """llama-perplexity's final estimate on ``text`` in ``--seqlen`` windows."""
    done = subprocess.run(
        [str(tool), "-m", str(gguf), "-f", str(text), "-c", str(a.seqlen), "-b",
         str(a.seqlen), "-t", str(a.threads)],
        capture_output=True, text=True,
    )  # fmt: skip
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", done.stdout + done.stderr)
    if done.returncode or found is None:
        sys.exit(f"llama-perplexity failed on {gguf}:\n{done.stderr[-2000:]}")
    return float(found.group(1))


def table(rows: dict, dense_first_last: dict, a) -> None:
    print(f"SmolLM2-135M in llama.cpp, {a.threads} threads: prefill {a.prompt} tokens, "
          f"decode {a.new}, mean of {a.repeats}; perplexity by llama-perplexity on "
          f"{a.data} at {a.seqlen}; calibration {a.nsamples} x {a.seqlen} "
          f"({a.calib})\n")  # fmt: skip
    print("| row | blocks | MLP | KV heads | types | MiB | ppl (llama.cpp) | prefill tok/s | "
          "decode tok/s | decode vs dense | prune s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    dense = rows["dense-f16"]["decode_tokens_per_s"]
    for name, r in rows.items():
        print(f"| {name} | {r['blocks']} | {r['intermediate_size']} | {r['kv_heads']} | "
              f"{r['types']} | {r['gguf_bytes'] / 2**20:.1f} | {r['perplexity']:.3f} | "
              f"{r['prefill_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.1f} | "
              f"{r['decode_tokens_per_s'] / dense:.2f}x | {r['prune_seconds']:.0f} |")  # fmt: skip
    print(f"\ndense decode first and last: {dense_first_last['decode_tokens_per_s']}")


def main() -> None:
    parser = smollm2_parser(__doc__)
    parser.add_argument("--bin", type=Path, help="the folder of llama-bench and llama-perplexity")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"of {', '.join(ROWS)}")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    parser.add_argument("--new", type=int, default=64, help="tokens decoded")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--print", type=Path, help="only print the table of a JSON written before")
    a = parser.parse_args()
    if a.print is not None:
        run = json.loads(a.print.read_text())
        table(**run["results"], a=parser.parse_args(run["command"].split()[2:]))
        return
    if a.bin is None:
        parser.error("--bin (the folder of llama-bench and llama-perplexity) is required")
    names = ["dense-f16", *[n for n in a.rows.split(",") if n != "dense-f16"]]
    text = Path(__file__).resolve().parents[1] / "src/prunella/data/alice_eval.txt"
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for name in names:
            out = Path(tmp) / name
            argv = ["prune", a.model, "--out", str(out), *ROWS[name], "--calib", a.calib,
                    "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen),
                    "--quiet"]  # fmt: skip
            pruned = measured(argv)
            report = json.loads((out / "prune_report.json").read_text())
            files[name] = out / "model.gguf"
            config = read_gguf_config(files[name])
            kinds = sorted(set(report["gguf"]["types"].values()) - {"f32"})
            rows[name] = {
                **config,
                "types": "+".join(kinds),
                "gguf_bytes": files[name].stat().st_size,
                "prune_seconds": pruned["wall_seconds"],
                "prune_peak_rss_mb": pruned["peak_rss_mb"],
                "structure": (report.get("structure") or {}).get("summary"),
                "bits_per_weight": report.get("bits_per_weight"),
                "perplexity": perplexity(a.bin / "llama-perplexity", files[name], text, a),
            }
            print(f"pruned {name}", file=sys.stderr, flush=True)
        print("timing prefill and decode", file=sys.stderr, flush=True)
        first = bench(a.bin / "llama-bench", files["dense-f16"], a)
        for name in names[1:]:
            rows[name].update(bench(a.bin / "llama-bench", files[name], a))
        last = bench(a.bin / "llama-bench", files["dense-f16"], a)
    rows["dense-f16"].update(first)
    both = {}
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
        both[key] = [first[key], last[key]]
        rows["dense-f16"][key] = (first[key] + last[key]) / 2
    table(rows, both, a)
    record.write(a.json, {"rows": rows, "dense_first_last": both})


def read_gguf_config(file: Path) -> dict:
    """Blocks, MLP width and KV heads as the GGUF file's own header says."""
    from gguf import GGUFReader

    fields = GGUFReader(file).fields

    def value(suffix: str) -> int:
        field = next(f for name, f in fields.items() if name.endswith(suffix))
        return int(field.parts[field.data[0]][0])

    return {
        "blocks": value(".block_count"),
        "intermediate_size": value(".feed_forward_length"),
        "kv_heads": value(".attention.head_count_kv"),
    }


if __name__ == "__main__":
    main()
