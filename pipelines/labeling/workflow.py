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
from pipelines.labeling.dataset import label_dataset
from pipelines.labeling.inputs import Inputs, LabelingError, list_inputs
from pipelines.labeling.stages import DEFERRED, LabelStages
from pipelines.registry.versions import ModelRef, fetch_verified, resolve_version, version_transform
from pipelines.runtime import capacity, faults, progress, tracking, watchdog
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
    # Sources with no row, and why: storage failed after retries, or refused this job access.
    deferred: dict[str, str] = field(default_factory=dict)
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
        job = LabelingRun(cfg, lease, ref, transform, model_files, out, t0)
        return job.run()
    except watchdog.Stalled as e:
        print(f"error: {e}; committed chunks stay, the next run labels the rest", file=sys.stderr)
        return Exit.STALLED
    finally:
        lease.release()


@dataclass
class LabelingRun:
    """One run's state, once it holds the output's lease: its options, the lease, the model
    version (its transform and verified files), the output, what it has done so far."""

    cfg: LabelConfig
    lease: Lease
    ref: ModelRef
    transform: FrameTransform
    model_files: dict[str, bytes]
    out: Location
    t0: float
    tally: Tally = field(default_factory=Tally)
    labeled_at: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    scored: list[pa.Table] = field(default_factory=list)  # this run's scores, for the review
    dog: watchdog.Watchdog | None = None

    def run(self) -> int:
        """Recover, list, skip what is labeled, label the rest, summarise; the exit status."""
        if self.lease.took_over is not None:
            print(f"took over the expired lease of run {self.lease.took_over.run}")
        recovered = commit.recover(self.out, self.lease)
        if any(recovered.values()):
            print(
                f"recovered earlier runs: {recovered['completed']} commits completed, "
                f"{recovered['discarded']} incomplete staging folders discarded"
            )
        inputs = list_inputs(self.cfg.input)
        self.check_geometry(inputs)
        done = output.already_labeled(self.out, self.ref.name, self.ref.version)
        todo = [r for r in inputs.rows if r["source"] not in done]
        n = len(inputs.rows)
        self.tally = Tally(found=n, skipped=n - len(todo), left=len(todo))
        for path in inputs.ignored[:5]:
            print(f"  ignored (not a .jpg/.jpeg/.png frame): {path}")
        if not todo:
            print("nothing new to label; nothing written")
        else:
            self.label(inputs, todo)
        self.summary(inputs)
        return Exit.TRANSIENT if self.tally.deferred else Exit.OK

    def check_geometry(self, inputs: Inputs) -> None:
        shards, model = inputs.transform, self.transform
        if inputs.kind == "shards" and shards is not None and shards.geometry != model.geometry:
            raise LabelingError(
                f"--input {self.cfg.input}: shards were ingested for {shards.size} crop "
                f"{shards.crop_top}, the model expects {model.size} crop "
                f"{model.crop_top}; label the raw frames instead"
            )

    def summary(self, inputs: Inputs) -> None:
        t = self.tally
        for source, why in list(t.deferred.items())[:10]:
            print(f"  deferred (storage failed; labeled by the next run): {source}: {why}")
        print(
            f"label: found {t.found} frames, labeled {t.ok}, errors {t.error}, skipped "
            f"{t.skipped} (already labeled by {self.ref.name} v{self.ref.version}), deferred "
            f"{len(t.deferred)}, left {t.left}"
            + (f", ignored {len(inputs.ignored)} non-image files" if inputs.ignored else "")
            + f" -> {self.out.uri} [{time.time() - self.t0:.1f}s]"
        )

    def stages(self, inputs: Inputs, use_gpu: bool) -> LabelStages:
        return LabelStages(
            kind=inputs.kind, anchor=resolve(inputs.uri), transform=self.transform,
            model_name=self.ref.name, model_version=self.ref.version, limits=self.cfg.limits,
            apollo_ids=self.cfg.apollo_ids, device_decode=use_gpu,
        )  # fmt: skip

    def label(self, inputs: Inputs, todo: list[dict]) -> None:
        """Start Ray and the model actors, label ``todo`` chunk by chunk under a watchdog, with
        progress lines, then write the review list."""
        import ray

        from pipelines.runtime.cluster import init_ray, quiet_ray_data

        init_ray()
        quiet_ray_data()
        cfg = self.cfg
        # Asked for only now: a run with nothing to do, or whose lease is held, never starts
        # Ray, let alone brings up a GPU node.
        pool = capacity.actor_pool(cfg, "labeling", cfg.cluster_cpus, cfg.progress_seconds)
        with pool as (actors, use_gpu, note, cluster):
            if note:
                print(note, flush=True)
            print(f"labeling {len(todo)} frames with {self.ref.uri} on {actors} "
                  f"{'GPU' if use_gpu else 'CPU'} actor(s), {cfg.chunk_frames} per commit",
                  flush=True)  # fmt: skip
            self.dog = watchdog.Watchdog(
                cfg.stall_minutes * 60, "labeling",
                hint=f"The cluster has {cluster.describe()}; raise --stall-minutes or lower "
                "--chunk-frames if chunks are just slow",
            )  # fmt: skip
            every_s, final = cfg.progress_seconds, lambda: self.tally.ok + self.tally.error
            with self.dog, progress.counted("label", len(todo), "frames", every_s,
                                            final) as reports:  # fmt: skip
                dataset = label_dataset(
                    self.stages(inputs, use_gpu), todo,
                    model_files=ray.put(self.model_files),  # once: every actor reads it there
                    actors=actors, use_gpu=use_gpu, batch_size=cfg.batch_size,
                    uncertain_below=cfg.uncertain_below, labeled_at=self.labeled_at,
                    reports=reports,
                )  # fmt: skip
                self.commit_as_they_come(dataset)
        self.write_review()

    def commit_as_they_come(self, dataset) -> None:
        """Run the one streaming pipeline (its actors start once and serve the whole run) and
        commit its output every ``chunk_frames`` frames as they come out, until the inputs
        end or the time limit passes. Output rows come out in any order, so a chunk is the
        next ``chunk_frames`` frames to finish (deferred ones included: counted, not
        written)."""
        size = self.cfg.chunk_frames
        if self.over_time():
            return
        stream = iter(dataset.iter_batches(batch_format="pyarrow", batch_size=None))
        pending, n = None, 0  # rows out of the pipeline, not yet committed
        try:
            for table in stream:
                pending = table if pending is None else pa.concat_tables([pending, table])
                while len(pending) >= size:
                    self.commit_chunk(pending.slice(0, size), n)
                    pending, n = pending.slice(size), n + 1
                    if self.over_time():
                        return
            if pending is not None and len(pending):
                self.commit_chunk(pending, n)
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()  # stops the pipeline when the run ends early (time limit, an error)

    def over_time(self) -> bool:
        limit, left = self.cfg.time_limit, self.tally.left
        if limit is None or time.time() - self.t0 <= limit or not left:
            return False
        print(f"--time-limit {limit:g}s reached: {left} frames left for the next run")
        return True

    def commit_chunk(self, rows: pa.Table, n: int) -> None:
        """Stage one chunk's rows (deferred frames have none), reconcile, commit."""
        expected = set(rows["source"].to_pylist())
        keep = rows.filter(pc.not_equal(rows["status"], DEFERRED))
        held = rows.filter(pc.equal(rows["status"], DEFERRED))
        why = dict(zip(held["source"].to_pylist(), held["error"].to_pylist(), strict=True))
        staging = commit.new_staging(self.out, self.lease.run, n)
        part = staging.join(f"labeled_date={self.labeled_at:%Y-%m-%d}")
        per_file = self.cfg.rows_per_file
        for k, start in enumerate(range(0, len(keep), per_file)):
            sink = pa.BufferOutputStream()
            pq.write_table(keep.slice(start, per_file), sink)
            # Named by run, chunk and part: unique in the output, and a re-tried commit of
            # the same chunk (cut off mid-move) finds its own files.
            name = f"{self.lease.run}-{n:05d}-{k:05d}.parquet"
            part.join(name).write_bytes(sink.getvalue().to_pybytes())
        result = commit.reconcile(staging, expected)
        if self.cfg.review_below is not None:
            self.scored.append(output.staged_scores(staging))
        faults.point("label.chunk_staged", chunk=n)
        commit.finish_chunk(self.out, staging, result, self.lease)
        t = self.tally
        t.ok, t.error = t.ok + result.ok, t.error + result.error
        t.deferred.update({s: why.get(s) or "no row came back" for s in result.deferred})
        t.left -= len(expected)
        faults.point("label.chunk_committed", chunk=n)
        if self.dog is not None:
            self.dog.beat(f"chunk {n + 1} committed")

    def write_review(self) -> None:
        cfg = self.cfg
        if cfg.review_below is None or not self.scored:
            return
        uri, n = output.write_review(self.out, self.lease.run, pa.concat_tables(self.scored),
                                     cfg.review_below, cfg.review_novelty_above)  # fmt: skip
        print(f"review: {n} frames with confidence under {cfg.review_below:g} or novelty "
              f"over {cfg.review_novelty_above:g} -> {uri}", flush=True)  # fmt: skip
