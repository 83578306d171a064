#!/usr/bin/env bash
# The GPU checks in one command, for a machine with one CUDA GPU and PyTorch (a GPU session runs
# it first). Each benchmark's markdown table goes to $OUT (default benchmarks/gpu-out/) and to
# stdout; paste them into benchmarks/RESULTS.md with the device and date.
#
#   bash benchmarks/gpu_check.sh            # from the repository root
#
# What runs here needs only PyTorch, torchvision, numpy, pandas, pyarrow and Pillow: the lent
# GPU machines have no Ray or MLflow. The Ray-based halves (jobs.train and jobs.label on the
# GPU) run with `make bench BENCH_ARGS="--device cuda"` where the project is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/gpu-out}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
"$PY" -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())'

# Issue 11: what the recipe learns at the production input size, before and after.
"$PY" -m benchmarks.bench_learning --device cuda --size 1024x384 --frame-size 1692x855 \
    --crop-top 345 --frames 192 --epochs 10 --batch-size 8 --out "$OUT/learning.md"
# The training step alone at 1024x384 (bf16 autocast + channels_last), with MFU.
"$PY" -m benchmarks.bench_train --device cuda --in-memory-only --steps 30 --out "$OUT/train.md"
# Forward latency of every model at 384x1024.
"$PY" -m benchmarks.bench_models --device cuda --out "$OUT/models.md"
