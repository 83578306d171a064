"""Evaluation of a predictor on ingested shards with the one metrics implementation (used by
promotion; training evaluates inside its DDP loop with the same :mod:`pipelines.metrics`)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from pipelines.dataset import build_dataset
from pipelines.errors import UserError
from pipelines.frames import FrameTransform
from pipelines.labels import CLASS_NAMES
from pipelines.metrics import confusion_matrix, scores
from pipelines.predictor import Predictor
from pipelines.versions import resolve_dataset


class EvaluationError(UserError):
    """A model and a dataset that cannot be compared."""


def evaluate(
    predictor: Predictor,
    data_uri: str,
    split: str = "val",
    batch_size: int = 8,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Scores (pixel acc, mean class acc, mIoU, fwIoU, per-class IoU) and ``frames`` of the
    predictor on one split of an ingested dataset (a version folder; a dataset root is
    resolved to its current version). ``progress`` is called after each batch (a watchdog's
    ``beat``).

    The shards hold frames already cropped and resized by ingest, so the dataset's transform
    must be the model's: otherwise the model would be scored on inputs it never sees when
    serving, and the comparison would be meaningless.
    """
    version = resolve_dataset(data_uri)
    data_uri = version.uri
    data = FrameTransform.from_dict(version.manifest["transform"]).geometry
    model = predictor.transform.geometry
    if data != model:
        raise EvaluationError(
            f"{data_uri}: data was ingested with {data} but the model expects {model}; "
            "re-ingest with the model's --size/--crop-top"
        )
    n_class = predictor.spec.n_class
    conf = torch.zeros(n_class, n_class, dtype=torch.int64)
    frames = 0
    for batch in build_dataset(data_uri, split).iter_batches(
        batch_size=batch_size, batch_format="numpy"
    ):
        pred = predictor.predict_prepared(batch["image"])
        label = torch.as_tensor(np.array(batch["label"]))  # a copy: Ray's arrays are read-only
        conf += confusion_matrix(torch.from_numpy(pred), label, n_class)
        frames += len(pred)
        if progress is not None:
            progress(f"{frames} frames of {data_uri}/{split} scored")
    if frames == 0:
        raise EvaluationError(f"{data_uri}/{split}: no frames to evaluate")
    result = scores(conf.numpy(), predictor.spec.class_names or CLASS_NAMES)
    result["frames"] = frames
    result["confusion"] = conf.numpy().astype(np.int64).tolist()
    return result
