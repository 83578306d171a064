"""A labeling run, top to bottom: resolve the model version once -> take the output's lease ->
finish or discard what earlier runs left -> list the inputs and drop those already labeled by
this version -> label the rest in one streaming pipeline, committed chunk by chunk -> the review
list.

What makes it schedulable:

- *incremental*: an input already in the output for the same model version (as ``ok`` or
  ``error``) is skipped; a re-run with nothing new writes nothing and starts no model;
- *atomic*: each chunk is staged, reconciled and committed (:mod:`pipelines.labeling.commit`);
- *overlap-safe*: only the holder of the output's lease (:mod:`pipelines.storage.lease`)
  writes, recovers or commits; a run that finds the lease held exits 0, one that finds it
  expired takes it over and cleans up after the dead holder;
- *transient vs permanent*: a frame that cannot be decoded is an ``error`` row (never tried
  again for that model version); a frame whose read still fails after retries (throttling, an
  outage) gets no row at all and is labeled by the next run;
- *bounded*: the pipeline stops at the first commit after ``time_limit``; no chunk committed for
  ``stall_minutes`` ends the run (exit 1) with what was committed kept.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.core.errors import Exit
from pipelines.core.frames import FrameTransform
from pipelines.labeling import commit, output
from pipelines.labeling.config import LabelConfig
from pipelines.labeling.inputs import Inputs, LabelingError, list_inputs
from pipelines.labeling.stages import DEFERRED, Pipeline
from pipelines.ops import capacity, faults, progress, tracking, watchdog
from pipelines.registry.versions import ModelRef, fetch_verified, resolve_version, version_transform
from pipelines.storage import Location, resolve
from pipelines.storage.lease import LEASE_NAME, Lease, LeaseHeld, new_run_id

__all__ = ["LabelConfig", "run"]


@dataclass
class Tally:
    """What a run did, for its summary line."""

    found: int = 0
    skipped: int = 0
    ok: int = 0
    error: int = 0
    deferred: list[str] = field(default_factory=list)  # sources with no row: storage failed
    left: int = 0  # not started before the time limit


def run(cfg: LabelConfig) -> int:
    """The labeling job. Exit status: 0 done (or nothing to do, or another run holds the
    lease), 3 some frames were deferred after storage errors (the next run labels them), 6
    stalled."""
    t0 = time.time()
    tracking.check_tracking(tracking.configure())
    ref = resolve_version(cfg.model)  # the alias is resolved once: one version per run
    transform = version_transform(ref)
    # Fetched and checked once, here: a changed file is one error before any actor starts,
    # and the actors get these bytes from Ray's object store instead of downloading again.
    model_files = fetch_verified(ref)
    out = resolve(cfg.output)
    lease = Lease(out.join(LEASE_NAME), new_run_id(), ttl=cfg.lease_ttl)
    try:
        lease.acquire(wait=cfg.wait_for_lease)
    except LeaseHeld as e:
        print(f"another labeling run is writing to this output; this run does nothing: {e}")
        return 0
    try:
        return _holding_lease(cfg, lease, ref, transform, model_files, out, t0)
    except watchdog.Stalled as e:
        print(f"error: {e}; committed chunks stay, the next run labels the rest", file=sys.stderr)
        return Exit.STALLED
    finally:
        lease.release()


def _holding_lease(cfg: LabelConfig, lease: Lease, ref: ModelRef, transform: FrameTransform,
                   model_files: dict[str, bytes], out: Location, t0: float) -> int:  # fmt: skip
    if lease.took_over is not None:
        print(f"took over the expired lease of run {lease.took_over.run}")
    recovered = commit.recover(out, lease)
    if any(recovered.values()):
        print(
            f"recovered earlier runs: {recovered['completed']} commits completed, "
            f"{recovered['discarded']} incomplete staging folders discarded"
        )
    inputs = list_inputs(cfg.input)
    _check_geometry(cfg, inputs, transform)
    done = output.already_labeled(out, ref.name, ref.version)
    todo = [r for r in inputs.rows if r["source"] not in done]
    tally = Tally(found=len(inputs.rows), skipped=len(inputs.rows) - len(todo), left=len(todo))
    for path in inputs.ignored[:5]:
        print(f"  ignored (not a .jpg/.jpeg/.png frame): {path}")
    if not todo:
        print("nothing new to label; nothing written")
    else:
        _label(cfg, lease, ref, transform, model_files, inputs, todo, out, tally, t0)
    for source in tally.deferred[:10]:
        print(f"  deferred (storage errors after retries; labeled by the next run): {source}")
    print(
        f"label: found {tally.found} frames, labeled {tally.ok}, errors {tally.error}, skipped "
        f"{tally.skipped} (already labeled by {ref.name} v{ref.version}), deferred "
        f"{len(tally.deferred)}, left {tally.left}"
        + (f", ignored {len(inputs.ignored)} non-image files" if inputs.ignored else "")
        + f" -> {out.uri} [{time.time() - t0:.1f}s]"
    )
    return Exit.TRANSIENT if tally.deferred else Exit.OK


def _check_geometry(cfg: LabelConfig, inputs: Inputs, transform: FrameTransform) -> None:
    shards = inputs.transform
    if inputs.kind == "shards" and shards is not None and shards.geometry != transform.geometry:
        raise LabelingError(
            f"--input {cfg.input}: shards were ingested for {shards.size} crop "
            f"{shards.crop_top}, the model expects {transform.size} crop "
            f"{transform.crop_top}; label the raw frames instead"
        )


def _label(cfg: LabelConfig, lease: Lease, ref: ModelRef, transform: FrameTransform,
           model_files: dict[str, bytes], inputs: Inputs, todo: list[dict], out: Location,
           tally: Tally, t0: float) -> None:  # fmt: skip
    """Start Ray and the model actors, label ``todo`` chunk by chunk under a watchdog, with
    progress lines, then write the review list."""
    import ray

    from pipelines.ops.cluster import init_ray, quiet_ray_data

    init_ray()
    quiet_ray_data()
    # Asked for only now: a run with nothing to do, or whose lease is held, never starts
    # Ray, let alone brings up a GPU node.
    pool = capacity.actor_pool(cfg, "labeling", cfg.cluster_cpus, cfg.progress_seconds)
    with pool as (actors, use_gpu, note, cluster):
        if note:
            print(note, flush=True)
        print(
            f"labeling {len(todo)} frames with {ref.uri} on {actors} {'GPU' if use_gpu else 'CPU'} "
            f"actor(s), {cfg.chunk_frames} per commit",
            flush=True,
        )
        dog = watchdog.Watchdog(
            cfg.stall_minutes * 60,
            "labeling",
            hint=f"The cluster has {cluster.describe()}; raise --stall-minutes or lower "
            "--chunk-frames if chunks are just slow",
        )
        every_s, final = cfg.progress_seconds, lambda: tally.ok + tally.error
        with dog, progress.counted("label", len(todo), "frames", every_s, final) as reports:
            pipeline = Pipeline(
                inputs=inputs, transform=transform, model_name=ref.name, model_version=ref.version,
                model_files=ray.put(model_files),  # once: every actor of every chunk reads it there
                actors=actors, use_gpu=use_gpu, batch_size=cfg.batch_size, limits=cfg.limits,
                apollo_ids=cfg.apollo_ids, uncertain_below=cfg.uncertain_below, reports=reports,
            )  # fmt: skip
            scored = _chunks(cfg, lease, pipeline, todo, out, tally, dog, t0)
        if cfg.review_below is not None and scored:
            uri, n = output.write_review(out, lease.run, pa.concat_tables(scored), cfg.review_below,
                                         cfg.review_novelty_above)  # fmt: skip
            print(f"review: {n} frames with confidence under {cfg.review_below:g} or novelty "
                  f"over {cfg.review_novelty_above:g} -> {uri}", flush=True)  # fmt: skip


def _chunks(cfg: LabelConfig, lease: Lease, pipeline: Pipeline, todo: list[dict],
            out: Location, tally: Tally, dog: watchdog.Watchdog, t0: float) -> list:  # fmt: skip
    """Label ``todo`` in one streaming Ray Data pipeline (its actors start once and serve the
    whole run) and commit its output every ``chunk_frames`` frames as they come out. Returns
    the scores of this run's rows (for the review list) when one is asked for.

    Before, each chunk was a pipeline of its own: the actors started again (5-10 s), the
    pipeline drained to its last frame, and every chunk of an ingested dataset re-read every
    shard. Output rows come out in any order, so a chunk is the next ``chunk_frames`` frames
    to finish (deferred ones included: they are counted, not written)."""
    scored: list = []
    if _over_time(cfg, tally, t0):
        return scored
    labeled_at = datetime.now(timezone.utc)
    stream = iter(pipeline.dataset(todo, labeled_at).iter_batches(batch_format="pyarrow",
                                                                  batch_size=None))  # fmt: skip
    pending = None  # rows out of the pipeline, not yet committed
    n = 0
    try:
        for table in stream:
            pending = table if pending is None else pa.concat_tables([pending, table])
            stop = False
            while len(pending) >= cfg.chunk_frames and not stop:
                _commit_chunk(cfg, lease, pending.slice(0, cfg.chunk_frames), n, labeled_at,
                              out, tally, dog, scored)  # fmt: skip
                pending, n = pending.slice(cfg.chunk_frames), n + 1
                stop = _over_time(cfg, tally, t0)
            if stop:
                break
        else:
            if pending is not None and len(pending):
                _commit_chunk(cfg, lease, pending, n, labeled_at, out, tally, dog, scored)
    finally:
        close = getattr(stream, "close", None)
        if close is not None:
            close()  # stops the pipeline when the run ends early (time limit, an error)
    return scored


def _over_time(cfg: LabelConfig, tally: Tally, t0: float) -> bool:
    if cfg.time_limit is None or time.time() - t0 <= cfg.time_limit or not tally.left:
        return False
    print(f"--time-limit {cfg.time_limit:g}s reached: {tally.left} frames left for the next run")
    return True


def _commit_chunk(cfg: LabelConfig, lease: Lease, rows: pa.Table, n: int, labeled_at: datetime,
                  out: Location, tally: Tally, dog: watchdog.Watchdog, scored: list) -> None:  # fmt: skip
    """Stage one chunk's rows (deferred frames have none), reconcile, commit."""
    expected = set(rows["source"].to_pylist())
    keep = rows.filter(pc.not_equal(rows["status"], DEFERRED))
    staging = commit.new_staging(out, lease.run, n)
    part = staging.join(f"labeled_date={labeled_at:%Y-%m-%d}")
    for k, start in enumerate(range(0, len(keep), cfg.rows_per_file)):
        sink = pa.BufferOutputStream()
        pq.write_table(keep.slice(start, cfg.rows_per_file), sink)
        # Named by run, chunk and part: unique in the output, and a re-tried commit of the
        # same chunk (cut off mid-move) finds its own files.
        name = f"{lease.run}-{n:05d}-{k:05d}.parquet"
        part.join(name).write_bytes(sink.getvalue().to_pybytes())
    result = commit.reconcile(staging, expected)
    if cfg.review_below is not None:
        scored.append(output.staged_scores(staging))
    if faults.armed("label.exit_after_write") is not None:
        faults.exit_process("label.exit_after_write", 137)
    commit.finish_chunk(out, staging, result, lease)
    tally.ok += result.ok
    tally.error += result.error
    tally.deferred += result.deferred
    tally.left -= len(expected)
    if pause := faults.armed("label.pause_after_commit"):
        time.sleep(float(pause))
    dog.beat(f"chunk {n + 1} committed")
