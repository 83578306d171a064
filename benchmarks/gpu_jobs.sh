#!/usr/bin/env bash
# The Ray jobs (jobs.train, jobs.label) on a machine that has PyTorch but no Ray or MLflow (the
# lent GPU machines): unpacks the bundle that `python -m benchmarks.gpu_bundle` builds (Ray,
# mlflow-skinny, SQLAlchemy/Alembic for the sqlite store; ~40 MiB) and runs, through it, the
# benchmarks that call the real jobs on synthetic frames at 1024x384 (bench_train: the training
# job's images/s on freshly ingested shards; bench_vs_plain --only label: the labeling job on
# full frames against the plain script and the forward pass), each with its own time limit. Token authentication stays on (the jobs' local Ray).
#
#   GPU_BUNDLE=benchmarks/gpu-bundle/bundle.tar.xz bash benchmarks/gpu_jobs.sh
#   DEVICE=cpu SIZE=256x128 FRAME_SIZE=846x428 bash benchmarks/gpu_jobs.sh   # a check on a CPU
#
# gpu_check.sh runs this at its end when GPU_BUNDLE names the bundle file. Tables go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
BUNDLE=${GPU_BUNDLE:-benchmarks/gpu-bundle/bundle.tar.xz}
OUT=${OUT:-benchmarks/gpu-out}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:-1024x384}
FRAME_SIZE=${FRAME_SIZE:-3384x1710}
TRAIN_FRAMES=${TRAIN_FRAMES:-64}
LABEL_FRAMES=${LABEL_FRAMES:-48}
UNPACK=${UNPACK:-/tmp/gpu-bundle-unpacked}
export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=token
mkdir -p "$OUT"
[ -f "$BUNDLE" ] || { echo "error: no bundle at $BUNDLE (python -m benchmarks.gpu_bundle)"
    exit 2; }

t0=$SECONDS
rm -rf "$UNPACK" && mkdir -p "$UNPACK" && tar -xJf "$BUNDLE" -C "$UNPACK" || {
    echo "error: cannot unpack $BUNDLE"; exit 2; }
export PYTHONPATH="$UNPACK/gpu-bundle/site${PYTHONPATH:+:$PYTHONPATH}"
# Ray's workers are started with this Python; the bundle reaches them through PYTHONPATH.
echo "== bundle unpacked in $((SECONDS - t0))s"
"$PY" - <<'PY' || { echo "error: the bundle does not import here"; exit 2; }
import google.protobuf, grpc, pyarrow, ray, mlflow, sqlalchemy, ray.data, ray.train.torch, torch
print("ray", ray.__version__, "mlflow", mlflow.__version__, "torch", torch.__version__, "cuda",
      torch.cuda.is_available(), "| image: pyarrow", pyarrow.__version__, "grpcio",
      grpc.__version__,
      "| protobuf", google.protobuf.__version__, "from", google.protobuf.__file__)
PY

failed=0
step() {  # step SECONDS NAME -- command...: run with a time limit; a failure is reported, not fatal
    local limit=$1 name=$2; shift 3
    echo "== $name (limit ${limit}s)"
    local t=$SECONDS
    timeout "$limit" "$@" || { echo "!! $name failed or timed out (rc $?)"; failed=1; }
    echo "== $name took $((SECONDS - t))s"
}
# jobs.train: 1 worker (--use-gpu on cuda), 2 epochs on TRAIN_FRAMES synthetic frames, sqlite store.
step "${TRAIN_LIMIT:-240}" jobs-train -- "$PY" -m benchmarks.bench_train --device "$DEVICE" \
    --size "$SIZE" --frames "$TRAIN_FRAMES" --epochs 2 --steps 10 --out "$OUT/jobs_train.md"
# jobs.label (one GPU per model actor on cuda) on all frames and on a third (the steady rate),
# the forward pass alone and the plain script on the same device beside it.
step "${LABEL_LIMIT:-300}" jobs-label -- "$PY" -m benchmarks.bench_vs_plain --only label \
    --device "$DEVICE" --label-size "$SIZE" --frame-size "$FRAME_SIZE" --frames "$LABEL_FRAMES" \
    --batch-size 8 --out "$OUT/jobs_label.md"
exit $failed
