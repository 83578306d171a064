#!/usr/bin/env bash
# The GPU checks in one command, for a machine with one CUDA GPU and PyTorch (a GPU session runs
# it first). Each benchmark's markdown table goes to $OUT (default benchmarks/gpu-out/) and to
# stdout; paste them into benchmarks/RESULTS.md with the device and date. Under 8 minutes on
# one H100 (each step has its own time limit, the slow torch.compile ones last).
#
#   bash benchmarks/gpu_check.sh            # from the repository root
#   LEARNING=1 bash benchmarks/gpu_check.sh # also the recipe's learning curve (~3 min more)
#   FCN_TABLE=1 bash benchmarks/gpu_check.sh # also issue 26's FCN table (~4-7 min more)
#
# What runs here needs only PyTorch, torchvision, numpy and Pillow: the lent GPU machines have
# no Ray or MLflow. The Ray-based halves (jobs.train and jobs.label on the GPU) run at the end
# when GPU_BUNDLE names the bundle of `python -m benchmarks.gpu_bundle` (Ray + mlflow-skinny
# stripped to ~40 MiB; benchmarks/gpu_jobs.sh), or with `make bench BENCH_ARGS="--device cuda"`
# where the project is installed.
#
#   GPU_BUNDLE=benchmarks/gpu-bundle/bundle.tar.xz bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/gpu-out}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
failed=0
step() {  # step SECONDS NAME -- command...: run with a time limit; a failure is reported, not fatal
    local limit=$1 name=$2; shift 3
    echo "== $name (limit ${limit}s)"
    local t0=$SECONDS
    timeout "$limit" "$@" || { echo "!! $name failed or timed out (rc $?)"; failed=1; }
    echo "== $name took $((SECONDS - t0))s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader \
    | tee "$OUT/gpu.txt"
"$PY" - <<'PY' | tee -a "$OUT/gpu.txt"
import importlib.util as u, os, torch, torchvision
print("torch", torch.__version__, "torchvision", torchvision.__version__, torch.cuda.get_device_name(),
      "cpus", os.cpu_count(), "torchcodec", u.find_spec("torchcodec") is not None)
PY

# Forward latency of every model at 384x1024.
step 120 models -- "$PY" -m benchmarks.bench_models --device cuda --out "$OUT/models.md"
# The training step at 1024x384 (bf16 autocast + channels_last) with MFU, and with the step's
# augmentation on the GPU (uint8 frames in, as the training loop gets them).
step 180 train -- "$PY" -m benchmarks.bench_train --device cuda --in-memory-only --steps 30 \
    --augment --out "$OUT/train.md"
# Labeling stages on full 3384x1710 frames: the job's CPU stages on either path, nvJPEG,
# forward only, the actor's call; CPU threads one GPU needs.
step 120 stages -- "$PY" -m benchmarks.bench_label_stages --device cuda --frames 32 \
    --batch-size 16 --out "$OUT/stages.md"
# torch.compile on and off: the training step, then the labeling forward pass.
step 210 train-compile -- "$PY" -m benchmarks.bench_train --device cuda --in-memory-only \
    --steps 30 --batch-size 16 --compile --out "$OUT/train_compile.md"
step 150 forward-compile -- "$PY" -m benchmarks.bench_label_stages --device cuda --frames 8 \
    --repeats 1 --batch-size 16 --compile --out "$OUT/stages_compile.md"
if [ "${LEARNING:-0}" = 1 ]; then
    # What the training recipe learns at the production input size (one seed).
    step 900 learning -- "$PY" -m benchmarks.bench_learning --device cuda --size 1024x384 \
        --frame-size 1692x855 --crop-top 345 --frames 192 --epochs 10 --batch-size 8 \
        --out "$OUT/learning.md"
fi
if [ "${FCN_TABLE:-0}" = 1 ]; then
    # Issue 26: FCN-32s/16s/8s staged and at once, and FCN-8s ResNet-101, two seeds, 1024x384
    # (~4 minutes on one H200, estimated from the CPU run's FLOPs).
    step 420 fcn-table -- "$PY" -m benchmarks.bench_fcn_table --device cuda --size 1024x384 \
        --frame-size 1692x855 --crop-top 345 --frames 96 --steps 100 --batch-size 8 \
        --out "$OUT/fcn_table.md"
fi
if [ -n "${GPU_BUNDLE:-}" ] && [ -f "$GPU_BUNDLE" ]; then
    # The Ray jobs through the bundle (its own per-job limits; about 8 minutes at most).
    GPU_BUNDLE="$GPU_BUNDLE" OUT="$OUT" PYTHON="$PY" bash benchmarks/gpu_jobs.sh || failed=1
elif [ -n "${GPU_BUNDLE:-}" ]; then
    echo "!! GPU_BUNDLE=$GPU_BUNDLE: no such file; the Ray jobs did not run"; failed=1
fi
exit $failed
