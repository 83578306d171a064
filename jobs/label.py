"""Label new drive frames with a registered model; write masks to Parquet, incrementally.

    python -m jobs.label --input URI --output URI --model models:/NAME@champion

Input: a prefix of raw frames (*.jpg / *.png, any size) or an ingested dataset. Output: Parquet
under OUTPUT/labeled_date=YYYY-MM-DD/ (schema in the README). Only inputs without a row for the
same model version are labeled, so it can run on a schedule; runs that overlap are safe (a lease
on OUTPUT: the second exits 0 naming the holder, or waits with --wait-for-lease). Exit status:
0 done (or nothing to do, or another run holds the lease); 1 stalled (no chunk committed for
--stall-minutes); 3 some frames were deferred after storage errors (they are labeled by the
next run); 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone

from jobs._cli import (
    add_actor_pool_args,
    add_progress_arg,
    cli,
    init_ray,
    parse_args,
    quiet_ray_data,
)
from pipelines import capacity, labeling, progress, tracking, watchdog
from pipelines.dataset import read_parquet_files
from pipelines.frames import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from pipelines.labeling import LabelingError
from pipelines.lease import LEASE_NAME, Lease, LeaseHeld, new_run_id
from pipelines.registry import fetch_verified, resolve_version, version_transform
from pipelines.segmenter import Segmenter
from pipelines.storage import Retry, resolve


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
    add_actor_pool_args(p)
    p.add_argument(
        "--apollo-ids", action="store_true", help="also write apollo_mask (Apollo label ids)"
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="larger frames become error rows (from the header, before decoding)",
    )
    p.add_argument(
        "--max-bytes",
        type=int,
        default=DEFAULT_MAX_BYTES,
        help="larger files become error rows (from the listing, never read)",
    )
    p.add_argument(
        "--read-retries",
        type=int,
        default=Retry().attempts,
        help="attempts per frame on storage errors (backoff 0.5 s doubling to 8 s); a frame "
        "still failing is deferred to the next run, not recorded as an error",
    )
    p.add_argument(
        "--chunk-frames",
        type=int,
        default=2000,
        help="frames per commit: a long backlog is committed in pieces, so a run that is "
        "stopped keeps what it finished",
    )
    p.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help="seconds; no new chunk starts after this (set it below the scheduler's "
        "deadline: the job stops itself and commits what it finished)",
    )
    p.add_argument(
        "--lease-ttl",
        type=float,
        default=600,
        help="seconds a run's lease on OUTPUT lasts without a heartbeat (renewed every "
        "ttl/3); after a crash the next run waits this long at most",
    )
    p.add_argument(
        "--wait-for-lease",
        type=float,
        default=0,
        help="seconds to wait when another run holds the lease (default: exit 0 at once)",
    )
    p.add_argument(
        "--cluster-cpus",
        type=float,
        help="CPUs an autoscaling cluster can scale to (default: the CPUs it has now); the "
        "model actors are fitted to leave one for reading frames",
    )
    p.add_argument(
        "--stall-minutes",
        type=float,
        default=30.0,
        help="fail the run when no chunk is committed for this long",
    )
    p.add_argument("--rows-per-file", type=int, default=1000, help="rows per output Parquet file")
    p.add_argument(
        "--uncertain-below",
        type=float,
        default=0.5,
        help="a pixel is uncertain when the model's largest class probability is under this "
        "(the uncertain_fraction column)",
    )
    p.add_argument(
        "--review-below",
        type=float,
        default=None,
        help="also write the frames whose confidence is under this, or whose novelty is over "
        "--review-novelty-above, to OUTPUT/review/labeled_date=DATE/RUN.parquet (ids, sources, "
        "scores), for people to review",
    )
    p.add_argument(
        "--review-novelty-above",
        type=float,
        default=labeling.NOVELTY_ABOVE,
        help="with --review-below: a frame this unlike the training data (the novelty column) "
        "is listed for review whatever its confidence (default %(default)g)",
    )
    add_progress_arg(p, "frames done / total, rate, ETA")
    p.add_argument(
        "--crash-at", choices=("after-write", "mid-commit"), help=argparse.SUPPRESS
    )  # chaos testing
    return p


@cli
def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    for flag in ("batch_size", "chunk_frames", "read_retries", "max_bytes", "max_pixels",
                 "stall_minutes", "progress_seconds"):  # fmt: skip
        if getattr(args, flag) < 1:
            raise LabelingError(f"--{flag.replace('_', '-')} must be >= 1")
    for flag in ("uncertain_below", "review_below"):
        value = getattr(args, flag)
        if value is not None and not 0 < value <= 1:
            raise LabelingError(f"--{flag.replace('_', '-')} must be in (0, 1], got {value:g}")
    if not args.review_novelty_above > 0:
        raise LabelingError(
            f"--review-novelty-above must be > 0, got {args.review_novelty_above:g}"
        )
    t0 = time.time()
    tracking_uri = tracking.configure()
    tracking.check_tracking(tracking_uri)
    ref = resolve_version(args.model)  # the alias is resolved once: one version per run
    transform = version_transform(ref)
    # Fetched and checked once, here: a changed file is one error before any actor starts,
    # and the actors get these bytes from Ray's object store instead of downloading again.
    model_files = fetch_verified(ref)
    output = resolve(args.output)

    run = new_run_id()
    lease = Lease(output.join(LEASE_NAME), run, ttl=args.lease_ttl)
    try:
        lease.acquire(wait=args.wait_for_lease)
    except LeaseHeld as e:
        print(f"another labeling run is writing to this output; this run does nothing: {e}")
        return 0
    try:
        return label(args, lease, ref, model_files, transform, output, t0)
    except watchdog.Stalled as e:
        print(f"error: {e}; committed chunks stay, the next run labels the rest", file=sys.stderr)
        return 1
    finally:
        lease.release()


def label(args, lease: Lease, ref, model_files: dict[str, bytes], transform, output,
          t0: float) -> int:  # fmt: skip
    if lease.took_over is not None:
        print(f"took over the expired lease of run {lease.took_over.run}")
    recovered = labeling.recover(output, lease)
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
    for path in inputs.ignored[:5]:
        print(f"  ignored (not a .jpg/.jpeg/.png frame): {path}")
    totals = {"ok": 0, "error": 0}

    def summary(deferred: list[str], left: int) -> str:
        return (
            f"label: found {len(inputs.rows)} frames, labeled {totals['ok']}, errors "
            f"{totals['error']}, skipped {skipped} (already labeled by {ref.name} "
            f"v{ref.version}), deferred {len(deferred)}, left {left}"
            + (f", ignored {len(inputs.ignored)} non-image files" if inputs.ignored else "")
            + f" -> {output.uri} [{time.time() - t0:.1f}s]"
        )

    if not todo:
        print("nothing new to label; nothing written")
        print(summary([], 0))
        return 0

    init_ray()
    quiet_ray_data()
    import ray

    model_ref = ray.put(model_files)  # once: every actor of every chunk reads it from here
    cluster = capacity.cluster(args.cluster_cpus)
    actors, use_gpu, note = capacity.plan_actor_pool(cluster, args.actors, args.use_gpu)
    if note:
        print(note, flush=True)
    print(
        f"labeling {len(todo)} frames with {ref.uri} on {actors} {'GPU' if use_gpu else 'CPU'} "
        f"actor(s), {args.chunk_frames} per commit",
        flush=True,
    )
    dog = watchdog.Watchdog(
        args.stall_minutes * 60,
        "labeling",
        hint=f"The cluster has {cluster.describe()}; raise --stall-minutes or lower "
        "--chunk-frames if chunks are just slow",
    )
    counter = progress.counter_actor()
    line = progress.RateLine("label", len(todo), every_s=args.progress_seconds)
    with dog, progress.reported(line, counter, final=lambda: sum(totals.values())):
        deferred, left = label_chunks(args, lease, inputs, todo, ref, transform, output,
                                      model_ref, actors, use_gpu, totals, dog, t0,
                                      counter)  # fmt: skip
    for source in deferred[:10]:
        print(f"  deferred (storage errors after retries; labeled by the next run): {source}")
    print(summary(deferred, left))
    return 3 if deferred else 0


def label_chunks(args, lease, inputs, todo, ref, transform, output, model_ref, actors,
                 use_gpu, totals, dog, t0, counter=None) -> tuple[list[str], int]:  # fmt: skip
    """Label ``todo`` in chunks of ``--chunk-frames``, each committed on its own. Returns the
    deferred sources and the count left for the next run."""
    deferred: list[str] = []
    scored: list = []  # this run's rows' scores, for --review-below
    left = len(todo)
    for n, start in enumerate(range(0, len(todo), args.chunk_frames)):
        if args.time_limit is not None and time.time() - t0 > args.time_limit:
            print(f"--time-limit {args.time_limit:g}s reached: {left} frames left for the next run")
            break
        chunk = todo[start : start + args.chunk_frames]
        labeled_at = datetime.now(timezone.utc)
        ds = pipeline(args, inputs, chunk, ref, transform, model_ref, actors, use_gpu, labeled_at,
                      counter)  # fmt: skip
        staging = labeling.new_staging(output, lease.run, n)
        part = staging.join(f"labeled_date={labeled_at:%Y-%m-%d}")
        ds.write_parquet(part.path, filesystem=part.fs, min_rows_per_file=args.rows_per_file)
        result = labeling.reconcile(staging, {r["source"] for r in chunk})
        if args.review_below is not None:
            scored.append(labeling.staged_scores(staging))
        if args.crash_at == "after-write":
            import os

            os._exit(137)
        crash_after = 1 if args.crash_at == "mid-commit" else None
        labeling.finish_chunk(output, staging, result, lease, crash_after)
        totals["ok"] += result.ok
        totals["error"] += result.error
        deferred += result.deferred
        left -= len(chunk)
        dog.beat(f"chunk {n + 1} committed")
    if args.review_below is not None and scored:
        import pyarrow as pa

        uri, n_review = labeling.write_review(output, lease.run, pa.concat_tables(scored),
                                              args.review_below, args.review_novelty_above)  # fmt: skip
        print(f"review: {n_review} frames with confidence under {args.review_below:g} or novelty "
              f"over {args.review_novelty_above:g} -> {uri}", flush=True)  # fmt: skip
    return deferred, left


def pipeline(args, inputs, chunk, ref, transform, model_ref, actors, use_gpu, labeled_at,
             counter=None):  # fmt: skip
    """The Ray Data pipeline for one chunk: load (CPU) -> predict (actors) -> encode (CPU)."""
    import ray

    if inputs.kind == "shards":
        wanted = {r["source"] for r in chunk}
        root = resolve(inputs.uri)  # the version resolved once, in list_inputs
        files = [i.path for i in root.list_files((".parquet",))]
        ds = (
            read_parquet_files(
                files, filesystem=root.fs, columns=["image_id", "source_image", "image"]
            )
            .rename_columns({"source_image": "source"})
            .filter(lambda r: r["source"] in wanted)
        )
    else:
        ds = ray.data.from_items(chunk, override_num_blocks=max(1, min(len(chunk), 64)))
    # Without GPUs, the load and encode tasks reserve half a CPU: they are short next to a
    # model step, and with the same reservation as the model actors Ray Data would fuse the
    # load stage into them, decoding in the actor, one frame after the other with the model.
    task_cpus = 1.0 if use_gpu else 0.5
    return (
        ds.map_batches(
            labeling.load_frames,
            batch_size=4,
            batch_format="numpy",
            num_cpus=task_cpus,
            fn_kwargs={
                "kind": inputs.kind,
                "transform": transform,
                "anchor": resolve(inputs.uri),
                "max_pixels": args.max_pixels,
                "max_bytes": args.max_bytes,
                "retry": Retry(attempts=args.read_retries),
            },
        )
        .map_batches(
            Segmenter,
            batch_size=args.batch_size,
            batch_format="numpy",
            fn_constructor_kwargs={
                "model_files": model_ref,
                "actors": actors,
                "uncertain_below": args.uncertain_below,
            },
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_gpus=1 if use_gpu else 0,
        )
        .map_batches(
            labeling.encode_results,
            batch_size=8,
            batch_format="numpy",
            num_cpus=task_cpus,
            fn_kwargs={
                "kind": inputs.kind,
                "transform": transform,
                "model_name": ref.name,
                "model_version": ref.version,
                "apollo": args.apollo_ids,
                "labeled_at": labeled_at,
                "counter": counter,
            },
        )
    )


if __name__ == "__main__":
    sys.exit(main())
