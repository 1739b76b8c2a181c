#!/usr/bin/env bash
# Create .venv and install StreamEdit with its test tools. Idempotent: re-running only installs what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
# torch first, pinned: an unpinned torch pulls several GB of CUDA packages. Where there is no NVIDIA GPU,
# 2.13.0 resolves to the CPU wheel this workplace provides; with a GPU, the regular (CUDA) build.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q "torch==2.13.0"
fi
.venv/bin/pip install -q -e ".[dev]"
echo "setup done: $(.venv/bin/python -c 'import torch; print("torch", torch.__version__)')"
