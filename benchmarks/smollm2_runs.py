"""What the SmolLM2 benchmarks share: running ``prunella`` as a process, the common flags.

Each benchmark prunes in its own ``python -m prunella prune`` process, so that its
peak RSS is its own; a failed command ends the benchmark with its stderr.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def run(args: list[str]) -> str:
    """Stdout of ``python -m prunella ARGS``; exits with the stderr's tail if it fails."""
    done = subprocess.run([sys.executable, "-m", "prunella", *args], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"prunella {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def evaluate(model: str, a) -> dict:
    """``prunella eval MODEL --json`` on ``a.data`` at ``a.seqlen``."""
    out = run(["eval", model, "--data", a.data, "--seqlen", str(a.seqlen), "--json", "--quiet"])
    return json.loads(out)


def smollm2_parser(doc: str) -> argparse.ArgumentParser:
    """A parser with the flags every SmolLM2 benchmark takes: model, calibration text,
    evaluation text, calibration windows."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calib", default="sample")
    parser.add_argument("--data", default="sample-eval")
    parser.add_argument("--nsamples", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    return parser
