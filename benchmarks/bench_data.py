"""Data pipeline throughput: ingest (frames/s per CPU core) and streaming reads (images/s).

    python -m benchmarks.bench_data [--frames 32] [--frame-size 3384x1710] [--size 1024x384]
                                    [--cpus N] [--out FILE]

One run, one local Ray with ``--cpus`` CPUs:

1. synthetic Apollo-layout drive frames at ``--frame-size`` (the real 3384x1710 by default);
2. ingest: discover, decode JPEG/PNG, crop, resize, map ids, encode, write Parquet shards;
   frames/s over the whole job and per CPU core given to Ray;
3. streaming read of the training split, decoded in Ray Data tasks, delivered as torch
   batches (what a training worker consumes): images/s without and with augmentation (which
   runs on the training device, here the CPU), and the raw Parquet scan rate for reference.
   Each read is repeated over ``--epochs`` passes after a warm-up pass;
4. the CPU cost per training image on one thread, in this process: what the data path's CPUs
   do for one ingested frame when the step runs on a GPU (decode JPEG + PNG, and the copy into
   pinned memory the collate makes: a plain copy of the same bytes where there is no CUDA),
   and for reference what the augmentation costs when it runs on a CPU (a CPU worker's step).

The last line, for scripts: ``cpu ms per training image: X`` (item 4, without the reference).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from benchmarks.common import emit
from pipelines.core.codecs import decode_png_mask, decode_rgb
from pipelines.core.frames import FrameTransform, parse_size
from pipelines.data.decode import decode_batch
from pipelines.data.ingest import IngestConfig, ingest
from pipelines.data.shards import build_dataset, read_shards, shard_files
from pipelines.data.synthetic import write_tree
from pipelines.training.augment import Augment, augment_batch, step_generator
from pipelines.training.batches import NormalizeCollate, torch_batches


def read_rate(batches, epochs: int) -> tuple[float, float]:
    """(images/s from each pass's first batch to its last, mean seconds to the first batch).

    A pass over a small split is dominated by starting the dataset (~1 s), which a real epoch
    of thousands of frames pays once; the steady rate is what a training worker sees.
    """
    n, steady, first = 0, 0.0, 0.0
    for _ in range(epochs):
        t0 = time.perf_counter()
        t_first = None
        for b in batches():
            if t_first is None:
                t_first = time.perf_counter()
            else:
                n += len(b["image"])
        if t_first is None or n == 0:
            raise SystemExit(
                "bench_data: the training split fills at most one batch of 8, so there is no "
                "first-to-last interval to time: raise --frames (16 or more)"
            )
        steady += time.perf_counter() - t_first
        first += t_first - t0
    return n / steady, first / epochs


def run(
    frames: int, frame_size: tuple[int, int], size: tuple[int, int], cpus: int, epochs: int
) -> tuple[str, list[tuple[str, str]]]:
    """Runs the benchmark: the table's caption and its (measure, value) rows."""
    import ray

    ray.init(num_cpus=cpus, logging_level="ERROR", include_dashboard=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    fw, fh = frame_size
    # The real recipe's crop: 690 of 1710 rows are sky.
    transform = FrameTransform(width=size[0], height=size[1], crop_top=round(fh * 690 / 1710))
    with tempfile.TemporaryDirectory() as tmp:
        raw, shards = Path(tmp) / "raw", Path(tmp) / "shards"
        t0 = time.perf_counter()
        write_tree(raw, frames, records=4, width=fw, height=fh, seed=0)
        synth_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        result = ingest(
            IngestConfig.of_transform(
                str(raw), str(shards), transform, val_fraction=0.25, progress_seconds=None
            )
        )
        ingest_s = time.perf_counter() - t0
        valid = result.valid
        train_n = result.manifest["counts"]["train"]

        def scan():
            return read_shards(str(shards), "train").iter_batches(batch_size=8)

        def plain():
            return torch_batches(build_dataset(str(shards), "train"), 8, transform)

        def augmented():
            # As the training loop does: raw batches, augmented and normalized on its device.
            gen = step_generator(torch.device("cpu"), 0)
            raw = torch_batches(build_dataset(str(shards), "train"), 8, transform, normalize=False)
            return (augment_batch(b, Augment(), transform, gen) for b in raw)

        rates = {}
        for name, fn in (("Parquet scan (bytes only)", scan), ("decoded torch batches", plain),
                         ("decoded + augmented torch batches", augmented)):  # fmt: skip
            read_rate(fn, 1)  # warm-up: worker start, file listing
            rates[name] = read_rate(fn, epochs)
        ray.shutdown()
        cost = cpu_cost_per_image(shard_files(str(shards), "train"), transform)

    ingest_rate = valid / ingest_s
    caption = (
        f"{frames} synthetic frames {fw}x{fh} -> {size[0]}x{size[1]} (crop_top "
        f"{transform.crop_top}); local Ray with {cpus} CPUs on {platform.machine()} "
        f"({os.cpu_count()} cores); streaming: {train_n} train frames, batch 8, "
        f"{epochs} passes after 1 warm-up, rate from each pass's first batch to its last."
    )
    rows = [
        ("ingest, whole job", f"{ingest_rate:.2f} frames/s ({ingest_s:.1f} s for {valid} frames)"),
        ("ingest per CPU core", f"{ingest_rate / cpus:.2f} frames/s/core"),
    ]
    rows += [
        (f"streaming read: {k}", f"{rate:.1f} images/s (first batch after {first:.2f} s)")
        for k, (rate, first) in rates.items()
    ]
    aug, plain_rate = (
        rates["decoded + augmented torch batches"][0],
        rates["decoded torch batches"][0],
    )
    rows.append(("ratio augmented / plain decode", f"{aug / plain_rate:.2f}"))
    rows.append(
        ("(synthetic frame generation, not part of ingest)", f"{frames / synth_s:.2f} frames/s")
    )
    rows += [(f"CPU ms per training image, one thread: {k}", f"{v:.2f}") for k, v in cost.items()]
    return caption, rows


def cpu_cost_per_image(files: list[str], transform: FrameTransform, repeats: int = 3) -> dict:
    """Milliseconds of one CPU thread's time per ingested training image (the best of
    ``repeats`` passes over the split's rows, in this process): the stages the data path runs, then the
    sum, then the augmentation as a CPU worker's step runs it, for reference."""
    table = pq.read_table(files, columns=["image", "label"])
    batch = {k: np.array(table[k].to_pylist(), dtype=object) for k in ("image", "label")}
    n = len(batch["image"])
    cuda = torch.cuda.is_available()
    collate = NormalizeCollate(transform, "cuda" if cuda else "cpu", normalize=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def best(fn) -> float:
        # This thread's CPU time, not the wall clock: what the stage costs the CPU, whatever
        # else the machine runs meanwhile (every stage here runs on the calling thread).
        times = []
        for _ in range(repeats):
            t0 = time.thread_time()
            fn()
            times.append(time.thread_time() - t0)
        return min(times) * 1000 / n

    try:
        jpeg = best(lambda: [decode_rgb(b) for b in batch["image"]])
        png = best(lambda: [decode_png_mask(b) for b in batch["label"]])
        decoded = decode_batch(batch)
        stack = best(lambda: decode_batch(batch)) - jpeg - png  # np.stack of the decoded frames
        if cuda:
            copy = best(lambda: collate(decoded))  # pinned copy; the transfer is the GPU's DMA
        else:
            copy = best(lambda: [decoded[k].copy() for k in ("image", "label")])
        gen = step_generator(torch.device("cpu"), 0)
        image, label = torch.from_numpy(decoded["image"]), torch.from_numpy(decoded["label"])
        aug = best(
            lambda: augment_batch({"image": image, "label": label}, Augment(), transform, gen)
        )
    finally:
        torch.set_num_threads(threads)
    total = jpeg + png + max(stack, 0.0) + copy
    return {
        "decode JPEG": jpeg,
        "decode PNG label": png,
        "stack into a batch": max(stack, 0.0),
        "pinned copy" if cuda else "copy (stands in for the pinned copy)": copy,
        "data path total (GPU step)": total,
        "(reference: augmentation if run on this CPU, as a CPU worker does)": aug,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--frame-size", type=parse_size, default=(3384, 1710))
    p.add_argument("--size", type=parse_size, default=(1024, 384), help="model input WxH")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    p.add_argument("--epochs", type=int, default=3, help="timed passes over the training split")
    p.add_argument("--out", type=Path, help="also write the table to this file")
    args = p.parse_args(argv)
    caption, rows = run(args.frames, args.frame_size, args.size, args.cpus, args.epochs)
    emit(caption, rows, args.out)
    total = dict(rows)["CPU ms per training image, one thread: data path total (GPU step)"]
    print(f"cpu ms per training image: {total}")


if __name__ == "__main__":
    main()
