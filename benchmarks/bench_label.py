"""Labeling throughput: the batch-labeling job on full frames against the model's forward-only
throughput on in-memory tensors.

    python -m benchmarks.bench_label [--device cpu|cuda] [--frames 48] [--frame-size 3384x1710]
        [--size 1024x384] [--batch-size 8] [--out FILE]

In one run:

1. a model is registered in a temporary MLflow store (untrained weights: throughput does not
   depend on them) with the frame transform for ``--size``;
2. *forward only*: the model alone on in-memory tensors of the model input size, inference
   mode (bf16 autocast + channels_last on CUDA, as the predictor runs it);
3. *labeling job*: ``python -m jobs.label`` on synthetic full frames: read from storage,
   decode, crop + resize, predict with one model actor (one GPU on CUDA), masks back to the
   frame size, PNG-encode, write Parquet, commit. Run twice from scratch, on a third of
   ``--frames`` and on all of them: the difference is the steady rate (per GPU on CUDA),
   the larger run's summary the end-to-end rate with start-up.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import add_device_arg, device_name, emit, parse_device, synchronize
from pipelines.core.frames import parse_size

ROOT = Path(__file__).resolve().parent.parent
SUMMARY = re.compile(r"labeled (\d+), errors (\d+).*\[([\d.]+)s\]")


def forward_only(model: torch.nn.Module, size: tuple[int, int], batch: int, device: torch.device,
                 steps: int = 10) -> float:  # fmt: skip
    w, h = size
    cuda = device.type == "cuda"
    model = model.to(device).eval()
    x = torch.randn(batch, 3, h, w, device=device)
    if cuda:
        model, x = (
            model.to(memory_format=torch.channels_last),
            x.contiguous(memory_format=torch.channels_last),
        )
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        for _ in range(2):
            model(x).argmax(1)
        synchronize(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            model(x).argmax(1)
        synchronize(device)
    return batch * steps / (time.perf_counter() - t0)


def label_job(src: Path, out: Path, batch: int, env: dict) -> tuple[int, float]:
    """(frames labeled, seconds of the job's labeling run from its summary line)."""
    cmd = [sys.executable, "-m", "jobs.label", "--input", str(src), "--output", str(out),
           "--model", "models:/bench/1", "--batch-size", str(batch), "--actors", "1"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"jobs.label failed:\n{proc.stderr[-3000:]}")
    m = SUMMARY.search(proc.stdout)
    if not m or int(m[2]):
        raise RuntimeError(f"unexpected labeling summary:\n{proc.stdout[-2000:]}")
    return int(m[1]), float(m[3])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_arg(p)
    p.add_argument(
        "--frames", type=int, default=48, help="frames of the larger run (a third: the smaller)"
    )
    p.add_argument("--frame-size", type=parse_size, default=(3384, 1710))
    p.add_argument("--size", type=parse_size, default=(1024, 384), help="model input WxH")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    device = parse_device(p, args)

    import mlflow

    from fcn_models import build_model
    from pipelines.core import labels
    from pipelines.core.frames import FrameTransform
    from pipelines.data.synthetic import write_tree
    from pipelines.inference.model_dir import ModelSpec, save_model_dir
    from pipelines.ops import tracking
    from pipelines.registry.pyfunc import register_model_dir

    fw, fh = args.frame_size
    transform = FrameTransform(
        width=args.size[0], height=args.size[1], crop_top=round(fh * 690 / 1710)
    )
    model = build_model("fcn8s_resnet101", labels.N_CLASSES)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        uri = tracking.configure(f"sqlite:///{tmp_path / 'mlflow.db'}")
        save_model_dir(
            tmp_path / "model",
            model,
            ModelSpec("fcn8s_resnet101", labels.N_CLASSES, transform, labels.CLASS_NAMES),
        )
        with mlflow.start_run(experiment_id=tracking.ensure_experiment("bench", uri)):
            register_model_dir(tmp_path / "model", "bench", {})
        write_tree(
            tmp_path / "frames",
            args.frames,
            records=4,
            width=fw,
            height=fh,
            seed=3,
            with_labels=False,
        )

        if device.type == "cpu":
            # Without a GPU the model actor takes the node's CPUs (segmenter.Segmenter): time
            # the forward pass with the same, so the ratio measures the pipeline around it.
            torch.set_num_threads(os.cpu_count() or 1)
        fwd = forward_only(model, args.size, args.batch_size, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()

        env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
        env.pop("RAY_ADDRESS", None)
        if device.type == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        # Two runs of the job from scratch, on a third of the frames and on all of them: both
        # pay the same start-up (Ray, actor, model download), so the difference in time is
        # the steady labeling rate; the larger run's whole time gives the end-to-end rate.
        part = tmp_path / "part"
        part.mkdir()
        for f in sorted((tmp_path / "frames").rglob("*.jpg"))[: args.frames // 3]:
            shutil.copy(f, part / f.name)
        (n_small, t_small), (n_all, t_all) = (
            label_job(src, tmp_path / f"labeled-{src.name}", args.batch_size, env)
            for src in (part, tmp_path / "frames")
        )
        job_rate = n_all / t_all
        if t_all <= t_small:
            # Start-up noise larger than the extra frames' work: no steady rate to report.
            sys.exit(
                f"bench_label: {n_all} frames took {t_all:.1f} s, {n_small} took {t_small:.1f} s; "
                "the difference is start-up noise: raise --frames (24 or more)"
            )
        steady = (n_all - n_small) / (t_all - t_small)

    w, h = args.size
    caption = (
        f"FCN-8s ResNet-101; {args.frames} frames {fw}x{fh} -> model input {w}x{h}, batch "
        f"{args.batch_size}, one model actor; {device.type} ({device_name(device)}"
        f"{'' if device.type == 'cuda' else f', forward pass with {os.cpu_count()} threads as in the actor'}), "
        f"torch {torch.__version__}"
    )
    per_gpu = " per GPU" if device.type == "cuda" else ""
    rows = [
        (f"forward only, in-memory tensors {w}x{h}", f"{fwd:.2f} images/s"),
        (f"labeling job, steady state (read, decode, resize, predict, restore to {fw}x{fh}, PNG, write)", f"{steady:.2f} images/s{per_gpu}"),
        (f"labeling job, end to end incl. start-up ({n_all} frames in {t_all:.1f} s)", f"{job_rate:.2f} images/s"),
        ("ratio job steady state / forward only", f"{steady / fwd:.2f}"),
    ]  # fmt: skip
    emit(caption, rows, args.out)


if __name__ == "__main__":
    main()
