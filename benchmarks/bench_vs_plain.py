"""This project against the plain PyTorch scripts users would write instead, side by side on the
same generated full-size frames, the same model (FCN-8s ResNet-101) and sizes, one after the
other on the same machine.

    python -m benchmarks.bench_vs_plain [--frames 48] [--frame-size 3384x1710]
        [--label-size 256x96] [--train-size 256x96] [--batch-size 4] [--epochs 3]
        [--only label|train] [--out FILE]

(a) labeling: ``benchmarks.plain_scripts label`` (DataLoader decoding the frames, model, masks
    back to full size, PNG, one Parquet file) against ``python -m jobs.label``: wall time of
    each whole command, start-up included; ``jobs.label`` twice: starting its own Ray, and
    connecting to a Ray head already up (as a job under ``ray job submit`` does);
(b) training: ``benchmarks.plain_scripts train`` (two gloo DDP processes, DataLoader decoding
    the raw JPEG/PNG every step) against ``python -m jobs.train`` with 2 workers on shards
    ingested from the same frames (the ingest is not timed): steady images/s, the mean of the
    epochs after the first.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import emit
from pipelines.core.frames import parse_size

ROOT = Path(__file__).resolve().parent.parent
SUMMARY = re.compile(r"labeled (\d+), errors (\d+).*\[([\d.]+)s\]")


def run(cmd: list[str], env: dict) -> tuple[str, float]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout, took


def start_cluster(tmp_path: Path):
    """A Ray head on 127.0.0.1 with this machine's CPUs (Ray's own ``cluster_utils``), for a job
    to connect to as under ``ray job submit``; ``.shutdown()`` stops it."""
    from ray.cluster_utils import Cluster

    return Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": os.cpu_count(), "node_ip_address": "127.0.0.1",
                        "include_dashboard": False, "temp_dir": str(tmp_path / "ray")},
    )  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=48)
    p.add_argument("--frame-size", type=parse_size, default=(3384, 1710))
    p.add_argument("--label-size", type=parse_size, default=(256, 96))
    p.add_argument("--train-size", type=parse_size, default=(256, 96))
    p.add_argument("--batch-size", type=int, default=4, help="per model call / global batch")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--only", choices=["label", "train"])
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    # Ray's single-machine mode: every Ray started here binds to, and every driver resolves
    # 127.0.0.1 to, the loopback address. Read when Ray is imported: set before any import.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

    import mlflow

    from fcn_models import build_model
    from pipelines.core import labels
    from pipelines.core.frames import FrameTransform
    from pipelines.data.synthetic import write_tree
    from pipelines.inference.model_dir import ModelSpec, save_model_dir
    from pipelines.ops import tracking
    from pipelines.registry.pyfunc import register_model_dir

    fw, fh = args.frame_size
    crop_top = round(fh * 690 / 1710)
    py = sys.executable
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "CUDA_VISIBLE_DEVICES": ""}
        env.pop("RAY_ADDRESS", None)
        write_tree(tmp_path / "raw", args.frames, records=4, width=fw, height=fh, seed=0)
        frames_dir = tmp_path / "raw" / "ColorImage_road02"

        if args.only in (None, "label"):
            tracking.configure(uri)
            w, h = args.label_size
            spec = ModelSpec("fcn8s_resnet101", labels.N_CLASSES,
                             FrameTransform(width=w, height=h, crop_top=crop_top),
                             labels.CLASS_NAMES)  # fmt: skip
            model_dir = save_model_dir(tmp_path / "model", build_model(spec.model, spec.n_class),
                                       spec)  # fmt: skip
            with mlflow.start_run(experiment_id=tracking.ensure_experiment("bench", uri)):
                register_model_dir(model_dir, "bench", {})
            out, plain_s = run([py, "-m", "benchmarks.plain_scripts", "label", "--frames",
                                str(frames_dir), "--weights", str(model_dir / "model.pt"),
                                "--out", str(tmp_path / "plain.parquet"), "--size", f"{w}x{h}",
                                "--crop-top", str(crop_top), "--batch-size",
                                str(args.batch_size)], env)  # fmt: skip
            plain = json.loads(out.strip().splitlines()[-1])
            out, job_s = run([py, "-m", "jobs.label", "--input", str(frames_dir), "--output",
                              str(tmp_path / "labeled"), "--model", "models:/bench/1",
                              "--batch-size", str(args.batch_size)], env)  # fmt: skip
            m = SUMMARY.search(out)
            if not m or int(m[1]) != args.frames or int(m[2]):
                raise RuntimeError(f"unexpected labeling summary:\n{out[-2000:]}")
            # Under `ray job submit` the cluster is up before the job starts: the same command
            # against a Ray head started first (and stopped after), into a new output.
            cluster = start_cluster(tmp_path)
            try:
                out, up_s = run([py, "-m", "jobs.label", "--input", str(frames_dir), "--output",
                                 str(tmp_path / "labeled-up"), "--model", "models:/bench/1",
                                 "--batch-size", str(args.batch_size)],
                                {**env, "RAY_ADDRESS": cluster.address})  # fmt: skip
            finally:
                cluster.shutdown()
            up = SUMMARY.search(out)
            if not up or int(up[1]) != args.frames or int(up[2]):
                raise RuntimeError(f"unexpected labeling summary:\n{out[-2000:]}")
            rows += [
                (f"labeling {args.frames} frames {fw}x{fh} -> {w}x{h}, plain script, wall s (its own clock)",
                 f"{plain_s:.1f} ({plain['seconds']:.1f}; {args.frames / plain_s:.2f} images/s)"),
                ("labeling, jobs.label, wall s (its own clock)",
                 f"{job_s:.1f} ({float(m[3]):.1f}; {args.frames / job_s:.2f} images/s)"),
                ("labeling, plain / project (>= 1 is the project faster)",
                 f"{plain_s / job_s:.2f}"),
                ("labeling, jobs.label on a Ray cluster already up, wall s (its own clock)",
                 f"{up_s:.1f} ({float(up[3]):.1f}; {args.frames / up_s:.2f} images/s)"),
                ("labeling, plain / project on a cluster already up", f"{plain_s / up_s:.2f}"),
            ]  # fmt: skip

        if args.only in (None, "train"):
            w, h = args.train_size
            # The ingest in its own process (its own Ray), not timed.
            run([py, "-c", "from pipelines.data.ingest import IngestConfig, ingest; import ray;"
                          "ray.init(logging_level='ERROR', include_dashboard=False);"
                          f"ingest(IngestConfig(source={str(tmp_path / 'raw')!r}, "
                          f"dest={str(tmp_path / 'shards')!r}, size=({w}, {h}), "
                          f"crop_top={crop_top}, val_fraction=0.25, progress_seconds=None))"],
                env)  # fmt: skip
            out, _ = run([py, "-m", "benchmarks.plain_scripts", "train", "--frames",
                          str(tmp_path / "raw"), "--size", f"{w}x{h}", "--crop-top",
                          str(crop_top), "--batch-size", str(args.batch_size), "--epochs",
                          str(args.epochs)], env)  # fmt: skip
            plain_rates = json.loads(out.strip().splitlines()[-1])["images_per_s_by_epoch"]
            run([py, "-m", "jobs.train", "--data", str(tmp_path / "shards"), "--storage",
                 str(tmp_path / "ckpt"), "--experiment", "bench-train", "--register-as",
                 "bench-train", "--run-name", "bench", "--num-workers", "2", "--batch-size",
                 str(args.batch_size), "--epochs", str(args.epochs)], env)  # fmt: skip
            client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
            exp = client.get_experiment_by_name("bench-train")
            run_id = client.search_runs([exp.experiment_id])[0].info.run_id
            history = sorted(client.get_metric_history(run_id, "train_images_per_s"),
                             key=lambda m: m.step)  # fmt: skip
            job_rates = [m.value for m in history]
            split = {k: [m.value for m in sorted(client.get_metric_history(run_id, k),
                                                  key=lambda m: m.step)]
                     for k in ("epoch_setup_s", "epoch_wait_s", "epoch_compute_s", "val_seconds")}  # fmt: skip
            plain_steady = sum(plain_rates[1:]) / max(1, len(plain_rates) - 1)
            job_steady = sum(job_rates[1:]) / max(1, len(job_rates) - 1)
            rows += [
                (f"training {w}x{h}, 2 processes, global batch {args.batch_size}, plain DDP, "
                 "images/s by epoch", ", ".join(f"{r:.2f}" for r in plain_rates)),
                ("training, jobs.train (2 workers), images/s by epoch",
                 ", ".join(f"{r:.2f}" for r in job_rates)),
                ("training steady (epochs 2+), project / plain", f"{job_steady / plain_steady:.2f}"),
            ]  # fmt: skip
            for k, v in split.items():
                if v:
                    rows.append((f"jobs.train {k} by epoch", ", ".join(f"{x:.1f}" for x in v)))

    caption = (
        f"This project against plain PyTorch scripts, {args.frames} synthetic frames {fw}x{fh}, "
        f"FCN-8s ResNet-101, batch {args.batch_size}; {os.cpu_count()} CPUs, no GPU"
    )
    emit(caption, rows, args.out)


if __name__ == "__main__":
    main()
