#!/usr/bin/env bash
# Install and start the main job: the whole Ray Serve application on the built-in tiny demo
# checkpoint (CPU), at http://127.0.0.1:8000/v1. Extra arguments go to `pixtral-serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
exec .venv/bin/pixtral-serve "$@"
