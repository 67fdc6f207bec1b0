"""The benchmark scripts still run against the current package: every one parses its
arguments and imports what it needs, and the in-process ones run end to end on a tiny
model (an engine change once broke ``profile_prune.py``, and a solver's signature
``alps_profile.py``, and nothing noticed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(
    p.name
    for p in (ROOT / "benchmarks").glob("*.py")
    if p.name not in ("record.py", "smollm2_runs.py")
)


def bench(name: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)  # fmt: skip


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_benchmark_parses_its_arguments(name):
    done = bench(name, "--help", timeout=120)
    assert done.returncode == 0 and "usage" in done.stdout, done.stderr[-2000:]


@pytest.mark.parametrize("passes", ["1", "2"])
def test_profile_prune_runs_on_a_tiny_model(passes, tiny_llama, tmp_path):
    out = tmp_path / "profile.json"
    done = bench("profile_prune.py", "--model", str(tiny_llama), "--nsamples", "4", "--seqlen",
                 "32", "--passes", passes, "--json", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert results["passes"] == int(passes)
    assert results["prune_seconds"] > 0 and results["floor_seconds"] > 0
    assert "| **prune (without load)** |" in done.stdout


def test_numeric_noise_runs_on_a_tiny_model(tiny_llama, tmp_path):
    out = tmp_path / "noise.json"
    done = bench("numeric_noise.py", "--model", str(tiny_llama), "--nsamples", "4", "--seqlen",
                 "32", "--json", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]["rows"]
    assert len(rows) == 6 and all(r["ppl"] > 1 for r in rows)


def test_alps_profile_runs(tmp_path):
    out = tmp_path / "alps.json"
    done = bench("alps_profile.py", "--tokens", "1024", "--json", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert len(results["iterations"]) == 7 and results["sparsegpt_seconds"] > 0
    assert sum(results["parts"].values()) == pytest.approx(results["alps_seconds"])


def test_bits_curve_compares_allocated_rows_with_the_uniform_line(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from bits_smollm2 import against_uniform

    def row(bits, size, ppl, allocation="uniform"):
        return {"quantizer": "gptq", "sparsity": None, "bits": bits, "allocation": allocation,
                "block_layer_bytes": size, "ppl_in_memory": ppl}  # fmt: skip

    rows = [row(2, 100, 300.0), row(3, 200, 40.0), row(4, 300, 20.0),
            row(3, 150, 85.0, "evopress")]  # fmt: skip
    (line,) = against_uniform(rows)
    assert rows[-1]["ppl_uniform_line"] == pytest.approx(170.0)  # halfway from 300 to 40
    assert rows[-1]["vs_uniform_3bit"] == pytest.approx(85 / 40)
    assert "0.500x the uniform line" in line and "2.125x uniform 3-bit" in line
