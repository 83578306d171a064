"""The Ray Data pipeline of a labeling run: read + validate frames, and on CPU clusters
decode + crop/resize them (CPU tasks) -> predict (one model per actor, a GPU each when asked,
which then decodes and resizes the JPEGs itself: :class:`ModelStage`) -> the masks PNG-encoded
at the frame size (CPU tasks).

This module, like the whole of :mod:`pipelines.labeling`, imports no PyTorch: a CPU task's
worker process starts without it (1-3 s of imports on a loaded node, measured in
benchmarks/RESULTS.md); only the model actors import it, when they start.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines import compat
from pipelines.core import labels
from pipelines.core.codecs import FrameError, decode_rgb, encode_png, open_rgb
from pipelines.core.frames import FrameTransform
from pipelines.data.sources import Limits, read_source
from pipelines.labeling.inputs import Inputs
from pipelines.labeling.schema import OUTPUT_SCHEMA, SCORE_NAMES
from pipelines.ops import progress
from pipelines.storage import Location, TransientStorageError, resolve

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


class ModelStage:
    """Actor stage: labeling's model (:class:`pipelines.inference.actors.Segmenter`), imported
    when the actor starts, so that neither the driver nor the CPU tasks import PyTorch."""

    def __init__(self, **kwargs: Any) -> None:
        from pipelines.inference.actors import Segmenter

        self.segment = Segmenter(**kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.segment(batch)


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
    frame's row has status ``deferred``: the run counts it and writes no row for it. ``reports``: the job's :class:`~pipelines.ops.progress.ProgressActor`,
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
class Pipeline:
    """A run's pipeline: the inputs, the model version (its files in Ray's object store) and its
    transform, the actor pool and the output options."""

    inputs: Inputs
    transform: FrameTransform
    model_name: str
    model_version: str
    model_files: Any  # ray.ObjectRef of the verified {file name: bytes}
    actors: int
    use_gpu: bool
    batch_size: int
    limits: Limits
    apollo_ids: bool
    uncertain_below: float
    reports: Any = None  # the run's ProgressActor

    def dataset(self, rows: list[dict], labeled_at: datetime):
        """The Ray dataset of these input rows' output rows (lazy: iterating it runs it)."""
        import ray

        # Without GPUs, the load and encode tasks reserve half a CPU: they are short next to a
        # model step, and with the same reservation as the model actors Ray Data would fuse
        # the load stage into them, decoding in the actor, one frame after the other.
        task_cpus = 1.0 if self.use_gpu else 0.5
        kind = self.inputs.kind
        return (
            self._source(rows)
            .map_batches(
                load_frames, batch_size=4, batch_format="numpy", num_cpus=task_cpus,
                fn_kwargs={"kind": kind, "transform": self.transform,
                           "anchor": resolve(self.inputs.uri), "limits": self.limits,
                           "device_decode": self.use_gpu},
            )
            .map_batches(
                ModelStage, batch_size=self.batch_size, batch_format="numpy",
                fn_constructor_kwargs={"model_files": self.model_files, "actors": self.actors,
                                       "uncertain_below": self.uncertain_below,
                                       "max_batch": self.batch_size,
                                       "inputs_prepared": kind == "shards"},
                compute=ray.data.ActorPoolStrategy(size=self.actors),
                num_gpus=1 if self.use_gpu else 0,
            )
            .map_batches(
                encode_results, batch_size=8, batch_format="numpy", num_cpus=task_cpus,
                fn_kwargs={"kind": kind, "transform": self.transform,
                           "model_name": self.model_name, "model_version": self.model_version,
                           "apollo": self.apollo_ids, "labeled_at": labeled_at,
                           "reports": self.reports},
            )
        )  # fmt: skip

    def _source(self, rows: list[dict]):
        import ray

        if self.inputs.kind != "shards":
            # Up to 256 blocks: enough read tasks to spread, few enough to plan at once.
            return ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 256)))
        wanted = {r["source"] for r in rows}
        root = resolve(self.inputs.uri)  # the version resolved once, in list_inputs
        return (
            compat.read_parquet_v1(
                shards_of(rows),
                filesystem=root.fs,
                columns=["image_id", "source_image", "image"],
            )
            .rename_columns({"source_image": "source"})
            .filter(lambda r: r["source"] in wanted)
        )


def shards_of(rows: list[dict]) -> list[str]:
    """The shard files that hold these input rows, each once, in order: a run reads each
    shard of an ingested dataset once (and none that holds nothing left to label)."""
    return list(dict.fromkeys(r["shard"] for r in rows))
