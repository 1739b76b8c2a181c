#!/usr/bin/env bash
# Wheels the lent GPU machine lacks for the training benchmarks (its image has torch, transformers, pyarrow,
# pandas, onnx, but not these), for its Python 3.12 on x86-64: download here, carry the folder, install there
#   bash bench/device_wheels.sh            # writes .device-wheels/ (keep it out of git: .git/info/exclude)
#   device run, carry [".device-wheels"]:  python3 -m pip install --no-index --no-deps .device-wheels/*.whl
#                                          python3 bench/bench_recipe_throughput.py --device cuda
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .device-wheels
.venv/bin/pip download --quiet --dest .device-wheels --only-binary=:all: --no-deps \
  --python-version 3.12 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  diffusers datasets dill multiprocess xxhash pydantic pydantic-core annotated-types typing-inspection \
  importlib-metadata
du -sh .device-wheels
