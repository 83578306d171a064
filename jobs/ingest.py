"""Ingest raw drive data into Parquet shards (train/, val/) plus manifest.json.

    python -m jobs.ingest --source URI --dest URI [--size 1024x384] [--crop-top 690]
        [--val-fraction 0.1] [--seed N]

The source is an ApolloScape-layout tree (ColorImage*/...jpg with Label*/..._bin.png) or a CSV
of ``image,label[,drive]`` paths. Bad records never stop the ingest: each is listed in the
manifest with its reason. Exits non-zero only when nothing valid remains.
"""

from __future__ import annotations

import argparse
import sys

from jobs._cli import cli, init_ray, parse_args, quiet_ray_data
from pipelines.frames import FrameTransform
from pipelines.ingest import run_ingest
from pipelines.synthetic import parse_size


def build_parser() -> argparse.ArgumentParser:
    d = FrameTransform()
    p = argparse.ArgumentParser(
        prog="python -m jobs.ingest",
        description="Ingest Apollo-style lane data into Parquet shards with Ray Data.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", help="YAML file of options (flags override it)")
    p.add_argument(
        "--source",
        required=True,
        help="Apollo-layout folder or CSV (image,label[,drive]); local or s3://",
    )
    p.add_argument(
        "--dest",
        required=True,
        help="output folder for train/, val/ and manifest.json; local or s3://",
    )
    p.add_argument("--size", type=parse_size, default=d.size, help="model input WIDTHxHEIGHT")
    p.add_argument(
        "--crop-top",
        type=int,
        default=d.crop_top,
        help="sky rows cropped from the top of each frame",
    )
    p.add_argument(
        "--crop-bottom",
        type=int,
        default=d.crop_bottom,
        help="rows cropped from the bottom (e.g. the ego hood)",
    )
    p.add_argument(
        "--val-fraction", type=float, default=0.1, help="fraction of drives held out for validation"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the drive split")
    p.add_argument("--shard-mb", type=float, default=256, help="target Parquet shard size in MB")
    return p


@cli
def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    transform = FrameTransform(
        width=args.size[0],
        height=args.size[1],
        crop_top=args.crop_top,
        crop_bottom=args.crop_bottom,
    )
    init_ray()
    quiet_ray_data()
    result = run_ingest(
        args.source,
        args.dest,
        transform=transform,
        val_fraction=args.val_fraction,
        seed=args.seed,
        shard_bytes=int(args.shard_mb * 2**20),
    )
    print(result.summary())
    manifest = result.manifest
    for r in manifest["rejected"][:10]:
        print(f"  rejected {r['image'] or r['label']}: {r['reason']}")
    if len(manifest["rejected"]) > 10:
        print(f"  ... and {len(manifest['rejected']) - 10} more in {args.dest}/manifest.json")
    if result.valid == 0:
        print("error: nothing valid to ingest (see the reasons above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
