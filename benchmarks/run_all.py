"""Every benchmark of `make bench` in one go, printed as markdown for RESULTS.md.

    python -m benchmarks.run_all [--device cpu|cuda] [--quick]

``--device cuda``: the GPU figures of the issues (1024x384 model input, full 3384x1710
frames). On CPU the full sizes take hours on a small machine; ``--quick`` uses the reduced
sizes recorded as CPU figures in RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import sys

from benchmarks import bench_data, bench_learning, bench_models, bench_train, bench_vs_plain

LEARNING_GPU = ["--size", "1024x384", "--frame-size", "1692x855", "--crop-top", "345",
                "--frames", "192", "--epochs", "10", "--batch-size", "8"]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--quick", action="store_true", help="reduced CPU sizes")
    args = p.parse_args(argv)
    dev, quick = ["--device", args.device], args.quick
    small = ["--size", "512x192"] if quick else []
    runs = [
        ("Models: parameters and forward latency", bench_models.main, dev + (["--repeats", "3"] if quick else [])),
        ("Data pipeline", bench_data.main, ["--frames", "16" if quick else "64"]),
        ("Training", bench_train.main, dev + small + (["--frames", "32", "--batch-size", "4", "--steps", "5"] if quick else [])),
        ("Labeling: the job against the plain script and the forward pass", bench_vs_plain.main,
         dev + ["--only", "label", "--label-size", "512x192" if quick else "1024x384"]
         + (["--frames", "24"] if quick else ["--batch-size", "8"])),
        ("Learning: val mIoU per epoch", bench_learning.main, dev + ([] if quick else LEARNING_GPU)),
    ]  # fmt: skip
    print(f"# benchmarks, {datetime.date.today()}, {' '.join(sys.argv[1:]) or 'defaults'}\n")
    for title, fn, fn_argv in runs:
        print(f"## {title}\n\n`python -m {fn.__module__} {' '.join(fn_argv)}`\n", flush=True)
        fn(fn_argv)


if __name__ == "__main__":
    main()
