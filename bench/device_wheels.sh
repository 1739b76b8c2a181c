#!/usr/bin/env bash
# Wheels the lent GPU machine lacks (its image has torch, transformers, huggingface_hub, pyarrow, pandas, OpenCV and
# onnx, but not these), for its Python 3.12 on x86-64, at the versions of this project's .venv: download here, carry
# the folder, install there.
#   bash bench/device_wheels.sh            # writes .device-wheels/ (keep it out of git: .git/info/exclude)
#   device run, carry [".device-wheels"]:  python3 -m pip install -q --no-index --no-deps --target /tmp/site \
#                                            .device-wheels/*.whl && export PYTHONPATH=/tmp/site:$PWD
#   then python3 bench/bench_recipe_throughput.py --device cuda, or python3 -m training.budgeted_finetune ...
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .device-wheels
pinned=()
for name in diffusers datasets dill multiprocess pydantic pydantic-core annotated-types typing-inspection \
  importlib-metadata; do
  pinned+=("$name==$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('$name'))")")
done
.venv/bin/pip download --quiet --dest .device-wheels --only-binary=:all: --no-deps \
  --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 "${pinned[@]}"
du -sh .device-wheels
