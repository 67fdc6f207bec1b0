"""What the SmolLM2 benchmarks share: running ``prunella`` as a process, the common flags.

Each benchmark prunes in its own ``python -m prunella prune`` process, so that its
peak RSS is its own; a failed command ends the benchmark with its stderr.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import time


def run(args: list[str]) -> str:
    """Stdout of ``python -m prunella ARGS``; exits with the stderr's tail if it fails."""
    done = subprocess.run([sys.executable, "-m", "prunella", *args], capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"prunella {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return done.stdout


def measured(argv: list[str], limit_mb: int | None = None, check: bool = True) -> dict:
    """Peak RSS (read from the OS by ``/usr/bin/time -v``), wall time and stdout of
    ``python -m prunella ARGV`` (or ``python -c CODE ...``). ``limit_mb`` caps the
    process's address space; with ``check=False`` a failed process is reported
    (``returncode``, ``error``: its stderr's last line) instead of ending the benchmark."""

    def cap() -> None:
        if limit_mb is not None:
            resource.setrlimit(resource.RLIMIT_AS, (limit_mb << 20, limit_mb << 20))

    start = time.perf_counter()
    command = argv if argv[0] == "-c" else ["-m", "prunella", *argv]
    done = subprocess.run(
        ["/usr/bin/time", "-v", sys.executable, *command],
        capture_output=True,
        text=True,
        preexec_fn=cap,
    )
    wall = time.perf_counter() - start
    if done.returncode and check:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    result = {"peak_rss_mb": rss_kb / 1024, "wall_seconds": wall, "stdout": done.stdout}
    if done.returncode:
        own = done.stderr.split("\tCommand being timed:")[0]  # the process's own stderr
        errors = [line for line in own.splitlines() if line.strip()]
        errors = [line for line in errors if not line.startswith("Command ")]  # time's own
        signal = re.search(r"Command terminated by signal (\d+)", done.stderr)
        error = errors[-1] if errors else ""
        if signal:
            error = f"killed by signal {signal.group(1)}" + (f" ({error})" if error else "")
        result.update(returncode=done.returncode, error=error)
    return result


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
