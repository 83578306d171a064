"""The whole loop on one machine, on embedded defaults (what `make demo` runs).

    python -m jobs.demo [--dir demo] [--frames 48] [--epochs 5] [--model fcn8s_resnet101]

synthetic drive data -> ingest -> train FCN-8s ResNet101 (2 CPU workers, Ray Train) ->
register (MLflow, sqlite) -> promote to ``champion`` -> label new frames -> preview PNG.

Every step is the real job, called with the arguments printed before it, so each line can be
copied and re-run by hand. Everything is written below ``--dir`` (recreated on every run):
no GPU, no credentials, no network.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

MODEL_NAME = "lane-demo"
EXPERIMENT = "lane-demo"
MARKER = ".lane-demo"  # only a folder carrying this marker is ever deleted by the demo

# Small frames and model input keep the demo within minutes on 2 cores; the crop keeps the
# real recipe's proportion (690 of 1710 rows of a 3384x1710 frame are sky).
FRAME_W, FRAME_H, CROP_TOP = 846, 428, 172
MODEL_SIZE = "256x128"


class Steps:
    """Numbered step headers with elapsed time: the progress display between the jobs' own
    progress output (Ray Data bars, per-epoch lines)."""

    def __init__(self, total: int) -> None:
        self.total, self.n, self.t0 = total, 0, time.time()
        self.started = self.t0

    def __call__(self, title: str, argv: list[str] | None = None, module: str = "") -> None:
        now = time.time()
        if self.n:
            print(f"    done in {now - self.started:.0f}s", flush=True)
        self.n += 1
        self.started = now
        print(f"\n[{self.n}/{self.total}] {title}  (+{now - self.t0:.0f}s)", flush=True)
        if argv is not None:
            print("    $ python -m " + module + " " + " ".join(_quote(a) for a in argv), flush=True)

    def finish(self) -> float:
        print(f"    done in {time.time() - self.started:.0f}s", flush=True)
        return time.time() - self.t0


def _quote(arg: str) -> str:
    return f"'{arg}'" if any(c in arg for c in " @") else arg


def prepare_dir(path: Path) -> None:
    """Recreate the demo folder; refuse to delete a folder the demo did not create."""
    if path.exists():
        if any(path.iterdir()) and not (path / MARKER).exists():
            raise SystemExit(
                f"error: {path} exists and was not made by the demo; pass another --dir"
            )
        shutil.rmtree(path)
    path.mkdir(parents=True)
    (path / MARKER).write_text("created by python -m jobs.demo; safe to delete\n")


def write_frames(out: Path, n: int, *, seed: int, labels: bool, road: str) -> None:
    from pipelines.data.synthetic import write_tree

    step = max(1, n // 4)
    for start in range(0, n, step):
        count = min(step, n - start)
        write_tree(
            out, count, records=4, width=FRAME_W, height=FRAME_H, seed=seed + start,
            road=road, with_labels=labels,
        )  # fmt: skip
        print(f"    {start + count}/{n} frames", flush=True)


@dataclass(frozen=True)
class Demo:
    """Where everything goes: all below one folder."""

    root: Path
    run_name: str

    @property
    def raw(self) -> Path:  # labeled synthetic frames
        return self.root / "raw"

    @property
    def incoming(self) -> Path:  # the new drive, unlabeled
        return self.root / "incoming"

    @property
    def shards(self) -> Path:  # the ingested dataset
        return self.root / "shards"

    @property
    def labels(self) -> Path:  # the labeling job's output
        return self.root / "labels"

    @property
    def checkpoints(self) -> Path:  # the training run's checkpoints
        return self.root / "checkpoints"

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.root / 'mlflow.db'}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default="demo", help="folder for everything the demo writes")
    p.add_argument("--frames", type=int, default=48, help="labeled synthetic frames to train on")
    p.add_argument("--new-frames", type=int, default=8, help="unlabeled frames to label")
    p.add_argument("--epochs", type=int, default=5)
    # (jobs.train checks the name against its --model choices.)
    p.add_argument("--model", default="fcn8s_resnet101",
                   help="model factory name (fcn8s_resnet18: a quarter of the parameters)")  # fmt: skip
    args = p.parse_args(argv)

    demo = Demo(Path(args.dir).resolve(), f"demo-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}")
    prepare_dir(demo.root)
    # Embedded defaults, all inside the demo folder; set before MLflow or Ray start.
    os.environ["MLFLOW_TRACKING_URI"] = demo.tracking_uri
    steps = Steps(7)
    failed = run_steps(demo, args, steps)
    if failed:
        print(f"error: the demo's {failed} step failed (see above)", file=sys.stderr)
        return 1
    from pipelines.labeling.output import preview

    picture = preview(str(demo.labels), demo.root / "preview.png")
    print_summary(demo, steps.finish(), picture)
    return 0


def run_steps(demo: Demo, args: argparse.Namespace, steps: Steps) -> str | None:
    """Each job as a user would run it; the name of the step that failed, or None."""
    from jobs import ingest, label, promote, train
    from pipelines.ops.cluster import init_ray, quiet_ray_data

    steps(f"synthetic drive data: {args.frames} labeled frames ({FRAME_W}x{FRAME_H}) in {demo.raw}")
    write_frames(demo.raw, args.frames, seed=0, labels=True, road="road02")

    steps("start a local Ray (token authentication on, dashboard on 127.0.0.1)")
    init_ray(min_cpus=4)  # 2 training workers + Ray Data tasks beside them
    quiet_ray_data()

    ingest_argv = [
        "--source", str(demo.raw), "--dest", str(demo.shards), "--size", MODEL_SIZE,
        "--crop-top", str(CROP_TOP), "--val-fraction", "0.25",
    ]  # fmt: skip
    steps("ingest into Parquet shards (Ray Data)", ingest_argv, "jobs.ingest")
    if ingest.main(ingest_argv) != 0:
        return "ingest"

    train_argv = [
        "--data", str(demo.shards), "--model", args.model, "--num-workers", "2",
        "--epochs", str(args.epochs), "--batch-size", "4", "--lr", "0.02",
        "--experiment", EXPERIMENT, "--register-as", MODEL_NAME,
        "--storage", str(demo.checkpoints), "--run-name", demo.run_name,
    ]  # fmt: skip
    steps("train with Ray Train (2 CPU DDP workers), track and register in MLflow",
          train_argv, "jobs.train")  # fmt: skip
    if train.main(train_argv) != 0:
        return "train"

    promote_argv = ["--model", MODEL_NAME, "--candidate", "latest", "--eval-data", str(demo.shards)]
    steps("promote the new version to champion if it beats the holder",
          promote_argv, "jobs.promote")  # fmt: skip
    if promote.main(promote_argv) not in (0, promote.NOT_PROMOTED):
        return "promote"

    steps(f"new drive: {args.new_frames} unlabeled frames in {demo.incoming}")
    write_frames(demo.incoming, args.new_frames, seed=1000, labels=False, road="road03")

    label_argv = [
        "--input", str(demo.incoming), "--output", str(demo.labels),
        "--model", f"models:/{MODEL_NAME}@champion", "--apollo-ids",
    ]  # fmt: skip
    steps("label the new frames with the champion (Ray Data, one model per actor)",
          label_argv, "jobs.label")  # fmt: skip
    return "label" if label.main(label_argv) != 0 else None


def print_summary(demo: Demo, seconds: float, picture: Path) -> None:
    from mlflow import MlflowClient

    uri = demo.tracking_uri
    champion = MlflowClient(uri, uri).get_model_version_by_alias(MODEL_NAME, "champion")
    print(
        f"\nDemo finished in {seconds:.0f}s. Everything is under {demo.root}:\n"
        f"  data            {demo.raw} -> dataset {demo.shards} (current.json names the version)\n"
        f"  MLflow          {uri}: experiment {EXPERIMENT!r}, run {demo.run_name!r}"
        f" ({champion.run_id})\n"
        f"  model           models:/{MODEL_NAME}/{champion.version} (alias champion)\n"
        f"  checkpoints     {demo.checkpoints / demo.run_name}\n"
        f"  labeled Parquet {demo.labels}\n"
        f"  preview         {picture}\n"
        f"Open the MLflow UI:\n"
        f"  .venv/bin/mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
