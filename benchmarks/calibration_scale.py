"""Calibration data at scale: drawing windows from large corpora, and a prune calibrated on one.

Part 1 draws 128 x 2048 calibration windows (SmolLM2's tokenizer, seed 0) from
plain text files of 10 MB, 100 MB and 1 GB, generated here from the shipped
samples' paragraphs in a seeded random order (English prose, like a real corpus):

* ``before`` -- the whole file read and tokenized in one call, then the windows'
  start tokens drawn (what ``prunella.data`` did for every file before it read
  large corpora piece by piece, and still does for texts up to ``WHOLE_TEXT_BYTES``;
  run here by raising that threshold above the file's size);
* ``after`` -- the windows' byte offsets drawn first, and only the text from each
  offset on read and tokenized.

Each draw runs as its own process (peak RSS from ``/usr/bin/time -v``, which includes
the runtime: Python, torch and the tokenizer, printed as ``floor``), with its address
space capped at ``--limit-mb``: a draw that needs more fails, and is reported so.

Part 1b draws the same windows from a JSON Lines file and a Parquet file of
``--record-size`` bytes (1 GB; one paragraph per record; the Parquet file with
pyarrow's default row groups, uncompressed). There is no "before": those
formats were not read at all before.

Part 2 prunes SmolLM2-135M (SparseGPT, 50%, ``--nsamples 32 --seqlen 512``, as the
README's first command) calibrated on the shipped sample and on a generated 6 MB
text file (before and after), and prints each prune's peak RSS and time.

    python benchmarks/calibration_scale.py --repeat 3 --json calibration_scale.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
from pathlib import Path

import record
from smollm2_runs import measured

DRAW = """
import json, sys, time
from prunella import data
from prunella.io.checkpoint import resolve
from prunella.io.models import load_tokenizer
path, nsamples, seqlen, whole = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
tokenizer = load_tokenizer(resolve("smollm2-135m"))
if path == "-":  # the floor: the runtime and the tokenizer, nothing drawn
    print(json.dumps({}))
    sys.exit(0)
if whole == "1":
    data.WHOLE_TEXT_BYTES = 1 << 62
start = time.perf_counter()
windows, info = data.draw_calibration(tokenizer, path, nsamples, seqlen, seed=0)
assert windows.shape == (nsamples, seqlen)
print(json.dumps({"draw_seconds": time.perf_counter() - start, **info}))
"""

PRUNE = """
import sys
from prunella import data
from prunella.cli import main
if sys.argv[1] == "1":
    data.WHOLE_TEXT_BYTES = 1 << 62
sys.exit(main(sys.argv[2:]))
"""


def paragraphs(size: int, seed: int = 0):
    """Blocks of the shipped paragraphs in a seeded random order, ``size`` bytes in all."""
    from prunella.data import read_text

    pool = [p for name in ("sample", "sample-eval") for p in read_text(name, "train").split("\n\n")]
    pool = [p for p in pool if p.strip()]
    rng, written = random.Random(seed), 0
    while written < size:
        block = rng.choices(pool, k=2000)
        written += sum(len(p.encode()) + 2 for p in block)
        yield block


def generate(path: Path, size: int) -> Path:
    """A file of about ``size`` bytes of those paragraphs: plain text (``.txt``), one
    record per paragraph (``.jsonl``), or a Parquet file with pyarrow's default row
    groups (``.parquet``, uncompressed so that it is as large as a real corpus)."""
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        texts = [p for block in paragraphs(size) for p in block]
        # no dictionary and no compression: the paragraphs repeat, real corpora do not
        pq.write_table(pa.table({"text": texts}), path, use_dictionary=False, compression="none")
        return path
    with open(path, "w", encoding="utf-8") as f:
        for block in paragraphs(size):
            if path.suffix == ".jsonl":
                f.write("".join(json.dumps({"text": p}) + "\n" for p in block))
            else:
                f.write("".join(p + "\n\n" for p in block))
    return path


def human(size: int) -> str:
    return f"{size / 1e9:.3g} GB" if size >= 1e9 else f"{size / 1e6:.3g} MB"


def draw(path: str, a, whole: bool) -> dict:
    argv = ["-c", DRAW, path, str(a.nsamples), str(a.seqlen), "1" if whole else "0"]
    runs = [measured(argv, limit_mb=a.limit_mb, check=False) for _ in range(a.repeat)]
    return summary(runs)


def summary(runs: list[dict], printed_json: bool = True) -> dict:
    """The median of the runs (or the failure, if one failed), with what the first
    printed as JSON on its last line."""
    failed = [r for r in runs if r.get("returncode")]
    if failed:
        first = failed[0]
        return {
            "failed": first["error"] or f"exit {first['returncode']}",
            **{key: first[key] for key in ("peak_rss_mb", "wall_seconds")},
        }
    out = json.loads(runs[0]["stdout"].strip().splitlines()[-1]) if printed_json else {}
    out["peak_rss_mb"] = statistics.median(r["peak_rss_mb"] for r in runs)
    out["wall_seconds"] = statistics.median(r["wall_seconds"] for r in runs)
    if "draw_seconds" in out:
        out["draw_seconds"] = statistics.median(
            json.loads(r["stdout"].strip().splitlines()[-1])["draw_seconds"] for r in runs
        )
    out["runs"] = len(runs)
    return out


def prune(calib: str, out: Path, a, whole: bool) -> dict:
    argv = ["prune", a.model, "--out", str(out), "--sparsity", "0.5", "--solver", "sparsegpt"]
    argv += ["--nsamples", "32", "--seqlen", "512", "--calib", calib, "--quiet", "--overwrite"]
    runs = [measured(["-c", PRUNE, "1" if whole else "0", *argv]) for _ in range(a.repeat)]
    result = summary(runs, printed_json=False)
    report = json.loads((out / "prune_report.json").read_text())
    result["calibration"] = report["calibration"]
    return result


def cell(result: dict, key: str, fmt: str, unit: str) -> str:
    return "failed" if "failed" in result else f"{format(result[key], fmt)} {unit}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10e6,100e6,1e9", help="generated file sizes, bytes")
    parser.add_argument("--nsamples", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--limit-mb", type=int, default=16384, help="address-space cap per draw")
    parser.add_argument("--repeat", type=int, default=1, help="runs per measurement (median)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--record-size", type=float, default=1e9, help="JSONL/Parquet bytes")
    parser.add_argument("--prune-file-mb", type=float, default=6.3)
    parser.add_argument("--parts", default="draw,records,prune", help="which parts to run")
    parser.add_argument("--workdir", default=None, help="where the generated files go")
    parser.add_argument("--json", default=None)
    a = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="calibration-scale-", dir=a.workdir) as tmp:
        tmp = Path(tmp)
        floor = draw("-", a, whole=False)
        print(f"floor (Python, torch, the tokenizer): {floor['peak_rss_mb']:.0f} MB RSS")
        results: dict = {"floor_mb": floor["peak_rss_mb"], "args": vars(a)}
        if "draw" in a.parts:
            print(f"\n## Drawing {a.nsamples} x {a.seqlen} windows\n")
            print("| text file | before: peak RSS | before: time | after: peak RSS | after: time |")
            print("|---|---|---|---|---|")
        draws = results["draws"] = []
        for size in (int(float(s)) for s in a.sizes.split(",") if "draw" in a.parts):
            path = generate(tmp / f"corpus-{size}.txt", size)
            before, after = draw(str(path), a, whole=True), draw(str(path), a, whole=False)
            draws.append({"bytes": path.stat().st_size, "before": before, "after": after})
            cells = [
                f"{cell(r, 'peak_rss_mb', ',.0f', 'MB')} | {cell(r, 'draw_seconds', '.2f', 's')}"
                for r in (before, after)
            ]
            print(f"| {human(size)} | {' | '.join(cells)} |")
            for name, result in (("before", before), ("after", after)):
                if "failed" in result:
                    print(
                        f"  {name} failed under the {a.limit_mb:,} MB address-space cap after "
                        f"{result['wall_seconds']:.0f} s, at {result['peak_rss_mb']:,.0f} MB RSS: "
                        f"{result['failed']}"
                    )
            path.unlink()

        if "records" in a.parts:
            print(f"\n## Drawing {a.nsamples} x {a.seqlen} windows from records\n")
            print("| file | size | row groups | peak RSS | time | documents read |")
            print("|---|---|---|---|---|---|")
            records = results["records"] = []
            for suffix in (".jsonl", ".parquet"):
                path = generate(tmp / f"records{suffix}", int(a.record_size))
                groups = "-"
                if suffix == ".parquet":
                    import pyarrow.parquet as pq

                    groups = str(pq.ParquetFile(path).num_row_groups)
                after = draw(str(path), a, whole=False)
                records.append({"file": path.name, "bytes": path.stat().st_size, "after": after})
                print(
                    f"| {path.name} | {human(path.stat().st_size)} | {groups} "
                    f"| {cell(after, 'peak_rss_mb', ',.0f', 'MB')} "
                    f"| {cell(after, 'draw_seconds', '.2f', 's')} "
                    f"| {after.get('documents_read', '-')} |"
                )
                path.unlink()

        if "prune" in a.parts:
            big = generate(tmp / "calib-6mb.txt", int(a.prune_file_mb * 1e6))
            runs = {
                "shipped sample": prune("sample", tmp / "o1", a, whole=False),
                f"{human(big.stat().st_size)} file, before": prune(str(big), tmp / "o2", a, True),
                f"{human(big.stat().st_size)} file, after": prune(str(big), tmp / "o3", a, False),
            }
            base = runs["shipped sample"]["peak_rss_mb"]
            print("\n## Pruning SmolLM2-135M (SparseGPT 50%, 32 x 512 calibration tokens)\n")
            print("| calibration | peak RSS | vs the shipped sample | time | tokens read |")
            print("|---|---|---|---|---|")
            for name, r in runs.items():
                print(
                    f"| {name} | {r['peak_rss_mb']:,.0f} MB | {r['peak_rss_mb'] / base:.3f} "
                    f"| {r['wall_seconds']:.1f} s | {r['calibration']['tokens_read']:,} |"
                )
            results["prunes"] = runs
    record.write(Path(a.json) if a.json else None, results)


if __name__ == "__main__":
    main()
