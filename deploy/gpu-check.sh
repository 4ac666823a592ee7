#!/usr/bin/env bash
# The GPU checks in one command, for a CUDA machine: the `gpu` tests, then `benchmarks.gpu`.
#
#   bash deploy/gpu-check.sh [LOG_DIR]     # on the GPU machine; logs and the benchmark's JSON go to LOG_DIR
#   bash deploy/gpu-check.sh --fetch-wheels [PYTHON_VERSION]   # beforehand, on a machine with PyPI
#
# Neither needs Ray. A bare GPU machine (PyTorch, Triton, safetensors and pytest, no package
# registry) lacks mistral-common, whose tokenizers the tests' tiny checkpoints and prompts use.
# `--fetch-wheels` downloads it and the packages it needs that such a machine lacks into .whl/, for
# the GPU machine's Python (default 3.12), at the versions this machine's .venv runs; copy .whl/
# beside this script's repository there, and the check installs from it (into a scratch folder)
# when mistral-common is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# mistral-common and what it imports that a PyTorch-only image does not have
WHEELS="mistral-common pydantic pydantic-core annotated-types typing-inspection pydantic-extra-types
jsonschema jsonschema-specifications referencing rpds-py pycountry"

if [ "${1:-}" = "--fetch-wheels" ]; then
    version=${2:-3.12}
    rm -rf .whl && mkdir -p .whl
    for name in $WHEELS; do
        pinned=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('$name'))")
        python3 -m pip download -q --no-deps --only-binary=:all: -d .whl --python-version "$version" \
            --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            --platform manylinux_2_28_x86_64 "$name==$pinned"
    done
    ls .whl
    exit 0
fi

out=${1:-gpu-check}
mkdir -p "$out"
if ! python3 -c "import mistral_common.tokens.tokenizers.mistral" 2>/dev/null; then
    [ -d .whl ] || { echo "mistral-common is missing: run 'bash deploy/gpu-check.sh --fetch-wheels' where PyPI is reachable, and bring .whl/" >&2; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/pixtral-gpu-site .whl/*.whl
    export PYTHONPATH=/tmp/pixtral-gpu-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" || true
} 2>&1 | tee "$out/device.txt"
# Triton builds a small C launcher per kernel: without a C compiler every compile fails, so say it first
python3 -c "import torch; print('torch.compile on CUDA:', torch.compile(lambda x: x * 2)(torch.ones(4, device='cuda')).sum().item())" \
    2>&1 | tail -1 | tee -a "$out/device.txt"
status=0
python3 -m pytest -q -p no:cacheprovider -m gpu -rA tests/test_gpu.py tests/test_fp8.py 2>&1 | tee "$out/tests.log" || status=1
python3 -m benchmarks.gpu --json "$out/gpu.json" 2>&1 | tee "$out/benchmark.log" || status=1
exit $status
