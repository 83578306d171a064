"""The stages of labeling, each a plain function of a batch of frames, without Ray: read +
validate the frames and, on CPU clusters, decode + crop/resize them (:func:`load_frames`) ->
predict (:class:`pipelines.inference.actors.Segmenter`, which on a GPU decodes and resizes the
JPEGs itself) -> the masks PNG-encoded at the frame size, in the output schema
(:func:`encode_results`). :class:`LabelStages` holds a run's options for them and runs all three
on a list of input rows in this process (:meth:`LabelStages.label`); the run's Ray Data
pipeline (:mod:`pipelines.labeling.dataset`) maps the same functions over its blocks.

This module, like the whole of :mod:`pipelines.labeling`, imports no PyTorch: a CPU task's
worker process starts without it (1-3 s of imports on a loaded node, measured in
benchmarks/RESULTS.md); only the model actors import it, when they start.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.core import labels
from pipelines.core.codecs import FrameError, decode_rgb, encode_png, open_rgb
from pipelines.core.frames import FrameTransform
from pipelines.data.sources import Limits, read_source
from pipelines.labeling.schema import OUTPUT_SCHEMA, SCORE_NAMES
from pipelines.runtime import progress
from pipelines.storage import Location, TransientStorageError

DEFERRED = "deferred"  # the status of a frame storage could not deliver: counted, never written
JPEG_MAGIC = b"\xff\xd8\xff"  # as pipelines.inference.device_frames (which imports PyTorch)


def load_frames(
    batch: dict[str, np.ndarray],
    *,
    kind: str,
    transform: FrameTransform,
    anchor: Location,
    limits: Limits,
    device_decode: bool = False,
) -> dict:
    """CPU stage: read, validate and prepare frames. A bad frame becomes an error row with a
    zero placeholder (batches need one shape), never an exception; a frame storage could not
    deliver after retries is marked ``deferred`` (no row: the next run tries again).

    ``device_decode`` (GPU actors): a JPEG is only read and its header checked here (size,
    mode, pixel limit, rows left after the crop); its bytes go to the model actor as
    ``encoded``, which decodes and resizes it on the GPU. Other formats (PNG) are decoded
    here as on a CPU cluster."""
    n = len(batch["source"])
    prepared = np.zeros((n, transform.height, transform.width, 3), dtype=np.uint8)
    heights, widths = np.zeros(n, dtype=np.int32), np.zeros(n, dtype=np.int32)
    errors = np.full(n, "", dtype=object)
    encoded = np.full(n, b"", dtype=object)
    deferred = np.zeros(n, dtype=bool)
    for i in range(n):
        try:
            if kind == "shards":
                data = bytes(batch["image"][i])
                what = "shard image"
            else:
                data = read_source(anchor, batch["source"][i], "frame", int(batch["bytes"][i]),
                                   limits)  # fmt: skip
                what = "frame"
            if device_decode and data.startswith(JPEG_MAGIC):
                img = open_rgb(data, max_pixels=limits.max_pixels, what=what)
                widths[i], heights[i] = img.size
                if kind != "shards":
                    transform.crop_rows(int(heights[i]), int(widths[i]))  # FrameError if none left
                encoded[i] = data
            elif kind == "shards":
                # Shard images were cropped and resized at ingest: model input already.
                frame = decode_rgb(data, what=what)
                heights[i], widths[i] = frame.shape[:2]
                prepared[i] = frame
            else:
                # Decoded at the reduced size the model input allows (JPEG DCT scaling).
                prepared[i], (heights[i], widths[i]) = transform.load_image(
                    data, max_pixels=limits.max_pixels
                )
        except FrameError as e:
            errors[i] = str(e)
        except TransientStorageError as e:
            errors[i], deferred[i] = str(e), True
            print(f"deferred to the next run: {e}", flush=True)
        except Exception as e:  # a decoder failing in a way it does not report: the row says so
            errors[i] = f"could not read frame ({type(e).__name__}: {e})"
    out = {
        "image_id": batch["image_id"],
        "source": batch["source"],
        "prepared": prepared,
        "height": heights,
        "width": widths,
        "error": errors,
        "deferred": deferred,
    }
    if device_decode:
        out["encoded"] = encoded
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
    reports=None,
) -> pa.Table:
    """CPU stage: masks back to the frame size, PNG-encoded, in the output schema. A deferred
    frame's row has status ``deferred``: the run counts it and writes no row for it. ``reports``: the job's :class:`~pipelines.runtime.progress.ProgressActor`,
    given the batch's frames (the job's progress lines)."""
    cols: dict[str, list] = {name: [] for name in OUTPUT_SCHEMA.names}
    for i in range(len(batch["source"])):
        deferred = bool(batch["deferred"][i])
        error = str(batch["error"][i])
        h, w = int(batch["height"][i]), int(batch["width"][i])
        mask = apollo_png = pixels = None
        if not error:
            small = batch["small_mask"][i]
            if kind == "shards":  # shard frames are model inputs: the mask is at their size
                mask, pixels = encode_png(small), labels.class_pixel_counts(small)
                if apollo:
                    apollo_png = encode_png(labels.to_apollo_ids(small))
            else:
                # Encoded and counted from the small mask: building and counting the full-size
                # one cost ~30 ms a frame (bench_label_stages).
                mask = transform.restored_png(small, (h, w))
                pixels = transform.restored_pixel_counts(small, (h, w))
                if apollo:
                    apollo_png = transform.restored_png(labels.to_apollo_ids(small), (h, w))
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
            "status": DEFERRED if deferred else "error" if error else "ok",
            "error": error or None,
            "labeled_at": labeled_at,
        }
        for k, v in row.items():
            cols[k].append(v)
    progress.report(reports, len(batch["source"]))
    return pa.table(cols, schema=OUTPUT_SCHEMA)


def _score(v) -> float | None:
    v = float(v)
    return None if np.isnan(v) else v


@dataclass(frozen=True)
class LabelStages:
    """A run's options for the stages: what the inputs are (``kind``, the prefix or dataset
    version ``anchor``), the model version's name and transform, the read limits, and what
    to write."""

    kind: str  # "raw" frames under a prefix, or "shards" of an ingested dataset
    # The inputs' prefix (raw) or dataset version folder (shards), resolved once by the run's
    # driver: its tasks read with the driver's endpoint and settings, whatever their own env.
    anchor: Location
    transform: FrameTransform
    model_name: str
    model_version: str
    limits: Limits
    apollo_ids: bool = False
    device_decode: bool = False  # GPU actors decode JPEGs themselves

    def load(self, batch: dict[str, np.ndarray]) -> dict:
        return load_frames(batch, kind=self.kind, transform=self.transform,
                           anchor=self.anchor, limits=self.limits,
                           device_decode=self.device_decode)  # fmt: skip

    def encode(self, batch: dict[str, np.ndarray], labeled_at: datetime,
               reports=None) -> pa.Table:  # fmt: skip
        return encode_results(batch, kind=self.kind, transform=self.transform,
                              model_name=self.model_name, model_version=self.model_version,
                              apollo=self.apollo_ids, labeled_at=labeled_at,
                              reports=reports)  # fmt: skip

    def label(self, rows: list[dict], segment: Callable[[dict], dict],
              labeled_at: datetime) -> pa.Table:  # fmt: skip
        """Input rows (:func:`pipelines.labeling.inputs.list_inputs`) -> their output rows,
        every stage in this process: ``segment`` is the model stage (a ``Segmenter``)."""
        batch = source_batch(self.kind, rows, self.anchor)
        return self.encode(segment(self.load(batch)), labeled_at)


def source_batch(kind: str, rows: list[dict], anchor: Location) -> dict[str, np.ndarray]:
    """Input rows as the batch the load stage reads: a raw frame's ``source`` and listed
    ``bytes``; a shard row's ``source`` and ``image`` (read from its shard file, on
    ``anchor``'s filesystem)."""
    if kind != "shards":
        cols = ("image_id", "source", "bytes")
        return {k: np.array([r[k] for r in rows], dtype=object) for k in cols}
    images = {}
    for shard in dict.fromkeys(r["shard"] for r in rows):
        with anchor.fs.open_input_file(shard) as f:
            table = pq.read_table(f, columns=["source_image", "image"])
        images.update(zip(table["source_image"].to_pylist(), table["image"].to_pylist(),
                          strict=True))  # fmt: skip
    return {
        "image_id": np.array([r["image_id"] for r in rows], dtype=object),
        "source": np.array([r["source"] for r in rows], dtype=object),
        "image": np.array([images[r["source"]] for r in rows], dtype=object),
    }
