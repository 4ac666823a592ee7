#!/usr/bin/env bash
# Install and run the main job on the built-in tiny demo checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
exec .venv/bin/python -m model.demo "$@"
