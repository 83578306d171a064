"""Label new drive frames with a registered model; write masks to Parquet, incrementally.

    python -m jobs.label --input URI --output URI --model models:/NAME@champion

Input: a prefix of raw frames (*.jpg / *.png, any size) or ingested shards (a folder with
manifest.json). Output: Parquet under OUTPUT/labeled_date=YYYY-MM-DD/ (schema in the README).
Only inputs without a row for the same model version are labeled, so it can run on a schedule.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone

from jobs._cli import cli, init_ray, parse_args, quiet_ray_data
from pipelines import labeling, tracking
from pipelines.labeling import LabelingError
from pipelines.registry import resolve_version, version_transform
from pipelines.storage import resolve


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.label",
        description="Batch-label frames with a registered lane model (Ray Data, one model per actor).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", help="YAML file of options (flags override it)")
    p.add_argument(
        "--input",
        required=True,
        help="prefix of raw frames, or an ingested dataset folder; local or s3://",
    )
    p.add_argument("--output", required=True, help="output Parquet folder; local or s3://")
    p.add_argument(
        "--model",
        required=True,
        help="models:/NAME@ALIAS, models:/NAME/VERSION or models:/NAME/latest",
    )
    p.add_argument("--batch-size", type=int, default=8, help="frames per model call")
    p.add_argument(
        "--actors", type=int, default=None, help="model replicas (default: one per GPU, else 1)"
    )
    p.add_argument(
        "--use-gpu",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one GPU per model actor (default: when the cluster has GPUs now; pass --use-gpu "
        "for GPU workers that autoscale from zero)",
    )
    p.add_argument(
        "--apollo-ids", action="store_true", help="also write apollo_mask (Apollo label ids)"
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=labeling.DEFAULT_MAX_PIXELS,
        help="larger frames become error rows",
    )
    p.add_argument("--rows-per-file", type=int, default=1000, help="rows per output Parquet file")
    p.add_argument(
        "--crash-at", choices=("after-write", "mid-commit"), help=argparse.SUPPRESS
    )  # chaos testing
    return p


@cli
def main(argv: list[str] | None = None) -> int:
    import ray

    args = parse_args(build_parser(), argv)
    if args.batch_size < 1:
        raise LabelingError(f"--batch-size must be >= 1, got {args.batch_size}")
    t0 = time.time()
    tracking_uri = tracking.configure()
    tracking.check_tracking(tracking_uri)
    ref = resolve_version(args.model)
    transform = version_transform(ref)
    output = resolve(args.output)

    recovered = labeling.recover(output)
    if any(recovered.values()):
        print(
            f"recovered earlier runs: {recovered['completed']} commits completed, "
            f"{recovered['discarded']} incomplete staging folders discarded"
        )
    inputs = labeling.list_inputs(args.input)
    shards = inputs.transform
    if inputs.kind == "shards" and shards is not None and shards.geometry != transform.geometry:
        raise LabelingError(
            f"--input {args.input}: shards were ingested for {shards.size} crop "
            f"{shards.crop_top}, the model expects {transform.size} crop "
            f"{transform.crop_top}; label the raw frames instead"
        )
    done = labeling.already_labeled(output, ref.name, ref.version)
    todo = [r for r in inputs.rows if r["source"] not in done]
    skipped = len(inputs.rows) - len(todo)

    def summary(labeled: int, errors: int) -> str:
        return (
            f"label: found {len(inputs.rows)} frames, labeled {labeled}, errors {errors}, "
            f"skipped {skipped} (already labeled by {ref.name} v{ref.version})"
            + (f", ignored {len(inputs.ignored)} non-image files" if inputs.ignored else "")
            + f" -> {output.uri} [{time.time() - t0:.1f}s]"
        )

    for path in inputs.ignored[:5]:
        print(f"  ignored (not a .jpg/.jpeg/.png frame): {path}")
    if not todo:
        print("nothing new to label; nothing written")
        print(summary(0, 0))
        return 0

    init_ray()
    quiet_ray_data()
    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = gpus > 0 if args.use_gpu is None else args.use_gpu
    actors = args.actors or max(1, gpus)
    labeled_at = datetime.now(timezone.utc)
    print(
        f"labeling {len(todo)} frames with {ref.uri} on {actors} {'GPU' if use_gpu else 'CPU'} actor(s)",
        flush=True,
    )

    if inputs.kind == "shards":
        todo_sources = {r["source"] for r in todo}
        root = resolve(args.input)
        files = [i.path for i in root.list_files((".parquet",))]
        ds = (
            ray.data.read_parquet(
                files, filesystem=root.fs, columns=["image_id", "source_image", "image"]
            )
            .rename_columns({"source_image": "source"})
            .filter(lambda r: r["source"] in todo_sources)
        )
    else:
        ds = ray.data.from_items(todo, override_num_blocks=max(1, min(len(todo), 64)))
    anchor = resolve(args.input)
    ds = (
        ds.map_batches(
            labeling.load_frames,
            batch_size=4,
            batch_format="numpy",
            fn_kwargs={
                "kind": inputs.kind,
                "transform": transform,
                "anchor": anchor,
                "max_pixels": args.max_pixels,
            },
        )
        .map_batches(
            labeling.Segmenter,
            batch_size=args.batch_size,
            batch_format="numpy",
            fn_constructor_kwargs={
                "name": ref.name,
                "version": ref.version,
                "tracking_uri": tracking_uri,
            },
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=1 if use_gpu else 0,
        )
        .map_batches(
            labeling.encode_results,
            batch_size=8,
            batch_format="numpy",
            fn_kwargs={
                "kind": inputs.kind,
                "transform": transform,
                "model_name": ref.name,
                "model_version": ref.version,
                "apollo": args.apollo_ids,
                "labeled_at": labeled_at,
            },
        )
    )

    staging = labeling.new_staging(output)
    part = staging.join(f"labeled_date={labeled_at:%Y-%m-%d}")
    ds.write_parquet(part.path, filesystem=part.fs, min_rows_per_file=args.rows_per_file)

    # Reconcile before committing: every input to label has exactly one row.
    counts = {"ok": 0, "error": 0}
    for info in staging.list_files((".parquet",)):
        with staging.fs.open_input_file(info.path) as f:
            for status in pq_column(f, "status"):
                counts[status] += 1
    if counts["ok"] + counts["error"] != len(todo):
        raise RuntimeError(
            f"wrote {counts} rows for {len(todo)} inputs; staging kept at {staging.uri}"
        )
    if args.crash_at == "after-write":
        import os

        os._exit(137)
    staging.join(labeling.WRITTEN_MARKER).write_text(json.dumps(counts))
    labeling.commit(output, staging, crash_after=1 if args.crash_at == "mid-commit" else None)
    print(summary(counts["ok"], counts["error"]))
    return 0


def pq_column(f, name: str) -> list:
    import pyarrow.parquet as pq

    return pq.read_table(f, columns=[name])[name].to_pylist()


if __name__ == "__main__":
    sys.exit(main())
