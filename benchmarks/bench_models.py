"""Parameter count and forward latency of every segmentation model, as a markdown table.

    python -m benchmarks.bench_models [--height 384 --width 1024 --repeats 10 --device cpu|cuda]
                                      [--out FILE]

Eval mode, ``torch.no_grad()``, batch 1, random weights (latency does not depend on them);
the median of ``--repeats`` timed forwards after one warm-up. On CUDA a second column times
bf16 autocast + channels_last, the inference configuration of ``pipelines.predictor``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import add_device_arg, device_name, emit, parse_device, synchronize
from fcn_models import MODEL_NAMES, build_model

N_CLASS = 8  # the lane label map's training classes (pipelines/core/labels.py)


def median_latency_ms(
    model: nn.Module, x: torch.Tensor, repeats: int, *, bf16: bool = False
) -> float:
    device = x.device
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    times = []
    with torch.no_grad(), amp:
        model(x)  # warm-up: allocator, cuDNN/oneDNN algorithm selection
        synchronize(device)
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            synchronize(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def run(
    height: int, width: int, repeats: int, device: torch.device
) -> tuple[str, list[str], list[list[str]]]:
    """Runs the benchmark: the table's caption, header and rows."""
    cuda = device.type == "cuda"
    header = ["model", "params (M)", "fp32 ms"] + (["bf16 + channels_last ms"] if cuda else [])
    rows = []
    for name in MODEL_NAMES:
        model = build_model(name, N_CLASS).to(device).eval()
        params = sum(p.numel() for p in model.parameters())
        x = torch.randn(1, 3, height, width, device=device)
        row = [name, f"{params / 1e6:.1f}", f"{median_latency_ms(model, x, repeats):.1f}"]
        if cuda:
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
            row.append(f"{median_latency_ms(model, x, repeats, bf16=True):.1f}")
        rows.append(row)
        print(f"  {name}: done", flush=True)
        del model, x
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    threads = "" if cuda else f", {torch.get_num_threads()} threads"
    caption = (
        f"Input 1x3x{height}x{width}, n_class={N_CLASS}, eval + no_grad, median of {repeats} "
        f"after 1 warm-up; {device.type} ({device_name(device)}{threads}), torch {torch.__version__}"
    )
    return caption, header, rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--height", type=int, default=384)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=10)
    add_device_arg(parser)
    parser.add_argument("--out", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    device = parse_device(parser, args)
    caption, header, rows = run(args.height, args.width, args.repeats, device)
    emit(caption, rows, args.out, header=header)


if __name__ == "__main__":
    main()
