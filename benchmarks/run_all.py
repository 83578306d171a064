"""Every benchmark in one go (what `make bench` runs), printed as markdown for RESULTS.md.

    python -m benchmarks.run_all [--device cpu|cuda] [--quick]

``--device cuda``: the GPU figures of the issues (1024x384 model input, full 3384x1710
frames). On CPU the full sizes take hours on a small machine; ``--quick`` uses the reduced
sizes recorded as CPU figures in RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import sys

from benchmarks import (
    bench_already_labeled,
    bench_data,
    bench_label,
    bench_learning,
    bench_models,
    bench_read_parquet,
    bench_train,
)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--quick", action="store_true", help="reduced CPU sizes")
    args = p.parse_args(argv)
    dev = ["--device", args.device]
    small = ["--size", "512x192"] if args.quick else []
    runs = [
        ("Models: parameters and forward latency", bench_models.main, dev + (["--repeats", "3"] if args.quick else [])),
        ("Data pipeline", bench_data.main, ["--frames", "16" if args.quick else "64"]),
        ("Training", bench_train.main, dev + small + (["--frames", "32", "--batch-size", "4", "--steps", "5"] if args.quick else [])),
        ("Labeling", bench_label.main, dev + small + (["--frames", "24", "--batch-size", "4"] if args.quick else [])),
        ("Reading shards: Ray Data's V2 Parquet datasource against V1", bench_read_parquet.main,
         ["--quick"] if args.quick else []),
        ("Labeling bookkeeping: already_labeled, serial reads before, dataset scan after",
         bench_already_labeled.main, ["--quick"] if args.quick else []),
        ("Learning: val mIoU per epoch, recipe before and after", bench_learning.main,
         dev + (["--variants", "before,after"] if args.quick else
                ["--size", "1024x384", "--frame-size", "1692x855", "--crop-top", "345",
                 "--frames", "192", "--epochs", "10", "--batch-size", "8"])),
    ]  # fmt: skip
    print(f"# benchmarks, {datetime.date.today()}, {' '.join(sys.argv[1:]) or 'defaults'}\n")
    for title, fn, fn_argv in runs:
        print(f"## {title}\n\n`python -m {fn.__module__} {' '.join(fn_argv)}`\n", flush=True)
        fn(fn_argv)


if __name__ == "__main__":
    main()
