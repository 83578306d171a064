"""Ingest raw drive data into a new version of a Parquet dataset (train/, val/, manifest.json).

    python -m jobs.ingest --source URI --dest URI [--size 1024x384] [--crop-top 690]
        [--val-fraction 0.1] [--seed N] [--keep-versions N]

The source is an ApolloScape-layout tree (ColorImage*/...jpg with Label*/..._bin.png) or a CSV
of ``image,label[,drive]`` paths. Each run writes DEST/versions/NAME/ and commits it by
replacing DEST/current.json, last. Bad records never stop the ingest: each is listed in the
manifest with its reason. Exit status: 0 committed; 1 nothing valid (not committed); 3 some
records stayed unreadable after retries (storage trouble, not bad data; not committed unless
--allow-unreadable): re-run.
"""

from __future__ import annotations

import argparse
import sys

from jobs._cli import add_progress_arg, cli, init_ray, parse_args, quiet_ray_data
from pipelines.frames import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS, FrameTransform
from pipelines.ingest import IngestError, Limits, run_ingest
from pipelines.storage import Retry
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
        "--source-height",
        type=int,
        default=None,
        help="frame height the crops are counted in (default: the height of the first frame "
        "found); frames of another height from the same camera lose the same fraction of rows",
    )
    p.add_argument(
        "--val-fraction", type=float, default=0.1, help="fraction of drives held out for validation"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the drive split")
    p.add_argument("--shard-mb", type=float, default=256, help="target Parquet shard size in MB")
    p.add_argument(
        "--max-bytes",
        type=int,
        default=DEFAULT_MAX_BYTES,
        help="larger source files are rejected, from the listing, before they are read",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="larger images/labels are rejected, from their header, before they are decoded",
    )
    p.add_argument(
        "--read-retries",
        type=int,
        default=Retry().attempts,
        help="attempts per source file on storage errors (backoff 0.5 s doubling to 8 s)",
    )
    p.add_argument(
        "--keep-versions",
        type=int,
        default=None,
        help="after committing, remove all but the newest N versions (default: keep all)",
    )
    p.add_argument(
        "--allow-unreadable",
        action="store_true",
        help="commit even if some records stayed unreadable after retries",
    )
    p.add_argument(
        "--allow-outside-root",
        action="store_true",
        help="a CSV source may name files outside its own folder (absolute paths, URIs, "
        "'..'); by default such records are rejected",
    )
    add_progress_arg(p, "records processed / total, rate, ETA")
    p.add_argument("--slow-write", type=float, default=0.0, help=argparse.SUPPRESS)  # chaos
    return p


@cli
def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    if args.progress_seconds <= 0:
        raise IngestError(f"--progress-seconds must be > 0, got {args.progress_seconds:g}")
    for flag in ("max_bytes", "max_pixels", "read_retries", "keep_versions"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise IngestError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    try:
        transform = FrameTransform(
            width=args.size[0],
            height=args.size[1],
            crop_top=args.crop_top,
            crop_bottom=args.crop_bottom,
            source_height=args.source_height,
        )
    except ValueError as e:  # --crop-* / --source-height that leave nothing
        raise IngestError(f"--size/--crop-top/--crop-bottom/--source-height: {e}") from None
    init_ray()
    quiet_ray_data()
    result = run_ingest(
        args.source,
        args.dest,
        transform=transform,
        val_fraction=args.val_fraction,
        seed=args.seed,
        shard_bytes=int(args.shard_mb * 2**20),
        limits=Limits(args.max_bytes, args.max_pixels, Retry(attempts=args.read_retries)),
        keep_versions=args.keep_versions,
        allow_unreadable=args.allow_unreadable,
        allow_outside_root=args.allow_outside_root,
        progress_seconds=args.progress_seconds,
        slow_write=args.slow_write,
    )
    print(result.summary())
    manifest = result.manifest
    where = f"{result.version_uri}/manifest.json"
    for kind in ("rejected", "unreadable"):
        for r in manifest[kind][:10]:
            print(f"  {kind} {r['image'] or r['label']}: {r['reason']}")
        if len(manifest[kind]) > 10:
            print(f"  ... and {len(manifest[kind]) - 10} more {kind} in {where}")
    for name in result.pruned:
        print(f"  removed old version {name}")
    if result.valid == 0:
        print("error: nothing valid to ingest (see the reasons above)", file=sys.stderr)
        return 1
    if not result.committed:
        print(
            f"error: {result.unreadable} records could not be read after "
            f"{args.read_retries} attempts (storage errors, listed above); the version was "
            "written but not committed, the current one is unchanged. Re-run when storage "
            "is healthy, or pass --allow-unreadable.",
            file=sys.stderr,
        )
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
