"""Training throughput of FCN-8s ResNet-101: the full pipeline against in-memory tensors, and MFU.

    python -m benchmarks.bench_train [--device cpu|cuda] [--size 1024x384] [--batch-size 8]
        [--frames 64] [--epochs 2] [--steps 20] [--peak-tflops X] [--out FILE]

In one run:

1. *in-memory*: the model alone, SGD steps on random tensors already on the device (the
   training step's ceiling); FLOPs per image counted by ``torch.utils.flop_counter`` on one
   forward + backward, so achieved TFLOP/s and MFU = achieved / ``--peak-tflops`` (default
   989 for H100/H200 bf16 dense; none on CPU);
2. *full pipeline*: ``python -m jobs.train`` with one worker on shards ingested from synthetic
   frames (Ray Data decode + augmentation, Ray Train, DDP wrapper, validation and MLflow
   logging outside the timed loop): the job's own ``train_images_per_s`` of its last epoch.

Both use the same input size, batch size and precision (bf16 autocast + channels_last on
CUDA, fp32 on CPU).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import add_device_arg, device_name, emit, parse_device, synchronize
from fcn_models import build_model
from pipelines.core.frames import FrameTransform, parse_size
from pipelines.core.labels import N_CLASSES
from pipelines.training.augment import Augment, augment_batch, step_generator
from pipelines.training.recipe import make_loss, make_optimizer, make_recipe, set_trainable
from pipelines.training.step import train_step

ROOT = Path(__file__).resolve().parent.parent
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def flops_per_image(model: torch.nn.Module, h: int, w: int, device: torch.device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, 3, h, w, device=device)
    with FlopCounterMode(display=False) as counter:
        model(x).float().sum().backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def in_memory(
    size: tuple[int, int],
    batch: int,
    steps: int,
    device: torch.device,
    compile_: bool = False,
    augment: bool = False,
) -> tuple[float, float]:
    """(images/s, FLOPs per image) of SGD steps on tensors already on the device
    (``compile_``: the model through ``torch.compile``, warm-up includes compiling;
    ``augment``: each step starts from uint8 frames and runs the training loop's
    augmentation and normalization on the device first, as ``train_epoch`` does)."""
    w, h = size
    cuda = device.type == "cuda"
    model = build_model("fcn8s_resnet101", N_CLASSES).to(device).train()
    if cuda:
        model = model.to(memory_format=torch.channels_last)
    flops = flops_per_image(model, h, w, device)
    # The job's own step: its recipe, parameter groups (fixed upsamplers) and loss.
    recipe = make_recipe("default", "fcn8s_resnet101")
    set_trainable(model, learn_upsampling=recipe.learn_upsampling)
    opt, _ = make_optimizer(model, recipe, total_steps=steps + 3)
    criterion = make_loss(recipe)
    if compile_:
        model = torch.compile(model)
    torch.set_flush_denormal(True)  # as the training loop does
    x = torch.randn(batch, 3, h, w, device=device)
    if cuda:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, N_CLASSES, (batch, h, w), device=device)

    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    if augment:  # uint8 frames on the device, as the training loop receives them
        raw = {
            "image": torch.randint(0, 256, (batch, h, w, 3), dtype=torch.uint8, device=device),
            "label": y.to(torch.uint8),
        }
        transform, gen = FrameTransform(width=w, height=h), step_generator(device, 0)

    def step() -> None:
        batch_ = (
            augment_batch(raw, Augment(), transform, gen) if augment else {"image": x, "label": y}
        )
        train_step(model, batch_, criterion, opt, autocast, channels_last=cuda)

    for _ in range(3):  # warm-up: allocator, cuDNN/oneDNN algorithm choice
        step()
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return batch * steps / (time.perf_counter() - t0), flops


def profile_steps(size: tuple[int, int], batch: int, device: torch.device) -> str:
    """The top device kernels of 5 training steps (after warm-up), as torch.profiler's table."""
    from torch.profiler import ProfilerActivity, profile

    w, h = size
    model = build_model("fcn8s_resnet101", N_CLASSES).to(device).train()
    model = model.to(memory_format=torch.channels_last)
    recipe = make_recipe("default", "fcn8s_resnet101")
    set_trainable(model, learn_upsampling=recipe.learn_upsampling)
    opt, _ = make_optimizer(model, recipe, total_steps=20)
    criterion = make_loss(recipe)
    x = torch.randn(batch, 3, h, w, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, N_CLASSES, (batch, h, w), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    for _ in range(3):
        train_step(model, {"image": x, "label": y}, criterion, opt, autocast)
    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            train_step(model, {"image": x, "label": y}, criterion, opt, autocast)
        synchronize(device)
    return prof.key_averages().table(
        sort_by="cuda_time_total", row_limit=30, max_name_column_width=70
    )


def full_pipeline(size: tuple[int, int], batch: int, frames: int, epochs: int, cuda: bool) -> float:
    """The training job's own images/s (last epoch) on freshly ingested synthetic shards."""
    import mlflow
    import ray

    from pipelines.core.frames import FrameTransform
    from pipelines.data.ingest import IngestConfig, ingest
    from pipelines.data.synthetic import write_tree

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        fw, fh = 1692, 855  # half the real frame: the pipeline still crops and resizes
        write_tree(tmp_path / "raw", frames, records=4, width=fw, height=fh, seed=0)
        transform = FrameTransform(width=size[0], height=size[1], crop_top=345)
        ray.init(num_cpus=os.cpu_count(), logging_level="ERROR", include_dashboard=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        ingest(IngestConfig.of_transform(str(tmp_path / "raw"), str(tmp_path / "shards"), transform, val_fraction=0.25, progress_seconds=None))  # fmt: skip
        ray.shutdown()
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
        env.pop("RAY_ADDRESS", None)
        cmd = [
            sys.executable, "-m", "jobs.train", "--data", str(tmp_path / "shards"),
            "--storage", str(tmp_path / "ckpt"), "--experiment", "bench", "--register-as",
            "bench", "--run-name", "bench", "--num-workers", "1", "--batch-size", str(batch),
            "--epochs", str(epochs),
            # On CPU the worker gets as many threads as the in-memory run (Ray gives a worker
            # one thread per reserved CPU), so the ratio measures the pipeline, not threads.
            "--cpus-per-worker", "4" if cuda else str(torch.get_num_threads()),
        ] + (["--use-gpu"] if cuda else [])  # fmt: skip
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"jobs.train failed:\n{proc.stderr[-3000:]}")
        client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
        run = client.search_runs([client.get_experiment_by_name("bench").experiment_id])[0]
        history = client.get_metric_history(run.info.run_id, "train_images_per_s")
        return max(history, key=lambda m: m.step).value


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_arg(p)
    p.add_argument("--size", type=parse_size, default=(1024, 384), help="model input WxH")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--frames", type=int, default=64, help="synthetic frames for the pipeline run")
    p.add_argument("--epochs", type=int, default=2, help="pipeline epochs (the last is reported)")
    p.add_argument("--steps", type=int, default=20, help="timed in-memory steps")
    p.add_argument("--peak-tflops", type=float, help="device peak for MFU (bf16 dense)")
    p.add_argument(
        "--more-batch-sizes",
        default="",
        help="comma list: in-memory rate and MFU at these batch sizes too",
    )
    p.add_argument("--cudnn-benchmark", choices=["on", "off", "both"], default="off")
    p.add_argument("--profile", type=Path, help="top CUDA kernels of 5 in-memory steps")
    p.add_argument(
        "--compile",
        action="store_true",
        help="in-memory rate with torch.compile too (at --batch-size)",
    )
    p.add_argument(
        "--in-memory-only",
        action="store_true",
        help="skip the jobs.train run (for a machine with PyTorch but no Ray or MLflow)",
    )
    p.add_argument(
        "--augment",
        action="store_true",
        help="also time in-memory steps that start from uint8 frames and augment on the device",
    )
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    device = parse_device(p, args)
    name = device_name(device)
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)

    torch.backends.cudnn.benchmark = args.cudnn_benchmark == "on"
    mem_rate, flops = in_memory(args.size, args.batch_size, args.steps, device)
    torch.cuda.empty_cache() if device.type == "cuda" else None
    pipe_rate = None
    if not args.in_memory_only:
        pipe_rate = full_pipeline(
            args.size, args.batch_size, args.frames, args.epochs, device.type == "cuda"
        )
    achieved = flops * mem_rate / 1e12
    w, h = args.size
    caption = (
        f"FCN-8s ResNet-101, {w}x{h}, batch {args.batch_size}, "
        f"{'bf16 autocast + channels_last' if device.type == 'cuda' else 'fp32'}; {device.type} "
        f"({name}{'' if device.type == 'cuda' else f', {torch.get_num_threads()} threads'}), "
        f"torch {torch.__version__}"
    )
    mfu = f"{achieved / peak:.1%} of {peak:g} TFLOP/s" if peak else "n/a (no peak given)"
    rows = [("in-memory tensors (model only)", f"{mem_rate:.2f} images/s")]
    if pipe_rate is not None:
        rows += [
            (f"full pipeline (jobs.train, 1 worker, last of {args.epochs} epochs)", f"{pipe_rate:.2f} images/s"),
            ("ratio pipeline / in-memory", f"{pipe_rate / mem_rate:.2f}"),
        ]  # fmt: skip
    rows += [
        ("FLOPs per image (forward + backward)", f"{flops / 1e9:.1f} GFLOP"),
        ("achieved (in-memory)", f"{achieved:.3f} TFLOP/s"),
        ("MFU (in-memory)", mfu),
    ]  # fmt: skip

    def mfu_of(rate: float) -> str:
        return f"{flops * rate / 1e12 / peak:.1%}" if peak else "n/a"

    if args.augment:
        a_rate, _ = in_memory(args.size, args.batch_size, args.steps, device, augment=True)
        rows.append((f"in-memory + the step's augmentation on the {device.type}, batch "
                     f"{args.batch_size}", f"{a_rate:.2f} images/s ({a_rate / mem_rate:.2f} of "
                     "without)"))  # fmt: skip

    if args.compile:
        label = f"in-memory, torch.compile, batch {args.batch_size} (MFU)"
        try:
            c_rate, _ = in_memory(args.size, args.batch_size, args.steps, device, compile_=True)
            rows.append((label, f"{c_rate:.2f} images/s ({c_rate / mem_rate:.2f}x, "
                                f"MFU {mfu_of(c_rate)})"))  # fmt: skip
        except Exception as e:  # an inductor bug must not lose the other rows
            rows.append((label, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"))
    sizes = [args.batch_size] + [int(v) for v in args.more_batch_sizes.split(",") if v.strip()]
    for b in sizes[1:]:
        torch.cuda.empty_cache() if device.type == "cuda" else None
        b_rate, _ = in_memory(args.size, b, args.steps, device)
        rows.append(
            (f"in-memory, batch {b} (MFU)", f"{b_rate:.2f} images/s (MFU {mfu_of(b_rate)})")
        )
    if args.cudnn_benchmark == "both":
        torch.backends.cudnn.benchmark = True
        for b in sizes:
            torch.cuda.empty_cache() if device.type == "cuda" else None
            b_rate, _ = in_memory(args.size, b, args.steps, device)
            rows.append((f"in-memory, batch {b}, cudnn.benchmark on (MFU)",
                         f"{b_rate:.2f} images/s (MFU {mfu_of(b_rate)})"))  # fmt: skip
    if args.profile is not None:
        args.profile.write_text(profile_steps(args.size, sizes[-1], device))
    emit(caption, rows, args.out)


if __name__ == "__main__":
    main()
