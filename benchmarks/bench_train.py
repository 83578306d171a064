"""Training throughput of FCN-8s ResNet-101: the engine's step and its MFU, and the full pipeline.

    python -m benchmarks.bench_train [--device cpu|cuda] [--size 1024x384] [--batch-size 8]
        [--frames 64] [--epochs 2] [--steps 20] [--peak-tflops X] [--compile] [--augment]
        [--in-memory-only] [--out FILE]

*In-memory*: ``engine.train_step`` with the job's recipe on tensors already on the device (the
step's ceiling); its FLOPs (``torch.utils.flop_counter`` on a step of one image) and MFU against
``--peak-tflops`` (989 for H100/H200 bf16 dense). *Full pipeline*: ``jobs.train``, one worker, on freshly
ingested synthetic shards: its own ``train_images_per_s`` of the last epoch.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import common
from pipelines.core.frames import FrameTransform, parse_size
from pipelines.core.labels import N_CLASSES
from pipelines.training.augment import Augment, augment_batch, step_generator
from pipelines.training.engine import build_model, build_train_state, train_step
from pipelines.training.recipe import make_recipe

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
MODEL = "fcn8s_resnet101"


def step_setup(size: tuple[int, int], batch: int, device: torch.device, steps: int, *,
               compile_: bool = False, augment: bool = False) -> Callable[[], None]:  # fmt: skip
    """An engine step to time, its state built for ``steps`` steps: on normalized random
    tensors, or (``augment``) uint8 frames augmented on the device first, as the loop does."""
    w, h = size
    state = build_train_state(
        build_model(MODEL, N_CLASSES, seed=0), make_recipe("default", MODEL),
        total_steps=steps, device=device, amp=device.type == "cuda",
        wrap=torch.compile if compile_ else None,
    )  # fmt: skip
    y = torch.randint(0, N_CLASSES, (batch, h, w), device=device)
    fixed = {"image": torch.randn(batch, 3, h, w, device=device), "label": y}
    raw = {
        "image": torch.randint(0, 256, (batch, h, w, 3), dtype=torch.uint8, device=device),
        "label": y.to(torch.uint8),
    }
    transform, gen = FrameTransform(width=w, height=h), step_generator(device, 0)

    def step() -> None:
        train_step(state, augment_batch(raw, Augment(), transform, gen) if augment else fixed)

    return step


def in_memory(size: tuple[int, int], batch: int, steps: int, device: torch.device,
              **options: bool) -> float:  # fmt: skip
    """Images/s of ``steps`` engine steps after 3 untimed ones."""
    step = step_setup(size, batch, device, steps + 3, **options)
    images_per_s = common.rate(step, batch, steps, device, warmup=3)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return images_per_s


def full_pipeline(size: tuple[int, int], batch: int, frames: int, epochs: int, cuda: bool) -> float:
    """The training job's own images/s (last epoch) on freshly ingested synthetic shards."""
    from pipelines.data.synthetic import write_tree

    with tempfile.TemporaryDirectory() as tmp:
        raw, shards = Path(tmp) / "raw", Path(tmp) / "shards"
        # Half the real frame: the pipeline still crops (345 of 855 rows are sky) and resizes.
        write_tree(raw, frames, records=4, width=1692, height=855, seed=0)
        uri, env = common.job_env(Path(tmp))
        common.run_command(common.ingest_command(raw, shards, size, 345), env)
        common.run_command([
            sys.executable, "-m", "jobs.train", "--data", str(shards), "--storage",
            str(Path(tmp) / "ckpt"), "--experiment", "bench", "--register-as", "bench",
            "--run-name", "bench", "--num-workers", "1", "--batch-size", str(batch),
            "--epochs", str(epochs),
            # On CPU the worker gets as many threads as the in-memory run (Ray gives a worker
            # one thread per reserved CPU), so the ratio measures the pipeline, not threads.
            "--cpus-per-worker", "4" if cuda else str(torch.get_num_threads()),
        ] + (["--use-gpu"] if cuda else []), env)  # fmt: skip
        return common.metric_history(uri, "bench", "train_images_per_s")[-1]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_device_arg(p)
    p.add_argument("--size", type=parse_size, default=(1024, 384), help="model input WxH")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--frames", type=int, default=64, help="synthetic frames for the pipeline run")
    p.add_argument("--epochs", type=int, default=2, help="pipeline epochs (the last is reported)")
    p.add_argument("--steps", type=int, default=20, help="timed in-memory steps")
    p.add_argument("--peak-tflops", type=float, help="device peak for MFU (bf16 dense)")
    p.add_argument("--compile", action="store_true", help="also through torch.compile")
    p.add_argument("--in-memory-only", action="store_true", help="no jobs.train (no Ray here)")
    p.add_argument("--augment", action="store_true", help="also from uint8 frames, augmented")
    p.add_argument("--out", type=Path)
    return p


def extra_rows(args, device: torch.device, mem_rate: float, mfu_of) -> list[tuple[str, str]]:
    """The optional rows: augmentation in the step, torch.compile."""
    rows, b, kind = [], args.batch_size, device.type
    if args.augment:
        a_rate = in_memory(args.size, b, args.steps, device, augment=True)
        rows.append((f"in-memory + the step's augmentation on the {kind}, batch {b}",
                     f"{a_rate:.2f} images/s ({a_rate / mem_rate:.2f} of without)"))  # fmt: skip
    if args.compile:
        label = f"in-memory, torch.compile, batch {b} (MFU)"
        try:
            c_rate = in_memory(args.size, b, args.steps, device, compile_=True)
            rows.append((label, f"{c_rate:.2f} images/s ({c_rate / mem_rate:.2f}x, "
                                f"MFU {mfu_of(c_rate)})"))  # fmt: skip
        except Exception as e:  # an inductor bug must not lose the other rows
            rows.append((label, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}"))
    return rows


def main(argv: list[str] | None = None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    device = common.parse_device(p, args)
    name, cuda, (w, h) = common.device_name(device), device.type == "cuda", args.size
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    torch.set_flush_denormal(True)  # as the training loop does (10x on CPU)
    with FlopCounterMode(display=False) as counter:  # one engine step of one image
        step_setup(args.size, 1, device, 1)()
    flops = float(counter.get_total_flops())
    mem_rate = in_memory(args.size, args.batch_size, args.steps, device)
    pipe_rate = None
    if not args.in_memory_only:
        pipe_rate = full_pipeline(args.size, args.batch_size, args.frames, args.epochs, cuda)

    def mfu_of(rate: float) -> str:
        return f"{flops * rate / 1e12 / peak:.1%}" if peak else "n/a"

    achieved = flops * mem_rate / 1e12
    rows = [("in-memory tensors (model only)", f"{mem_rate:.2f} images/s")]
    if pipe_rate is not None:
        rows += [
            (f"full pipeline (jobs.train, 1 worker, last of {args.epochs} epochs)", f"{pipe_rate:.2f} images/s"),
            ("ratio pipeline / in-memory", f"{pipe_rate / mem_rate:.2f}"),
        ]  # fmt: skip
    rows += [
        ("FLOPs per image (forward + backward)", f"{flops / 1e9:.1f} GFLOP"),
        ("achieved (in-memory)", f"{achieved:.3f} TFLOP/s"),
        ("MFU (in-memory)", f"{mfu_of(mem_rate)} of {peak:g} TFLOP/s" if peak else "n/a (no peak given)"),
    ]  # fmt: skip
    rows += extra_rows(args, device, mem_rate, mfu_of)
    caption = (
        f"FCN-8s ResNet-101, {w}x{h}, batch {args.batch_size}, "
        f"{'bf16 autocast + channels_last' if cuda else 'fp32'}; {device.type} "
        f"({name}{'' if cuda else f', {torch.get_num_threads()} threads'}), "
        f"torch {torch.__version__}"
    )
    common.emit(caption, rows, args.out)


if __name__ == "__main__":
    main()
