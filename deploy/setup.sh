#!/usr/bin/env bash
# Create .venv (if missing) and install pixtral-serve with its test tools, CPU PyTorch first.
# torch==2.13.0 is the CPU wheel; asking for plain "torch" first would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0" || .venv/bin/python -m pip install -q "torch>=2.5"
.venv/bin/python -m pip install -q -e ".[test]"
