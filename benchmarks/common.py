"""What every benchmark shares: the ``--device`` flag, clocks that wait for the device, the
markdown table (printed, and written to ``--out`` for RESULTS.md), and running the Ray jobs as a
user does (their own process, a throwaway MLflow store, a registered untrained model)."""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
LABEL_SUMMARY = re.compile(r"labeled (\d+), errors (\d+).*\[([\d.]+)s\]")


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")


def parse_device(parser: argparse.ArgumentParser, args: argparse.Namespace) -> torch.device:
    """``args.device`` as a torch device; a usage error (exit 2) where CUDA is asked for but
    absent, before any work starts."""
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    return torch.device(args.device)


def synchronize(device: torch.device) -> None:
    """Wait for queued CUDA work: without it a timer measures only the kernel launches."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.machine() or "unknown CPU"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """Markdown table lines: the first column left-aligned (names), the rest right (figures)."""
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|",
    ]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def emit(caption: str, rows: Sequence[Sequence[object]], out: Path | None,
         header: Sequence[str] = ("measure", "value")) -> str:  # fmt: skip
    """Caption, blank line, table: printed, and written to ``out`` when given."""
    text = "\n".join([caption, "", *table(header, rows)]) + "\n"
    print(text)
    if out is not None:
        out.write_text(text)
    return text


def rate(step: Callable[[], object], items: int, steps: int, device: torch.device,
         warmup: int = 1) -> float:  # fmt: skip
    """Items/s of ``steps`` calls of ``step`` (``items`` each) after ``warmup`` untimed ones
    (allocator, algorithm choice, compilation), the device's queue drained before each clock."""
    for _ in range(warmup):
        step()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return items * steps / (time.perf_counter() - t0)


def forward_rate(model: torch.nn.Module, size: tuple[int, int], batch: int,
                 device: torch.device, *, steps: int = 10, compile_: bool = False) -> float:  # fmt: skip
    """Images/s of the model's inference forward pass and argmax on random tensors already on
    the device, as the predictor runs it (bf16 autocast + channels_last on CUDA)."""
    w, h = size
    cuda = device.type == "cuda"
    net = model.to(device).eval()
    x = torch.randn(batch, 3, h, w, device=device)
    if cuda:
        net = net.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    if compile_:
        net = torch.compile(net)
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        return rate(lambda: net(x).argmax(1), batch, steps, device, warmup=3)


# -- the Ray jobs, run as a user runs them -----------------------------------------------------
def job_env(tmp_path: Path, *, cpu_only: bool = False) -> tuple[str, dict]:
    """(tracking URI, environment) for a job in its own process: a sqlite MLflow store in
    ``tmp_path``, a local Ray of its own (no inherited ``RAY_ADDRESS``), no GPU if ``cpu_only``."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    env.pop("RAY_ADDRESS", None)
    if cpu_only:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return uri, env


def run_command(cmd: list[str], env: dict) -> tuple[str, float]:
    """(stdout, wall seconds) of a command run from the repository root; its stderr's tail in
    the error when it fails."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout, took


def ingest_command(raw: str | Path, shards: str | Path, size: tuple[int, int],
                   crop_top: int) -> list[str]:  # fmt: skip
    """``jobs.ingest`` of the synthetic frames in ``raw``, a quarter of the drives for val."""
    return [sys.executable, "-m", "jobs.ingest", "--source", str(raw), "--dest", str(shards),
            "--size", f"{size[0]}x{size[1]}", "--crop-top", str(crop_top), "--val-fraction",
            "0.25"]  # fmt: skip


def label_summary(out: str, frames: int | None = None) -> tuple[int, float]:
    """(frames labeled, seconds of the job's own clock) from jobs.label's summary line
    (``LABEL_SUMMARY``); an error where a frame failed or (``frames``) some were not labeled."""
    m = LABEL_SUMMARY.search(out)
    if not m or int(m[2]) or (frames is not None and int(m[1]) != frames):
        raise RuntimeError(f"unexpected labeling summary:\n{out[-2000:]}")
    return int(m[1]), float(m[3])


def register_untrained(tmp_path: Path, uri: str, size: tuple[int, int], crop_top: int,
                       name: str = "bench") -> tuple[torch.nn.Module, Path]:  # fmt: skip
    """An untrained FCN-8s ResNet-101 (throughput does not depend on the weights) saved with
    the transform for ``size`` and registered as ``models:/{name}/1``; (model, its folder)."""
    import mlflow

    from fcn_models import build_model
    from pipelines.core import labels
    from pipelines.core.frames import FrameTransform
    from pipelines.inference.model_dir import ModelSpec, save_model_dir
    from pipelines.registry.pyfunc import register_model_dir
    from pipelines.runtime import tracking

    transform = FrameTransform(width=size[0], height=size[1], crop_top=crop_top)
    spec = ModelSpec("fcn8s_resnet101", labels.N_CLASSES, transform, labels.CLASS_NAMES)
    model = build_model(spec.model, spec.n_class)
    model_dir = save_model_dir(tmp_path / "model", model, spec)
    tracking.configure(uri)
    with mlflow.start_run(experiment_id=tracking.ensure_experiment(name, uri)):
        register_model_dir(model_dir, name, {})
    return model, model_dir


def metric_history(uri: str, experiment: str, key: str) -> list[float]:
    """A metric of the experiment's (latest) run, by step: what jobs.train logged."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    run_id = client.search_runs([exp.experiment_id])[0].info.run_id
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
