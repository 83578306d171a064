"""Labeling bookkeeping: what a scheduled run with nothing new spends finding what is already
labeled, the old serial per-file read against the filtered dataset scan.

    python -m benchmarks.bench_already_labeled [--rows 10000,100000] [--rows-per-file 1000]
        [--dates 4] [--repeats 5] [--no-s3] [--s3-latency-ms 20] [--quick] [--out FILE]

In one run, for each size in ``--rows``:

1. an output folder as the labeling job leaves it: ``labeled_date=YYYY-MM-DD/*.parquet`` in
   the job's schema, ``--rows-per-file`` rows a file (the job's default), the files spread
   over ``--dates`` dates, every row labeled by the version asked for (a run with nothing new),
   plus the clutter the scan must skip (a ``_staging/`` run that was never completed, a
   ``_lease.json``). Each ``mask`` is a real PNG of a lane-like 846x428 mask (~6 KB, one of 64
   drawn masks made unique per row by a ``tEXt`` chunk, so Parquet cannot dictionary-encode
   them away), so the files have a realistic size (~6 MB for 1000 rows);
2. the same folder copied to a moto S3 server that this benchmark starts on 127.0.0.1 and
   stops at the end (``--no-s3``: local only), read directly and through a proxy that adds
   ``--s3-latency-ms`` to each request, as a remote S3's time to first byte would;
3. ``already_labeled`` timed both ways on the same data in the same process, in pairs:
   ``old_already_labeled`` (the code before: list, then read three columns of each file
   serially and compare in Python) and ``pipelines.labeling.already_labeled`` (one filtered,
   column-pruned, multi-threaded ``pyarrow.dataset`` scan), back to back; medians of
   ``--repeats`` pairs after one warm-up each, and the median of the pairs' ratios. Both
   must return the same set, of ``--rows`` sources.

Local files are read from the page cache after the warm-up, as on a machine that ran the job.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import secrets
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from dataclasses import replace
from datetime import date, datetime, timedelta, timezone
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from benchmarks.common import emit
from pipelines.labeling.output import already_labeled
from pipelines.labeling.schema import OUTPUT_SCHEMA
from pipelines.storage import Location, resolve

MODEL, VERSION = "lanes", "7"
FIRST_DATE = date(2026, 11, 1)


# -- the code before, kept here to compare against ---------------------------------------------
def old_committed_files(output: Location) -> list[str]:
    return [
        i.path
        for i in output.list_files((".parquet",))
        if not output.relative(i.path).startswith("_staging" + "/")
    ]


def old_already_labeled(output: Location, model_name: str, model_version: str) -> set[str]:
    """Sources with a row (ok or error) for this model version in the committed output."""
    done: set[str] = set()
    for path in old_committed_files(output):
        with output.fs.open_input_file(path) as f:
            t = pq.read_table(f, columns=["source", "model_name", "model_version"])
        for s, n, v in zip(
            *(t[c].to_pylist() for c in ("source", "model_name", "model_version")), strict=True
        ):
            if n == model_name and v == model_version:
                done.add(s)
    return done


# -- a realistic output folder -----------------------------------------------------------------
def mask_pool(n: int = 64, size: tuple[int, int] = (846, 428), seed: int = 0) -> list[bytes]:
    """PNGs of lane-like masks (a few lines of training ids on background), as the job
    encodes them."""
    from PIL import Image, ImageDraw

    from pipelines.core.codecs import encode_png

    rng = np.random.default_rng(seed)
    w, h = size
    pool = []
    for _ in range(n):
        im = Image.new("L", size, 0)
        draw = ImageDraw.Draw(im)
        for _ in range(int(rng.integers(3, 7))):
            x0, x1 = int(rng.integers(0, w)), int(rng.integers(0, w))
            draw.line(
                [(x0, h), (x1, int(h * 0.45))],
                fill=int(rng.integers(1, 8)),
                width=int(rng.integers(4, 14)),
            )
        pool.append(encode_png(np.asarray(im)))
    return pool


def with_text(png: bytes, text: str) -> bytes:
    """``png`` with a ``tEXt`` chunk before ``IEND``: still a valid PNG, unique per ``text``."""
    data = b"Comment\0" + text.encode()
    chunk = struct.pack(">I", len(data)) + b"tEXt" + data
    chunk += struct.pack(">I", zlib.crc32(chunk[4:]) & 0xFFFFFFFF)
    return png[:-12] + chunk + png[-12:]  # IEND is the last 12 bytes


def output_table(first: int, n: int, pool: list[bytes], labeled_at: datetime) -> pa.Table:
    ids = [
        f"road02/ColorImage/Record{i // 500:03d}/Camera 5/{i:09d}_Camera_5"
        for i in range(first, first + n)
    ]
    rng = np.random.default_rng(first)
    pixels = rng.integers(0, 1_000_000, size=(n, 8)).tolist()
    cols = {
        "image_id": ids,
        "source": [f"s3://drive/{i}.jpg" for i in ids],
        "height": [1710] * n,
        "width": [3384] * n,
        "mask": [with_text(pool[k % len(pool)], i) for k, i in enumerate(ids)],
        "apollo_mask": [None] * n,
        "class_pixels": pixels,
        "confidence": [0.9] * n,
        "pixel_confidence": [0.95] * n,
        "uncertain_fraction": [0.01] * n,
        "novelty": [0.05] * n,
        "model_name": [MODEL] * n,
        "model_version": [VERSION] * n,
        "status": ["ok"] * n,
        "error": [None] * n,
        "labeled_at": [labeled_at] * n,
    }
    return pa.table(cols, schema=OUTPUT_SCHEMA)


def write_output(root: Path, rows: int, rows_per_file: int, dates: int) -> tuple[int, int]:
    """The output folder (see the module doc); (committed files, bytes in them)."""
    pool = mask_pool()
    n_files = -(-rows // rows_per_file)
    total = 0
    for k in range(n_files):
        day = FIRST_DATE + timedelta(days=k * dates // n_files)
        part = root / f"labeled_date={day:%Y-%m-%d}"
        part.mkdir(parents=True, exist_ok=True)
        first = k * rows_per_file
        table = output_table(
            first,
            min(rows_per_file, rows - first),
            pool,
            datetime(day.year, day.month, day.day, 3, tzinfo=timezone.utc),
        )
        path = part / f"{uuid.uuid4().hex}_{k:06d}_000000.parquet"
        pq.write_table(table, path)
        total += path.stat().st_size
    # What the scan must skip: a staging run that never completed (rows of another version
    # that would show up if it were read) and a lease object.
    staging = root / "_staging" / "20261126T030000-deadbeef" / f"labeled_date={FIRST_DATE}"
    staging.mkdir(parents=True)
    pq.write_table(
        output_table(rows, 10, pool[:1], datetime.now(timezone.utc)), staging / "part-0.parquet"
    )
    (root / "_lease.json").write_text('{"holder": "bench", "until": "2026-11-26T04:00:00Z"}')
    return n_files, total


# -- a local S3 server -------------------------------------------------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto() -> tuple[subprocess.Popen, str]:
    """moto in server mode on 127.0.0.1 with fake credentials and a ``bench`` bucket."""
    import socket

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"moto server exited with status {proc.returncode}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.time() > deadline:
                raise TimeoutError("moto server did not start in 60 s")
            time.sleep(0.2)
        os.environ.update(
            {
                "AWS_ACCESS_KEY_ID": "bench-key-id",
                "AWS_SECRET_ACCESS_KEY": "bench-secret-key",
                "AWS_REGION": "us-east-1",
                "AWS_ENDPOINT_URL_S3": endpoint,
            }
        )
        import boto3

        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
    except BaseException:
        stop(proc)  # never leave a server behind
        raise
    return proc, endpoint


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class LatencyProxy:
    """A TCP proxy on 127.0.0.1 that holds what a client sends for ``delay_ms`` before passing
    it on to ``port``, so every S3 request pays a wait like a remote S3's time to first byte
    (moto on the same machine answers with no network in between). Replies pass at once."""

    def __init__(self, port: int, delay_ms: float) -> None:
        self.port, self.delay = port, delay_ms / 1000
        self.loop = asyncio.new_event_loop()
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", 0)
        )
        self.endpoint = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    async def _pipe(self, reader, writer, delay: float) -> None:
        try:
            while data := await reader.read(1 << 16):
                if delay:
                    await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _handle(self, client_reader, client_writer) -> None:
        server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.port)
        await asyncio.gather(
            self._pipe(client_reader, server_writer, self.delay),
            self._pipe(server_reader, client_writer, 0),
        )

    async def _shutdown(self) -> None:
        self.server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.loop.stop()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(lambda: self.loop.create_task(self._shutdown()))
        self.thread.join(timeout=15)
        self.loop.close()


# -- timing ------------------------------------------------------------------------------------
def compare(output: Location, rows: int, repeats: int) -> tuple[float, float, float]:
    """(old seconds, new seconds, median of the per-pair ratios old/new): one warm-up each,
    then ``repeats`` pairs, old and new back to back, so that both see the same load on the
    machine. Both results are checked against each other and against ``rows``."""
    old_fn = partial(old_already_labeled, output, MODEL, VERSION)
    new_fn = partial(already_labeled, output, MODEL, VERSION)
    old, new = old_fn(), new_fn()  # warm-up: file system handles, page cache, imports
    if len(new) != rows or new != old:
        raise RuntimeError(f"{output.uri}: old found {len(old)}, new {len(new)}, expected {rows}")
    t_old, t_new = [], []
    for _ in range(repeats):
        for fn, times in ((old_fn, t_old), (new_fn, t_new)):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    ratio = statistics.median(o / n for o, n in zip(t_old, t_new, strict=True))
    return statistics.median(t_old), statistics.median(t_new), ratio


def run(
    sizes: list[int], rows_per_file: int, dates: int, repeats: int, s3: bool, latency_ms: float
):
    load = os.getloadavg()[0]
    rows_out = []
    saved = {
        k: os.environ.get(k)
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_ENDPOINT_URL_S3")
    }
    proc = proxy = None
    try:
        if s3:
            proc, endpoint = start_moto()
            if latency_ms:
                proxy = LatencyProxy(int(endpoint.rsplit(":", 1)[1]), latency_ms)
        with tempfile.TemporaryDirectory() as tmp:
            for rows in sizes:
                local = Path(tmp) / f"out-{rows}"
                t0 = time.perf_counter()
                n_files, size = write_output(local, rows, rows_per_file, dates)
                print(
                    f"wrote {rows} rows in {n_files} files ({size / 1e6:.0f} MB) in "
                    f"{time.perf_counter() - t0:.1f} s",
                    flush=True,
                )
                places = [("local folder", resolve(local))]
                if s3:
                    dest = resolve(f"s3://bench/out-{rows}-{secrets.token_hex(4)}")
                    pafs.copy_files(
                        str(local),
                        dest.path,
                        source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=dest.fs,
                    )
                    places.append(("S3 (moto on 127.0.0.1)", dest))
                    if proxy is not None:
                        slow = replace(dest, endpoint=proxy.endpoint)
                        places.append((f"S3 (moto, +{latency_ms:g} ms a request)", slow))
                for where, output in places:
                    t_old, t_new, ratio = compare(output, rows, repeats)
                    print(f"{where}, {rows} rows: old {t_old:.3f} s, new {t_new:.3f} s", flush=True)
                    rows_out.append(
                        (
                            where,
                            f"{rows:,}",
                            n_files,
                            f"{size / 1e6:.0f}",
                            f"{t_old:.3f}",
                            f"{t_new:.3f}",
                            f"{ratio:.1f}x",
                        )
                    )
                if s3:
                    dest.delete()
    finally:
        if proxy is not None:
            proxy.close()
        if proc is not None:
            stop(proc)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    caption = (
        f"`already_labeled` on an output with nothing new to label: {rows_per_file} rows a file "
        f"over {dates} dates, ~6 KB PNG masks, plus a `_staging/` run and a `_lease.json` to "
        f"skip; median of {repeats} old/new pairs after 1 warm-up (speed-up: median of the "
        f"pairs' ratios); {platform.machine()} ({os.cpu_count()} cores, load average "
        f"{load:.1f} at the start), pyarrow {pa.__version__}. Old: list + serial per-file "
        "read of 3 columns; new: one filtered `pyarrow.dataset` scan of `source`."
    )
    header = (
        "storage",
        "rows in output",
        "files",
        "MB",
        "old serial s",
        "new scan s",
        "speed-up old/new",
    )
    return caption, rows_out, header


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="10000,100000", help="rows in the output, comma-separated")
    p.add_argument("--rows-per-file", type=int, default=1000, help="as jobs.label's default")
    p.add_argument("--dates", type=int, default=4, help="labeled_date partitions")
    p.add_argument("--repeats", type=int, default=5, help="old/new pairs timed")
    p.add_argument("--no-s3", dest="s3", action="store_false", help="local folder only")
    p.add_argument(
        "--s3-latency-ms",
        type=float,
        default=20,
        help="also time S3 through a proxy adding this wait to each request (0: no)",
    )
    p.add_argument("--quick", action="store_true", help="one small size: 3000 rows")
    p.add_argument("--out", type=Path, help="also write the table to this file")
    args = p.parse_args(argv)
    sizes = [3000] if args.quick else [int(x) for x in args.rows.split(",")]
    caption, rows, header = run(
        sizes, args.rows_per_file, args.dates, args.repeats, args.s3, args.s3_latency_ms
    )
    emit(caption, rows, args.out, header=header)


if __name__ == "__main__":
    main()
