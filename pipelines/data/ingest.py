"""Ingest's work on records, without Ray: read and convert one image/label pair
(:func:`process_pair`), a batch of candidates into processed rows whose failures are reasons
(:func:`process_batch`), the valid rows of a block (:func:`valid_rows`) and the shard file each
goes to (:func:`place_rows`). The ingest workflow (:mod:`pipelines.data.workflow`) runs them as
Ray Data stages.

Label ids that are not in the label map become the ignore index and are counted in
``unknown_ids``.
"""

from __future__ import annotations

import io
import json

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.core import labels
from pipelines.core.codecs import FrameError, decode_label, encode_jpeg, encode_png
from pipelines.core.frames import FrameTransform
from pipelines.data.discover import Discovery
from pipelines.data.shards import (
    SHARD_COLUMNS,
    SHARD_SCHEMA,
    SPLITS,
    shard_order_key,
)
from pipelines.data.sources import Limits, read_source
from pipelines.runtime import progress
from pipelines.storage import Location, TransientStorageError, resolve


# -- processing one record ----------------------------------------------------------------------
def process_pair(
    image: bytes, label: bytes, transform: FrameTransform, max_pixels: int | None = None
) -> dict:
    """Validate and convert one pair. Raises :class:`FrameError` with the reason to reject."""
    # Decoded at the reduced size the model input allows (JPEG DCT scaling), as labeling does.
    small, (h, w) = transform.load_image(image, max_pixels=max_pixels, what="image")
    ids = decode_label(label, max_pixels=max_pixels, what="label")
    if (h, w) != ids.shape:
        raise FrameError(f"image is {w}x{h} but label is {ids.shape[1]}x{ids.shape[0]} (W x H)")
    train_ids, unknown = labels.to_train_ids(transform.prepare_label(ids))
    return {
        "image": encode_jpeg(small),
        "label": encode_png(train_ids),
        "height": int(small.shape[0]),
        "width": int(small.shape[1]),
        "class_pixels": labels.class_pixel_counts(train_ids),
        "ignore_pixels": int((train_ids == labels.IGNORE_INDEX).sum()),
        "unknown_ids": json.dumps(unknown),
    }


# One schema for every processed block, even an empty one or one whose rows were all rejected
# (a block built from pandas without rows has no columns, and the shuffle that groups rows into
# files refuses to concatenate it with the others).
PROCESSED_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("source_image", pa.string()),
        ("source_label", pa.string()),
        ("drive", pa.string()),
        ("split", pa.string()),
        ("reason", pa.string()),  # why the record is not in a shard; "" when it is
        ("unreadable", pa.bool_()),  # storage failed (transiently) after retries: not bad data
        ("image", pa.binary()),
        ("label", pa.binary()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("class_pixels", pa.list_(pa.int64())),
        ("ignore_pixels", pa.int64()),
        ("unknown_ids", pa.string()),
        ("nbytes", pa.int64()),
    ]
)


def process_batch(
    batch: pd.DataFrame, transform: FrameTransform, locate: Location, limits: Limits, reports=None
) -> pa.Table:
    """Ray Data stage: read + process each candidate of the batch; failures become reasons.
    ``reports``: the job's :class:`~pipelines.runtime.progress.ProgressActor`, given the batch's
    count when it is done."""
    out = []
    for row in batch.to_dict("records"):
        rec = {
            **{k: row[k] for k in ("image_id", "source_image", "source_label", "drive", "split")},
            "reason": row["reason"],
            "unreadable": False,
            "image": b"",
            "label": b"",
            "height": 0,
            "width": 0,
            "class_pixels": [0] * labels.N_CLASSES,
            "ignore_pixels": 0,
            "unknown_ids": "{}",
            "nbytes": 0,
        }
        if not rec["reason"]:
            try:
                image = read_source(locate, rec["source_image"], "image", row["image_size"], limits)
                label = read_source(locate, rec["source_label"], "label", row["label_size"], limits)
                rec.update(process_pair(image, label, transform, limits.max_pixels))
                rec["nbytes"] = len(rec["image"]) + len(rec["label"])
            except FrameError as e:
                rec["reason"] = str(e)
            except TransientStorageError as e:
                rec["reason"], rec["unreadable"] = str(e), True
        out.append(rec)
    progress.report(reports, len(out))
    return pa.Table.from_pylist(out, schema=PROCESSED_SCHEMA)


def valid_rows(batch: pa.Table, file_of: dict[str, str]) -> pa.Table:
    """Ray Data stage: the valid rows of a block with the shard file (relative to the
    version folder) each goes to; an explicit schema even when no row is valid."""
    ok = pc.equal(batch["reason"], "")
    valid = batch.filter(ok).select(list(SHARD_COLUMNS))
    files = [file_of[i] for i in valid["image_id"].to_pylist()]
    table = valid.append_column("file", pa.array(files, pa.string()))
    return table.cast(SHARD_SCHEMA.append(pa.field("file", pa.string())))


def source_height(found: Discovery, source: str, limits: Limits, tries: int = 5) -> int | None:
    """The height of the delivery's frames, from the header of the first that can be opened
    (a few tries: a broken first file must not decide): what the crops are counted in, so a
    frame of the same camera at another resolution is cropped by the same fraction. None when
    none opens (nothing valid to ingest anyway)."""
    from PIL import Image

    anchor = resolve(source)
    for c in [c for c in found.candidates if not c.reason and c.image][:tries]:
        try:
            data = read_source(anchor, c.image, "image", c.image_size, limits)
            return Image.open(io.BytesIO(data)).size[1]
        except Exception:  # noqa: BLE001 - that record's own processing reports why
            continue
    return None


def place_rows(meta: pd.DataFrame, rows_per_file: int, seed: int) -> dict[str, str]:
    """The shard file (relative to the version folder) of each valid row, decided before any
    is written so that a re-run writes the same rows to the same files. (Ray Data's own Parquet
    sink fills files in whatever order blocks arrive.) The order is a seeded hash of the id, not
    the id itself: sorted ids are consecutive video frames of one camera, and every file and
    every run of rows in it would hold one drive; training reads files and rows in streams, so
    each stream must already mix drives."""
    ok = meta["reason"] == ""
    file_of: dict[str, str] = {}
    for split in SPLITS:
        ids = sorted(
            meta.loc[ok & (meta["split"] == split), "image_id"],
            key=lambda i: shard_order_key(i, seed),
        )
        file_of.update(
            {i: f"{split}/{split}-{n // rows_per_file:05d}.parquet" for n, i in enumerate(ids)}
        )
    return file_of
