"""Reading shards with Ray Data: the time of one execution (what every epoch's pass, every
evaluation and every labeling chunk from shards pays) with Ray 2.60's default V2 Parquet
datasource against the V1 one that ``pipelines.dataset.read_parquet_files`` uses.

    python -m benchmarks.bench_read_parquet [--frames 6,600] [--repeats 5] [--out FILE]

For each size in ``--frames``: a shard of that many synthetic 128x64 frames (PNG image and
label, the ingest's schema) in a temporary folder; then, in one Ray session (``num_cpus=4``),
each datasource read to the end ``--repeats`` times after one warm-up, in alternating pairs;
medians and the median of the pairs' ratios.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.common import emit


def write_shard(folder: Path, frames: int) -> str:
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    images, labels = [], []
    for _ in range(frames):
        for arr, out in ((rng.integers(0, 256, (64, 128, 3), np.uint8), images),
                         (rng.integers(0, 8, (64, 128), np.uint8), labels)):  # fmt: skip
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="PNG")
            out.append(buf.getvalue())
    table_ = pa.table({"image_id": [f"f{i}" for i in range(frames)], "image": images,
                       "label": labels})  # fmt: skip
    path = folder / f"shard-{frames}.parquet"
    pq.write_table(table_, path)
    return str(path)


def read_once(files: list[str], v2: bool) -> float:
    import pyarrow.fs as pafs
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.use_datasource_v2 = v2
    start = time.perf_counter()
    ds = ray.data.read_parquet(files, filesystem=pafs.LocalFileSystem(), override_num_blocks=1)
    rows = sum(len(b["image_id"]) for b in ds.iter_batches(batch_size=64, batch_format="numpy"))
    took = time.perf_counter() - start
    assert rows == pq.read_metadata(files[0]).num_rows
    return took


def main(argv: list[str] | None = None) -> int:
    import ray

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", default="6,600")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="--frames 6 --repeats 3")
    p.add_argument("--out")
    args = p.parse_args(argv)
    sizes = [6] if args.quick else [int(n) for n in args.frames.split(",")]
    repeats = 3 if args.quick else args.repeats

    ray.init(num_cpus=4, logging_level="ERROR", include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for frames in sizes:
            files = [write_shard(Path(tmp), frames)]
            read_once(files, True), read_once(files, False)  # warm-up: workers, imports
            v2, v1 = [], []
            for _ in range(repeats):
                v2.append(read_once(files, True))
                v1.append(read_once(files, False))
            ratio = statistics.median(a / b for a, b in zip(v2, v1, strict=True))
            rows.append([f"{frames} frames", f"{statistics.median(v2):.2f}",
                         f"{statistics.median(v1):.2f}", f"{ratio:.1f}x"])  # fmt: skip
    ray.shutdown()
    emit(
        f"One Ray Data execution over one local shard, median of {repeats} (seconds)",
        rows,
        Path(args.out) if args.out else None,
        header=["shard", "V2 (Ray default)", "V1 (read_parquet_files)", "V2 / V1"],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
