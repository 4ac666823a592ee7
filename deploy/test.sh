#!/usr/bin/env bash
# Install everything and run the whole test suite. Fails when any test fails or none ran.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
.venv/bin/python -m pytest -q "$@"
