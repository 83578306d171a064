"""This project against the plain PyTorch scripts users would write instead
(``benchmarks/plain_scripts.py``): the same generated full-size frames, model and sizes, one
after the other on the same machine.

    python -m benchmarks.bench_vs_plain [--device cpu|cuda] [--frames 48]
        [--frame-size 3384x1710] [--label-size 256x96] [--train-size 256x96] [--batch-size 4]
        [--epochs 3] [--only label|train] [--out FILE]

(a) labeling, on ``--device``: wall time of each whole command, start-up included;
    ``jobs.label`` on all frames and on a third, each starting its own Ray: the difference of
    their clocks is the steady rate, set against the forward pass alone;
(b) training, on CPU: two gloo DDP processes against ``jobs.train`` with 2 workers on shards
    of the same frames: steady images/s, the mean of the epochs after the first.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks import common
from pipelines.core.frames import parse_size
from pipelines.data.synthetic import write_tree

PY = sys.executable


def label_rows(args, tmp_path: Path, uri: str, crop_top: int, device: torch.device) -> list:
    """(a): the model's forward pass, the plain labeling script, then jobs.label on all frames
    and on a third, each starting its own Ray."""
    (w, h), (fw, fh), n = args.label_size, args.frame_size, args.frames
    cuda = device.type == "cuda"
    frames_dir, part = tmp_path / "raw" / "ColorImage_road02", tmp_path / "part"
    part.mkdir()
    for f in sorted(frames_dir.rglob("*.jpg"))[: n // 3]:
        shutil.copy(f, part / f.name)
    _, env = common.job_env(tmp_path, cpu_only=not cuda)
    model, model_dir = common.register_untrained(tmp_path, uri, args.label_size, crop_top)
    if not cuda:  # without a GPU the model actor takes the node's CPUs: the forward pass too
        torch.set_num_threads(os.cpu_count() or 1)
    fwd = common.forward_rate(model, args.label_size, args.batch_size, device)
    out, plain_s = common.run_command(
        [PY, "-m", "benchmarks.plain_scripts", "label", "--frames", str(frames_dir), "--weights",
         str(model_dir / "model.pt"), "--out", str(tmp_path / "plain.parquet"), "--size",
         f"{w}x{h}", "--crop-top", str(crop_top), "--batch-size", str(args.batch_size),
         "--device", device.type], env
    )  # fmt: skip
    plain = json.loads(out.strip().splitlines()[-1])

    def job(src: Path, frames: int, output: str, job_env: dict) -> tuple[float, float]:
        """(wall s, the job's own clock s) of jobs.label on ``src``."""
        out, wall = common.run_command(
            [PY, "-m", "jobs.label", "--input", str(src), "--output", str(tmp_path / output),
             "--model", "models:/bench/1", "--batch-size", str(args.batch_size)], job_env
        )  # fmt: skip
        return wall, common.label_summary(out, frames)[1]

    job_s, job_clock = job(frames_dir, n, "labeled", env)
    _, part_clock = job(part, n // 3, "labeled-part", env)
    # Start-up noise larger than the extra frames' work leaves no steady rate.
    steady = (n - n // 3) / (job_clock - part_clock) if job_clock > part_clock else float("nan")
    return [
        (f"labeling {n} frames {fw}x{fh} -> {w}x{h}, plain script, wall s (its own clock)",
         f"{plain_s:.1f} ({plain['seconds']:.1f}; {n / plain_s:.2f} images/s)"),
        ("labeling, jobs.label, wall s (its own clock)",
         f"{job_s:.1f} ({job_clock:.1f}; {n / job_s:.2f} images/s)"),
        ("labeling, plain / project (>= 1 is the project faster)", f"{plain_s / job_s:.2f}"),
        (f"forward only, in-memory tensors {w}x{h}, batch {args.batch_size}", f"{fwd:.2f} images/s"),
        (f"jobs.label steady state ({n} frames against {n // 3}, own clocks)",
         f"{steady:.2f} images/s ({steady / fwd:.2f} of forward only)"),
    ]  # fmt: skip


def train_rows(args, tmp_path: Path, uri: str, env: dict, crop_top: int) -> list[tuple]:
    """(b): the plain DDP script, then jobs.train with 2 workers on shards of the same frames."""
    w, h = args.train_size
    raw, shards = str(tmp_path / "raw"), str(tmp_path / "shards")
    common.run_command(common.ingest_command(raw, shards, (w, h), crop_top), env)
    out, _ = common.run_command(
        [PY, "-m", "benchmarks.plain_scripts", "train", "--frames", raw, "--size", f"{w}x{h}",
         "--crop-top", str(crop_top), "--batch-size", str(args.batch_size), "--epochs",
         str(args.epochs)], env
    )  # fmt: skip
    plain_rates = json.loads(out.strip().splitlines()[-1])["images_per_s_by_epoch"]
    common.run_command(
        [PY, "-m", "jobs.train", "--data", shards, "--storage", str(tmp_path / "ckpt"),
         "--experiment", "bench-train", "--register-as", "bench-train", "--run-name", "bench",
         "--num-workers", "2", "--batch-size", str(args.batch_size), "--epochs",
         str(args.epochs)], env
    )  # fmt: skip
    job_rates = common.metric_history(uri, "bench-train", "train_images_per_s")
    job_steady, plain_steady = (sum(r[1:]) / max(1, len(r) - 1) for r in (job_rates, plain_rates))
    rows = [
        (f"training {w}x{h}, 2 processes, global batch {args.batch_size}, plain DDP, "
         "images/s by epoch", ", ".join(f"{r:.2f}" for r in plain_rates)),
        ("training, jobs.train (2 workers), images/s by epoch",
         ", ".join(f"{r:.2f}" for r in job_rates)),
        ("training steady (epochs 2+), project / plain",
         f"{job_steady / plain_steady:.2f}"),
    ]  # fmt: skip
    for k in ("epoch_setup_s", "epoch_wait_s", "epoch_compute_s", "val_seconds"):
        v = common.metric_history(uri, "bench-train", k)
        if v:
            rows.append((f"jobs.train {k} by epoch", ", ".join(f"{x:.1f}" for x in v)))
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_device_arg(p)
    p.add_argument("--frames", type=int, default=48)
    p.add_argument("--frame-size", type=parse_size, default=(3384, 1710))
    p.add_argument("--label-size", type=parse_size, default=(256, 96))
    p.add_argument("--train-size", type=parse_size, default=(256, 96))
    p.add_argument("--batch-size", type=int, default=4, help="per model call / global batch")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--only", choices=["label", "train"])
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    device = common.parse_device(p, args)
    fw, fh = args.frame_size
    crop_top = round(fh * 690 / 1710)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        uri, cpu_env = common.job_env(tmp_path, cpu_only=True)
        write_tree(tmp_path / "raw", args.frames, records=4, width=fw, height=fh, seed=0)
        if args.only in (None, "label"):
            rows += label_rows(args, tmp_path, uri, crop_top, device)
        if args.only in (None, "train"):
            rows += train_rows(args, tmp_path, uri, cpu_env, crop_top)
    caption = (
        f"This project against plain PyTorch scripts, {args.frames} synthetic frames {fw}x{fh}, "
        f"FCN-8s ResNet-101, batch {args.batch_size}; {os.cpu_count()} CPUs, labeling on "
        f"{device.type} ({common.device_name(device)}), torch {torch.__version__}"
    )
    common.emit(caption, rows, args.out)


if __name__ == "__main__":
    main()
