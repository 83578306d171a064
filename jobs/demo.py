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
from datetime import datetime, timezone
from pathlib import Path

MODEL_NAME = EXPERIMENT = "lane-demo"
MARKER = ".lane-demo"  # only a folder carrying this marker is ever deleted by the demo
# Small frames and model input keep the demo within minutes on 2 cores; the crop keeps the
# real recipe's proportion (690 of 1710 rows of a 3384x1710 frame are sky).
FRAME_W, FRAME_H, CROP_TOP, MODEL_SIZE = 846, 428, 172, "256x128"


class Steps:
    """Numbered step headers with elapsed time, between the jobs' own progress lines."""

    def __init__(self, total: int) -> None:
        self.total, self.n, self.t0 = total, 0, time.time()

    def __call__(self, title: str | None, argv: list[str] | None = None, module: str = "") -> float:
        """Close the step before and start ``title`` (None: the last one is done); returns
        the seconds since the demo started."""
        if self.n:
            print(f"    done in {time.time() - self.started:.0f}s", flush=True)
        self.n, self.started = self.n + 1, time.time()
        at = self.started - self.t0
        if title is not None:
            print(f"\n[{self.n}/{self.total}] {title}  (+{at:.0f}s)", flush=True)
        if argv is not None:  # quoted where a shell needs it
            args = (f"'{a}'" if " " in a or "@" in a else a for a in argv)
            print("    $ python -m", module, *args, flush=True)
        return at


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
    root = Path(args.dir).resolve()
    prepare_dir(root)
    # Embedded defaults, all inside the demo folder; set before MLflow or Ray start.
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    run_name = f"demo-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    steps = Steps(7)
    failed = run_steps(root, run_name, args, steps)
    if failed:
        print(f"error: the demo's {failed} step failed (see above)", file=sys.stderr)
        return 1
    from pipelines.labeling.output import preview

    picture = preview(str(root / "labels"), root / "preview.png")
    print_summary(root, run_name, steps(None), picture)
    return 0


def run_steps(root: Path, run_name: str, args: argparse.Namespace, steps: Steps) -> str | None:
    """Each job as a user would run it; the name of the step that failed, or None."""
    from jobs import ingest, label, promote, train
    from pipelines.data.synthetic import write_drive
    from pipelines.runtime.cluster import init_ray, quiet_ray_data

    def written(n: int) -> None:
        print(f"    {n} frames", flush=True)

    def ran(title: str, job, argv: list[str], ok: tuple[int, ...] = (0,)) -> bool:
        steps(title, argv, job.__name__)
        return job.main(argv) in ok

    steps(f"synthetic drive data: {args.frames} labeled frames ({FRAME_W}x{FRAME_H}) in {root}/raw")
    write_drive(root / "raw", args.frames, width=FRAME_W, height=FRAME_H, on_written=written)
    steps("start a local Ray (token authentication on, dashboard on 127.0.0.1)")
    init_ray(min_cpus=4)  # 2 training workers + Ray Data tasks beside them
    quiet_ray_data()
    shards = str(root / "shards")
    if not ran("ingest into Parquet shards (Ray Data)", ingest,
               ["--source", str(root / "raw"), "--dest", shards, "--size", MODEL_SIZE,
                "--crop-top", str(CROP_TOP), "--val-fraction", "0.25"]):  # fmt: skip
        return "ingest"
    if not ran("train with Ray Train (2 CPU DDP workers), track and register in MLflow", train,
               ["--data", shards, "--model", args.model, "--num-workers", "2", "--epochs",
                str(args.epochs), "--batch-size", "4", "--lr", "0.02", "--experiment",
                EXPERIMENT, "--register-as", MODEL_NAME, "--storage", str(root / "checkpoints"),
                "--run-name", run_name]):  # fmt: skip
        return "train"
    if not ran("promote the new version to champion if it beats the holder", promote,
               ["--model", MODEL_NAME, "--candidate", "latest", "--eval-data", shards],
               ok=(0, promote.NOT_PROMOTED)):  # fmt: skip
        return "promote"
    steps(f"new drive: {args.new_frames} unlabeled frames in {root}/incoming")
    write_drive(root / "incoming", args.new_frames, width=FRAME_W, height=FRAME_H, seed=1000,
                road="road03", with_labels=False, on_written=written)  # fmt: skip
    labeled = ran("label the new frames with the champion (Ray Data, one model per actor)", label,
                  ["--input", str(root / "incoming"), "--output", str(root / "labels"),
                   "--model", f"models:/{MODEL_NAME}@champion", "--apollo-ids"])  # fmt: skip
    return None if labeled else "label"


def print_summary(root: Path, run_name: str, seconds: float, picture: Path) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    champion = MlflowClient(uri, uri).get_model_version_by_alias(MODEL_NAME, "champion")
    print(
        f"\nDemo finished in {seconds:.0f}s. Everything is under {root}:\n"
        f"  data            {root}/raw -> dataset {root}/shards (current.json names the version)\n"
        f"  MLflow          {uri}: experiment {EXPERIMENT!r}, run {run_name!r} ({champion.run_id})\n"
        f"  model           models:/{MODEL_NAME}/{champion.version} (alias champion)\n"
        f"  checkpoints     {root}/checkpoints/{run_name}\n  labeled Parquet {root}/labels\n"
        f"  preview         {picture}\nOpen the MLflow UI:\n"
        f"  .venv/bin/mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
