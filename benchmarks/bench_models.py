"""Parameter count and forward latency of every segmentation model, as a markdown table.

    python -m benchmarks.bench_models [--height 384 --width 1024 --repeats 10 --device cpu|cuda]
                                      [--out FILE]

Eval mode, ``torch.no_grad()``, batch 1, random weights (latency does not depend on them);
the median of ``--repeats`` timed forwards after one warm-up. On CUDA a second column times
bf16 autocast + channels_last, the inference configuration of ``pipelines.predictor``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from benchmarks.common import add_device_arg, device_name, emit, parse_device, synchronize
from fcn_models import MODEL_NAMES, build_model
from pipelines.core.labels import N_CLASSES


def median_latency_ms(model: nn.Module, x: torch.Tensor, repeats: int, bf16: bool) -> float:
    times = []
    with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        model(x)  # warm-up: allocator, cuDNN/oneDNN algorithm selection
        synchronize(x.device)
        for _ in range(repeats):
            start = time.perf_counter()
            model(x)
            synchronize(x.device)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def model_row(name: str, height: int, width: int, repeats: int, device: torch.device) -> list:
    """[name, params (M), fp32 ms, and on CUDA bf16 + channels_last ms]."""
    model = build_model(name, N_CLASSES).to(device).eval()
    x = torch.randn(1, 3, height, width, device=device)
    params = sum(p.numel() for p in model.parameters())
    row = [name, f"{params / 1e6:.1f}", f"{median_latency_ms(model, x, repeats, False):.1f}"]
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
        row.append(f"{median_latency_ms(model, x, repeats, True):.1f}")
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--height", type=int, default=384)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=10)
    add_device_arg(p)
    p.add_argument("--out", type=Path, help="also write the table to this file")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    device = parse_device(p, args)
    cuda = device.type == "cuda"
    rows = []
    for name in MODEL_NAMES:
        rows.append(model_row(name, args.height, args.width, args.repeats, device))
        print(f"  {name}: done", flush=True)
        gc.collect()  # one model's weights at a time (the VGG FCNs: 134 M parameters each)
        if cuda:
            torch.cuda.empty_cache()
    threads = "" if cuda else f", {torch.get_num_threads()} threads"
    caption = (
        f"Input 1x3x{args.height}x{args.width}, n_class={N_CLASSES}, eval + no_grad, median of "
        f"{args.repeats} after 1 warm-up; {device.type} ({device_name(device)}{threads}), "
        f"torch {torch.__version__}"
    )
    header = ["model", "params (M)", "fp32 ms"] + (["bf16 + channels_last ms"] if cuda else [])
    emit(caption, rows, args.out, header=header)


if __name__ == "__main__":
    main()
