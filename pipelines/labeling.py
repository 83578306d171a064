"""Batch labeling: frames in object storage -> predicted masks in Parquet, incrementally.

Stages (Ray Data): load + validate + crop/resize frames (CPU tasks) -> predict (one model per
actor, GPU when there is one: :class:`pipelines.segmenter.Segmenter`) -> restore masks to the
frame size + encode (CPU tasks) -> write. This module imports no PyTorch: a CPU task's worker
process starts without it (1-3 s of imports on a loaded node, measured in benchmarks/RESULTS.md).

Bookkeeping that makes it schedulable:

- *incremental*: an input already in the output for the same model version (as ``ok`` or
  ``error``) is skipped; a re-run with nothing new writes nothing;
- *atomic*: a run writes each chunk under ``OUTPUT/_staging/RUN-CHUNK/`` (ignored by Parquet
  readers: the leading underscore), marks it complete with ``_WRITTEN``, then moves its files
  into ``OUTPUT/labeled_date=YYYY-MM-DD/``. The next run finishes a commit that was cut off and
  discards a staging folder that was never completed, so every input ends up with exactly one
  row per model version;
- *overlap-safe*: only the holder of the output's lease (:mod:`pipelines.lease`) writes,
  recovers or commits; a run that finds the lease held exits, one that finds it expired takes
  it over and cleans up after the dead holder;
- *transient vs permanent*: a frame that cannot be decoded is an ``error`` row (never tried
  again for that model version); a frame whose read still fails after retries (throttling,
  an outage) gets no row at all and is labeled by the next run.
"""

from __future__ import annotations

import io
import json
import posixpath
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import labels, progress
from pipelines.errors import UserError
from pipelines.frames import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    FrameError,
    FrameTransform,
    decode_rgb,
    encode_png,
)
from pipelines.lease import Lease
from pipelines.storage import (
    DEFAULT_RETRY,
    Location,
    ObjectTooLarge,
    Retry,
    TransientStorageError,
    resolve,
)
from pipelines.versions import MANIFEST_NAME, POINTER_NAME, resolve_dataset

RAW_SUFFIXES = (".jpg", ".jpeg", ".png")
STAGING = "_staging"
WRITTEN_MARKER = "_WRITTEN"

#: The output schema (also documented in the README).
OUTPUT_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),  # input path relative to --input, without extension
        ("source", pa.string()),  # full URI of the input frame
        ("height", pa.int32()),  # size of the frame (and of the masks)
        ("width", pa.int32()),
        ("mask", pa.binary()),  # PNG, training ids, frame size; null on error
        ("apollo_mask", pa.binary()),  # PNG, Apollo ids (inverse map); null unless asked for
        ("class_pixels", pa.list_(pa.int64())),  # pixels per training class; null on error
        # How sure the model is (softmax's largest probability p per pixel, at model input
        # size); null on error: mean p over pixels predicted as lanes (null: none predicted),
        # mean p over all pixels, share of pixels with p under --uncertain-below.
        ("confidence", pa.float32()),
        ("pixel_confidence", pa.float32()),
        ("uncertain_fraction", pa.float32()),
        # How unlike the training data the frame is (median over one in three of the model's
        # BatchNorm layers of the squared standardized distance of its feature means); null
        # without BatchNorm.
        ("novelty", pa.float32()),
        ("model_name", pa.string()),
        ("model_version", pa.string()),
        ("status", pa.string()),  # "ok" or "error"
        ("error", pa.string()),  # the reason; null when ok
        ("labeled_at", pa.timestamp("us", tz="UTC")),
    ]
)


class LabelingError(UserError):
    pass


# -- inputs -------------------------------------------------------------------------------------
@dataclass
class Inputs:
    kind: str  # "raw" or "shards"
    rows: list[dict]  # image_id, source (and shard file/row for shards)
    ignored: list[str] = field(default_factory=list)  # files under --input that are not frames
    transform: FrameTransform | None = None  # shards: the transform they were ingested with
    uri: str = ""  # shards: the dataset version folder (resolved once); raw: the prefix


def list_inputs(input_uri: str) -> Inputs:
    """Raw frames under a prefix, or the rows of an ingested dataset (its current version,
    resolved once, or a pinned version folder)."""
    root = resolve(input_uri)
    if root.join(MANIFEST_NAME).exists() or root.join(POINTER_NAME).exists():
        version = resolve_dataset(input_uri)
        manifest, root = version.manifest, version.location
        rows = []
        for info in root.list_files((".parquet",)):
            with root.fs.open_input_file(info.path) as f:
                table = pq.read_table(f, columns=["image_id", "source_image"])
            rows += [
                {"image_id": i, "source": s}
                for i, s in zip(
                    table["image_id"].to_pylist(), table["source_image"].to_pylist(), strict=True
                )
            ]
        transform = FrameTransform.from_dict(manifest["transform"])
        return Inputs("shards", rows, transform=transform, uri=version.uri)
    if not root.is_dir():
        raise LabelingError(
            f"--input {root.uri}: no such folder (expected frames or ingested shards)"
        )
    rows, ignored = [], []
    for info in root.list_files():
        uri = root.at_path(info.path).uri
        if info.path.lower().endswith(RAW_SUFFIXES):
            rows.append(
                {
                    "image_id": posixpath.splitext(root.relative(info.path))[0],
                    "source": uri,
                    "bytes": info.size if info.size is not None else -1,  # from the listing
                }
            )
        else:
            ignored.append(uri)
    return Inputs("raw", rows, ignored, uri=root.uri)


# -- output bookkeeping -------------------------------------------------------------------------
def committed_files(output: Location) -> list[str]:
    """The committed ``.parquet`` files, sorted, as Arrow's dataset discovery finds them: any
    part of the path below ``output`` that starts with ``_`` or ``.`` is skipped (``_staging/``,
    a ``_lease.json``, ``_WRITTEN``, hidden files); other files than ``.parquet`` too, so that a
    stray file never breaks a scan. A missing output has none."""
    import pyarrow.dataset as pads

    try:
        # An explicit schema: discovery lists, and reads no file to infer one.
        found = pads.dataset(
            output.path, schema=OUTPUT_SCHEMA, filesystem=output.fs, format="parquet",
            partitioning="hive", ignore_prefixes=["_", "."],
        )  # fmt: skip
    except FileNotFoundError:
        return []
    return sorted(p for p in found.files if _is_output_file(output, p))


REVIEW = "review"  # OUTPUT/review/labeled_date=.../RUN.parquet: frames for people to review
#: Default of ``--review-novelty-above``: frames like the training data score under 0.1 in
#: tests/test_confidence, noise, black or blown-out frames hundreds to thousands; 10 leaves
#: room both ways.
NOVELTY_ABOVE = 10.0


def staged_scores(staging: Location) -> pa.Table:
    """The columns :func:`write_review` needs, from a chunk's staging folder (before it is
    committed: the rows of this run only, without reading any mask)."""
    columns = [*REVIEW_SCHEMA.names, "status", "labeled_at"]
    tables = []
    for info in staging.list_files((".parquet",)):
        with staging.fs.open_input_file(info.path) as f:
            tables.append(pq.read_table(f, columns=columns))
    schema = pa.schema([OUTPUT_SCHEMA.field(c) for c in columns])
    return pa.concat_tables([t.cast(schema) for t in tables]) if tables else schema.empty_table()


def _is_output_file(output: Location, path: str) -> bool:
    """A committed output file: ``.parquet``, not under ``OUTPUT/review/``."""
    return path.lower().endswith(".parquet") and not path.startswith(
        output.join(REVIEW).path.rstrip("/") + "/"
    )


#: The per-frame scores (:meth:`pipelines.predictor.Predictor.predict_scored`), output columns.
SCORE_NAMES = ("confidence", "pixel_confidence", "uncertain_fraction", "novelty")

REVIEW_SCHEMA = pa.schema(
    [OUTPUT_SCHEMA.field(c) for c in ("image_id", "source", *SCORE_NAMES, "model_name",
                                      "model_version")]
)  # fmt: skip


def write_review(
    output: Location, run: str, rows: pa.Table, below: float, novelty_above: float = NOVELTY_ABOVE
) -> tuple[str, int]:
    """The ok rows of ``rows`` (this run's) that people should look at: the model is unsure
    (``confidence`` of its lanes under ``below``, or, where no lane was predicted,
    ``pixel_confidence`` under it), or the frame is unlike the training data (``novelty``
    above ``novelty_above``: there the softmax is no guide, it is often sure and wrong).
    Written as one small Parquet file ``OUTPUT/review/labeled_date=DATE/RUN.parquet``, so a
    labeling team pulls exactly those frames. Returns (its URI, rows)."""
    import pyarrow.compute as pc

    ok = rows.filter(pc.equal(rows["status"], "ok"))
    unsure = pc.less(pc.coalesce(ok["confidence"], ok["pixel_confidence"]), below)
    novel = pc.fill_null(pc.greater(ok["novelty"], novelty_above), False)
    picked = ok.filter(pc.or_(unsure, novel)).select(REVIEW_SCHEMA.names).cast(REVIEW_SCHEMA)
    # The date of the run's first chunk, as its rows' partition.
    first = rows["labeled_at"][0].as_py() if len(rows) else datetime.now().astimezone()
    date = first.strftime("%Y-%m-%d")
    dest = output.join(REVIEW, f"labeled_date={date}", f"{run}.parquet")
    buf = io.BytesIO()
    pq.write_table(picked, buf)
    dest.write_bytes(buf.getvalue())
    return dest.uri, picked.num_rows


def already_labeled(output: Location, model_name: str, model_version: str) -> set[str]:
    """Sources with a row (ok or error) for this model version in the committed output.

    One scan of the ``source`` column, filtered on the version, over the files that
    :func:`committed_files` lists (same discovery, same ignore rules): Arrow reads the files in
    parallel and skips row groups whose statistics exclude the version.
    """
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    schema = pa.schema([OUTPUT_SCHEMA.field(c) for c in ("source", "model_name", "model_version")])
    try:
        found = pads.dataset(
            output.path, schema=schema, filesystem=output.fs, format="parquet",
            partitioning="hive", ignore_prefixes=["_", "."],
        )  # fmt: skip
    except FileNotFoundError:  # no output yet
        return set()
    # Discovery's fragments keep each file's size from the listing (no extra request per file
    # on S3, as a list of paths would need).
    fragments = [f for f in found.get_fragments() if _is_output_file(output, f.path)]
    dataset = pads.FileSystemDataset(fragments, schema, found.format, found.filesystem)
    wanted = (pc.field("model_name") == model_name) & (pc.field("model_version") == model_version)
    return set(dataset.to_table(columns=["source"], filter=wanted)["source"].to_pylist())


def read_output(output_uri: str) -> pa.Table:
    """All committed rows (with the ``labeled_date`` partition column)."""
    output = resolve(output_uri)
    files = committed_files(output)
    if not files:
        return OUTPUT_SCHEMA.empty_table()
    import pyarrow.dataset as pads

    # An explicit schema: files written before a column existed (confidence, ...) read as
    # nulls in it instead of failing the read.
    date = pa.schema([("labeled_date", pa.string())])
    return pads.dataset(
        files, schema=pa.unify_schemas([OUTPUT_SCHEMA, date]), filesystem=output.fs,
        format="parquet", partitioning=pads.partitioning(date, flavor="hive"),
        partition_base_dir=output.path,
    ).to_table()  # fmt: skip


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


def commit(output: Location, run_loc: Location, crash_after: int | None = None) -> int:
    """Move a completed staging folder into the output; idempotent if cut off and re-run.

    ``crash_after``: chaos testing, kill the process after moving that many files.
    """
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
        if crash_after is not None and moved >= crash_after:
            import os

            os._exit(137)
    run_loc.delete()
    return moved


def new_staging(output: Location, run: str, chunk: int) -> Location:
    return output.join(STAGING, f"{run}-{chunk:05d}")


# -- Ray Data stages ----------------------------------------------------------------------------
def load_frames(
    batch: dict[str, np.ndarray],
    *,
    kind: str,
    transform: FrameTransform,
    anchor: Location,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    retry: Retry = DEFAULT_RETRY,
) -> dict:
    """CPU stage: read, validate and prepare frames. A bad frame becomes an error row with a
    zero placeholder (batches need one shape), never an exception; a frame storage could not
    deliver after retries is marked ``deferred`` (no row: the next run tries again)."""
    n = len(batch["source"])
    prepared = np.zeros((n, transform.height, transform.width, 3), dtype=np.uint8)
    heights, widths = np.zeros(n, dtype=np.int32), np.zeros(n, dtype=np.int32)
    errors = np.full(n, "", dtype=object)
    deferred = np.zeros(n, dtype=bool)
    for i in range(n):
        try:
            if kind == "shards":
                frame = decode_rgb(bytes(batch["image"][i]), what="shard image")
            else:
                listed = int(batch["bytes"][i])
                if listed > max_bytes:  # from the listing: never read
                    raise FrameError(f"frame is {listed} bytes, over the limit {max_bytes}")
                data = anchor.at_uri(batch["source"][i]).read_bytes(
                    max_bytes=max_bytes, retry=retry
                )
                # Decoded at the reduced size the model input allows (JPEG DCT scaling).
                prepared[i], (heights[i], widths[i]) = transform.load_image(
                    data, max_pixels=max_pixels
                )
                continue
            # Shard images were cropped and resized at ingest: they are model input already.
            heights[i], widths[i] = frame.shape[:2]
            prepared[i] = frame
        except (FrameError, ObjectTooLarge) as e:
            errors[i] = str(e)
        except TransientStorageError as e:
            errors[i], deferred[i] = str(e), True
            print(f"deferred to the next run: {e}", flush=True)
        except Exception as e:  # missing, permission denied: the row says why
            errors[i] = f"could not read frame ({type(e).__name__}: {e})"
    return {
        "image_id": batch["image_id"],
        "source": batch["source"],
        "prepared": prepared,
        "height": heights,
        "width": widths,
        "error": errors,
        "deferred": deferred,
    }


def encode_results(
    batch: dict[str, np.ndarray],
    *,
    kind: str,
    transform: FrameTransform,
    model_name: str,
    model_version: str,
    apollo: bool,
    labeled_at: datetime,
    counter=None,
) -> pa.Table:
    """CPU stage: masks back to the frame size, PNG-encoded, in the output schema. Deferred
    frames get no row. ``counter``: a :class:`pipelines.progress.Counter` the batch's frames
    are added to (the job's progress lines)."""
    cols: dict[str, list] = {name: [] for name in OUTPUT_SCHEMA.names}
    for i in range(len(batch["source"])):
        if batch["deferred"][i]:
            continue
        error = str(batch["error"][i])
        h, w = int(batch["height"][i]), int(batch["width"][i])
        mask = apollo_png = pixels = None
        if not error:
            small = batch["small_mask"][i]
            full = small if kind == "shards" else transform.restore_mask(small, (h, w))
            mask = encode_png(full)
            # Counted on the small mask: counting the full-size one cost ~20 ms a frame.
            pixels = (
                labels.class_pixel_counts(full)
                if kind == "shards"
                else transform.restored_pixel_counts(small, (h, w))
            )
            if apollo:
                apollo_png = encode_png(labels.to_apollo_ids(full))
        row = {
            "image_id": str(batch["image_id"][i]),
            "source": str(batch["source"][i]),
            "height": h,
            "width": w,
            "mask": mask,
            "apollo_mask": apollo_png,
            "class_pixels": pixels,
            **{k: _score(batch[k][i]) if not error else None for k in SCORE_NAMES},
            "model_name": model_name,
            "model_version": model_version,
            "status": "error" if error else "ok",
            "error": error or None,
            "labeled_at": labeled_at,
        }
        for k, v in row.items():
            cols[k].append(v)
    progress.count(counter, len(batch["source"]))
    return pa.table(cols, schema=OUTPUT_SCHEMA)


def _score(v) -> float | None:
    v = float(v)
    return None if np.isnan(v) else v


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


def finish_chunk(
    output: Location,
    staging: Location,
    result: ChunkResult,
    lease: Lease,
    crash_after: int | None = None,
) -> int:
    """Mark a reconciled staging folder complete and move it into the output, holding the
    lease (checked right before: a run that lost it must not commit). Returns files moved."""
    lease.check()
    marker = {"ok": result.ok, "error": result.error, "deferred": len(result.deferred)}
    staging.join(WRITTEN_MARKER).write_text(json.dumps(marker))
    return commit(output, staging, crash_after=crash_after)
