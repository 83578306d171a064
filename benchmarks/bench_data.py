"""Data pipeline throughput: ingest (frames/s per CPU core) and what the CPU pays per training
image.

    python -m benchmarks.bench_data [--frames 32] [--frame-size 3384x1710] [--size 1024x384]
                                    [--cpus N] [--out FILE]

On synthetic drive frames: the ingest job on a local Ray of ``--cpus`` CPUs; then, on one
thread in this process, the CPU time per training image of the data path when the step runs on
a GPU (decode JPEG + PNG, stack, the copy into pinned memory: what sets the CPUs a GPU needs)
and, for reference, the augmentation a CPU worker runs inside its step. The training job's
images/s, the streaming read in place, is bench_train's and bench_vs_plain's. The last line,
for scripts: ``cpu ms per training image: X``.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from benchmarks.common import emit
from pipelines.core.codecs import decode_png_mask, decode_rgb
from pipelines.core.frames import FrameTransform, parse_size
from pipelines.data.decode import decode_batch
from pipelines.data.shards import shard_files
from pipelines.data.synthetic import write_tree
from pipelines.data.workflow import IngestConfig, ingest
from pipelines.training.augment import Augment, augment_batch, step_generator
from pipelines.training.batches import NormalizeCollate


def run(args: argparse.Namespace) -> tuple[str, list[tuple[str, str]]]:
    """Runs the benchmark: the table's caption and its (measure, value) rows."""
    import ray

    ray.init(num_cpus=args.cpus, logging_level="ERROR", include_dashboard=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    (fw, fh), (w, h) = args.frame_size, args.size
    # The real recipe's crop: 690 of 1710 rows are sky.
    transform = FrameTransform(width=w, height=h, crop_top=round(fh * 690 / 1710))
    with tempfile.TemporaryDirectory() as tmp:
        raw, shards = Path(tmp) / "raw", str(Path(tmp) / "shards")
        write_tree(raw, args.frames, records=4, width=fw, height=fh, seed=0)
        t0 = time.perf_counter()
        result = ingest(IngestConfig.of_transform(str(raw), shards, transform, val_fraction=0.25,
                                                  progress_seconds=None))  # fmt: skip
        ingest_s = time.perf_counter() - t0

        ray.shutdown()
        cost = cpu_cost_per_image(shard_files(shards, "train"), transform)

    ingest_rate = result.valid / ingest_s
    caption = (
        f"{args.frames} synthetic frames {fw}x{fh} -> {w}x{h} (crop_top {transform.crop_top}); "
        f"local Ray with {args.cpus} CPUs on {platform.machine()} ({os.cpu_count()} cores); "
        f"CPU cost over the {result.manifest['counts']['train']} training frames."
    )
    rows = [
        ("ingest, whole job",
         f"{ingest_rate:.2f} frames/s ({ingest_s:.1f} s for {result.valid} frames)"),
        ("ingest per CPU core", f"{ingest_rate / args.cpus:.2f} frames/s/core"),
    ]  # fmt: skip
    rows += [(f"CPU ms per training image, one thread: {k}", f"{v:.2f}") for k, v in cost.items()]
    return caption, rows


def cpu_cost_per_image(files: list[str], transform: FrameTransform, repeats: int = 3) -> dict:
    """Milliseconds of one CPU thread's time per ingested training image (the best of
    ``repeats`` passes over the split's rows): the stages the data path runs, their sum, then
    the augmentation as a CPU worker's step runs it, for reference."""
    table = pq.read_table(files, columns=["image", "label"])
    batch = {k: np.array(table[k].to_pylist(), dtype=object) for k in ("image", "label")}
    n, cuda = len(batch["image"]), torch.cuda.is_available()
    collate = NormalizeCollate(transform, "cuda" if cuda else "cpu", normalize=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def best(fn: Callable[[], object]) -> float:
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
        stack = max(best(lambda: decode_batch(batch)) - jpeg - png, 0.0)  # np.stack of them
        if cuda:
            copy = best(lambda: collate(decoded))  # pinned copy; the transfer is the GPU's DMA
        else:
            copy = best(lambda: [decoded[k].copy() for k in ("image", "label")])
        gen = step_generator(torch.device("cpu"), 0)
        raw = {k: torch.from_numpy(decoded[k]) for k in ("image", "label")}
        aug = best(lambda: augment_batch(raw, Augment(), transform, gen))
    finally:
        torch.set_num_threads(threads)
    return {
        "decode JPEG": jpeg,
        "decode PNG label": png,
        "stack into a batch": stack,
        "pinned copy" if cuda else "copy (stands in for the pinned copy)": copy,
        "data path total (GPU step)": jpeg + png + stack + copy,
        "(reference: augmentation if run on this CPU, as a CPU worker does)": aug,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--frame-size", type=parse_size, default=(3384, 1710))
    p.add_argument("--size", type=parse_size, default=(1024, 384), help="model input WxH")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", type=Path, help="also write the table to this file")
    args = p.parse_args(argv)
    caption, rows = run(args)
    emit(caption, rows, args.out)
    total = dict(rows)["CPU ms per training image, one thread: data path total (GPU step)"]
    print(f"cpu ms per training image: {total}")


if __name__ == "__main__":
    main()
