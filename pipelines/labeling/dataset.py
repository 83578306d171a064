"""The Ray Data adapter of a labeling run: the stages of :mod:`pipelines.labeling.stages` as one
streaming pipeline over the run's input rows. Load and encode run as CPU tasks; the model stage
as a pool of actors (a GPU each when asked), each holding one model built once.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import numpy as np

from pipelines import compat
from pipelines.labeling.stages import LabelStages


class ModelStage:
    """Actor stage: labeling's model (:class:`pipelines.inference.actors.Segmenter`), imported
    when the actor starts, so that neither the driver nor the CPU tasks import PyTorch."""

    def __init__(self, **kwargs: Any) -> None:
        from pipelines.inference.actors import Segmenter

        self.segment = Segmenter(**kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.segment(batch)


def label_dataset(stages: LabelStages, rows: list[dict], *, model_files: Any, actors: int,
                  use_gpu: bool, batch_size: int, uncertain_below: float, labeled_at: datetime,
                  reports: Any = None):  # fmt: skip
    """The Ray dataset of these input rows' output rows (lazy: iterating it runs it).
    ``model_files``: a Ray object reference to the version's verified files, read by every
    actor; ``reports``: the run's ProgressActor."""
    import ray

    # Without GPUs, the load and encode tasks reserve half a CPU: they are short next to a
    # model step, and with the same reservation as the model actors Ray Data would fuse the
    # load stage into them, decoding in the actor, one frame after the other.
    task_cpus = 1.0 if use_gpu else 0.5
    return (
        source(stages, rows)
        .map_batches(stages.load, batch_size=4, batch_format="numpy", num_cpus=task_cpus)
        .map_batches(
            ModelStage, batch_size=batch_size, batch_format="numpy",
            fn_constructor_kwargs={"model_files": model_files, "actors": actors,
                                   "uncertain_below": uncertain_below, "max_batch": batch_size,
                                   "inputs_prepared": stages.kind == "shards"},
            compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=1 if use_gpu else 0,
        )
        .map_batches(stages.encode, batch_size=8, batch_format="numpy", num_cpus=task_cpus,
                     fn_kwargs={"labeled_at": labeled_at, "reports": reports})
    )  # fmt: skip


def source(stages: LabelStages, rows: list[dict]):
    """The input rows as a Ray dataset: raw rows as items; shard rows read from the shards that
    hold them (each once), with their images."""
    import ray

    if stages.kind != "shards":
        # Up to 256 blocks: enough read tasks to spread, few enough to plan at once.
        return ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows), 256)))
    wanted = {r["source"] for r in rows}
    return (
        compat.read_parquet_v1(
            shards_of(rows),
            filesystem=stages.anchor.fs,
            columns=["image_id", "source_image", "image"],
        )  # fmt: skip
        .rename_columns({"source_image": "source"})
        .filter(lambda r: r["source"] in wanted)
    )


def shards_of(rows: list[dict]) -> list[str]:
    """The shard files that hold these input rows, each once, in order: a run reads each
    shard of an ingested dataset once (and none that holds nothing left to label)."""
    return list(dict.fromkeys(r["shard"] for r in rows))
