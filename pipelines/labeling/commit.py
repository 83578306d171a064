"""How a chunk of labeled rows becomes output, atomically, by the lease holder only.

A run writes each chunk under ``OUTPUT/_staging/RUN-CHUNK/`` (ignored by Parquet readers: the
leading underscore), checks what it holds against what was asked (:func:`reconcile`), marks it
complete with ``_WRITTEN`` and moves its files into ``OUTPUT/labeled_date=YYYY-MM-DD/``. The
next run finishes a commit that was cut off and discards a staging folder that was never
completed (:func:`recover`), so every input ends up with exactly one row per model version.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow.parquet as pq

from pipelines.runtime import faults
from pipelines.storage import Location
from pipelines.storage.lease import Lease

STAGING = "_staging"
WRITTEN_MARKER = "_WRITTEN"


# -- one chunk: stage, reconcile, commit ---------------------------------------------------------
@dataclass(frozen=True)
class ChunkResult:
    ok: int
    error: int
    deferred: list[str]  # sources with no row: storage failed after retries


def reconcile(staging: Location, expected: set[str]) -> ChunkResult:
    """What a chunk's staging folder really holds, checked against the sources it was asked
    to label: at most one row each, none foreign; the missing ones were deferred."""
    seen: set[str] = set()
    counts = {"ok": 0, "error": 0}
    for info in staging.list_files((".parquet",)):
        with staging.fs.open_input_file(info.path) as f:
            t = pq.read_table(f, columns=["source", "status"])
        for source, status in zip(t["source"].to_pylist(), t["status"].to_pylist(), strict=True):
            if source in seen or source not in expected:
                raise RuntimeError(
                    f"{staging.uri}: {'two rows' if source in seen else 'an unexpected row'} "
                    f"for {source}; staging kept for inspection"
                )
            seen.add(source)
            counts[status] += 1
    return ChunkResult(counts["ok"], counts["error"], sorted(expected - seen))


def finish_chunk(output: Location, staging: Location, result: ChunkResult, lease: Lease) -> int:
    """Mark a reconciled staging folder complete and move it into the output, holding the
    lease (checked right before: a run that lost it must not commit). Returns files moved."""
    lease.check()
    marker = {"ok": result.ok, "error": result.error, "deferred": len(result.deferred)}
    staging.join(WRITTEN_MARKER).write_text(json.dumps(marker))
    return commit(output, staging)


def commit(output: Location, run_loc: Location) -> int:
    """Move a completed staging folder into the output; idempotent if cut off and re-run."""
    moved = 0
    for info in run_loc.list_files((".parquet",)):
        rel = run_loc.relative(info.path)
        dest = output.join(rel)
        if dest.exists():
            # An earlier attempt copied it (S3 moves are copy + delete): drop the leftover.
            run_loc.at_path(info.path).delete()
        else:
            run_loc.at_path(info.path).move_to(dest)
        moved += 1
        faults.point("label.file_committed", moved=moved)
    run_loc.delete()
    return moved


def recover(output: Location, lease: Lease) -> dict[str, int]:
    """Finish commits that were cut off; discard staging folders that were never completed.

    Only the lease holder may call it: every other run's lease has then expired (or was
    released), so no staging folder here is still being written by a live run."""
    lease.check()
    staging = output.join(STAGING)
    result = {"completed": 0, "discarded": 0}
    if not staging.is_dir():
        return result
    runs = sorted({staging.relative(p).split("/")[0] for p in staging.walk_dirs()})
    for run in runs:
        if run.startswith(lease.run):
            continue
        run_loc = staging.join(run)
        if run_loc.join(WRITTEN_MARKER).exists():
            commit(output, run_loc)
            result["completed"] += 1
        else:
            run_loc.delete()
            result["discarded"] += 1
    return result


def new_staging(output: Location, run: str, chunk: int) -> Location:
    return output.join(STAGING, f"{run}-{chunk:05d}")
