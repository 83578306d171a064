"""Batch labeling: frames in object storage -> predicted masks in Parquet, incrementally.

Stages (Ray Data): load + validate + crop/resize frames (CPU tasks) -> predict (one model per
actor, GPU when there is one) -> restore masks to the frame size + encode (CPU tasks) -> write.

Bookkeeping that makes it schedulable:

- *incremental*: an input already in the output for the same model version (as ``ok`` or
  ``error``) is skipped; a re-run with nothing new writes nothing;
- *atomic*: a run writes under ``OUTPUT/_staging/RUN/`` (ignored by Parquet readers: the
  leading underscore), marks it complete with ``_WRITTEN``, then moves its files into
  ``OUTPUT/labeled_date=YYYY-MM-DD/``. The next run finishes a commit that was cut off and
  discards a staging folder that was never completed, so every input ends up with exactly one
  row per model version.
"""

from __future__ import annotations

import json
import posixpath
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import labels
from pipelines.errors import UserError
from pipelines.frames import FrameError, FrameTransform, decode_rgb, encode_png
from pipelines.ingest import MANIFEST_NAME
from pipelines.storage import Location, resolve

RAW_SUFFIXES = (".jpg", ".jpeg", ".png")
STAGING = "_staging"
WRITTEN_MARKER = "_WRITTEN"
DEFAULT_MAX_PIXELS = 60_000_000  # 3384x2710 frames are 9.2 MP; larger is a mistake, not a frame

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


def list_inputs(input_uri: str) -> Inputs:
    """Raw frames under a prefix, or the rows of ingested shards (a folder with
    ``manifest.json``)."""
    root = resolve(input_uri)
    if root.join(MANIFEST_NAME).exists():
        manifest = json.loads(root.join(MANIFEST_NAME).read_text())
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
        return Inputs("shards", rows, transform=FrameTransform.from_dict(manifest["transform"]))
    if not root.is_dir():
        raise LabelingError(
            f"--input {root.uri}: no such folder (expected frames or ingested shards)"
        )
    rows, ignored = [], []
    for info in root.list_files():
        uri = root.at_path(info.path).uri
        if info.path.lower().endswith(RAW_SUFFIXES):
            rows.append(
                {"image_id": posixpath.splitext(root.relative(info.path))[0], "source": uri}
            )
        else:
            ignored.append(uri)
    return Inputs("raw", rows, ignored)


# -- output bookkeeping -------------------------------------------------------------------------
def committed_files(output: Location) -> list[str]:
    return [
        i.path
        for i in output.list_files((".parquet",))
        if not output.relative(i.path).startswith(STAGING + "/")
    ]


def already_labeled(output: Location, model_name: str, model_version: str) -> set[str]:
    """Sources with a row (ok or error) for this model version in the committed output."""
    done: set[str] = set()
    for path in committed_files(output):
        with output.fs.open_input_file(path) as f:
            t = pq.read_table(f, columns=["source", "model_name", "model_version"])
        for s, n, v in zip(
            *(t[c].to_pylist() for c in ("source", "model_name", "model_version")), strict=True
        ):
            if n == model_name and v == model_version:
                done.add(s)
    return done


def read_output(output_uri: str) -> pa.Table:
    """All committed rows (with the ``labeled_date`` partition column)."""
    output = resolve(output_uri)
    files = committed_files(output)
    if not files:
        return OUTPUT_SCHEMA.empty_table()
    import pyarrow.dataset as pads

    return pads.dataset(
        files, filesystem=output.fs, format="parquet", partitioning="hive",
        partition_base_dir=output.path,
    ).to_table()  # fmt: skip


def recover(output: Location) -> dict[str, int]:
    """Finish commits that were cut off; discard staging folders that were never completed."""
    staging = output.join(STAGING)
    result = {"completed": 0, "discarded": 0}
    if not staging.is_dir():
        return result
    runs = sorted({staging.relative(p).split("/")[0] for p in staging.walk_dirs()})
    for run in runs:
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


def new_staging(output: Location) -> Location:
    run = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    return output.join(STAGING, run)


# -- Ray Data stages ----------------------------------------------------------------------------
def load_frames(
    batch: dict[str, np.ndarray],
    *,
    kind: str,
    transform: FrameTransform,
    anchor: Location,
    max_pixels: int,
) -> dict:
    """CPU stage: read, validate and prepare frames. A bad frame becomes an error row with a
    zero placeholder (batches need one shape), never an exception."""
    n = len(batch["source"])
    prepared = np.zeros((n, transform.height, transform.width, 3), dtype=np.uint8)
    heights, widths = np.zeros(n, dtype=np.int32), np.zeros(n, dtype=np.int32)
    errors = np.full(n, "", dtype=object)
    for i in range(n):
        try:
            if kind == "shards":
                frame = decode_rgb(bytes(batch["image"][i]), what="shard image")
            else:
                frame = decode_rgb(
                    anchor.at_uri(batch["source"][i]).read_bytes(), max_pixels=max_pixels
                )
            heights[i], widths[i] = frame.shape[:2]
            # Shard images were cropped and resized at ingest: they are model input already.
            prepared[i] = frame if kind == "shards" else transform.prepare_image(frame)
        except FrameError as e:
            errors[i] = str(e)
        except Exception as e:  # storage errors: the row says why, the job goes on
            errors[i] = f"could not read frame ({type(e).__name__}: {e})"
    return {
        "image_id": batch["image_id"],
        "source": batch["source"],
        "prepared": prepared,
        "height": heights,
        "width": widths,
        "error": errors,
    }


class Segmenter:
    """Actor stage: holds one model (loaded once per actor) and predicts batches."""

    def __init__(self, name: str, version: str, tracking_uri: str) -> None:
        import mlflow

        from pipelines.registry import ModelRef, load_predictor

        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
        self.predictor = load_predictor(ModelRef(name, version))

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["error"] == ""
        masks = np.zeros(batch["prepared"].shape[:3], dtype=np.uint8)
        if ok.any():
            masks[ok] = self.predictor.predict_prepared(batch["prepared"][ok])
        out = {k: v for k, v in batch.items() if k != "prepared"}
        out["small_mask"] = masks
        return out


def encode_results(
    batch: dict[str, np.ndarray],
    *,
    kind: str,
    transform: FrameTransform,
    model_name: str,
    model_version: str,
    apollo: bool,
    labeled_at: datetime,
) -> pa.Table:
    """CPU stage: masks back to the frame size, PNG-encoded, in the output schema."""
    cols: dict[str, list] = {name: [] for name in OUTPUT_SCHEMA.names}
    for i in range(len(batch["source"])):
        error = str(batch["error"][i])
        h, w = int(batch["height"][i]), int(batch["width"][i])
        mask = apollo_png = pixels = None
        if not error:
            small = batch["small_mask"][i]
            full = small if kind == "shards" else transform.restore_mask(small, (h, w))
            mask = encode_png(full)
            pixels = labels.class_pixel_counts(full)
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
            "model_name": model_name,
            "model_version": model_version,
            "status": "error" if error else "ok",
            "error": error or None,
            "labeled_at": labeled_at,
        }
        for k, v in row.items():
            cols[k].append(v)
    return pa.table(cols, schema=OUTPUT_SCHEMA)
