"""The model actors of Ray Data pipelines: one :class:`~pipelines.inference.predictor.Predictor`
per actor, built once from the version's files (verified by the job's driver and shared through
Ray's object store: the actors neither download the model again nor talk to MLflow).

- :class:`Segmenter`: labeling's model stage (masks and per-frame scores);
- :class:`Scorer`: evaluation's (one confusion matrix per batch).
"""

from __future__ import annotations

import numpy as np
import torch

from pipelines.core.metrics import SCORE_NAMES, confusion_matrix
from pipelines.inference.predictor import Predictor


class ModelActor:
    """Base of the Ray Data actor stages (labeling's ``Segmenter``, evaluation's ``Scorer``):
    one :class:`Predictor` per actor, built once.

    ``model_files``: the version's files as bytes, verified by the driver
    (:func:`pipelines.registry.versions.fetch_verified`), or a Ray object reference to them: the
    actors neither download the model again nor talk to MLflow."""

    def __init__(self, model_files, actors: int = 1) -> None:
        import ray

        from pipelines.inference.device import ray_device
        from pipelines.ops.capacity import node_cpus

        if isinstance(model_files, ray.ObjectRef):
            model_files = ray.get(model_files)
        self.predictor = Predictor.from_files(model_files, ray_device())
        if self.predictor.device.type == "cpu":
            # Ray gives an actor the threads of the CPUs it reserves (one). Without a GPU the
            # model is the bottleneck and the read/decode tasks beside it are short, so the
            # model gets its node's CPUs, shared among the pool's ``actors``.
            torch.set_num_threads(max(1, node_cpus() // max(1, actors)))


class Segmenter(ModelActor):
    """Actor stage: holds one model (built once per actor) and predicts batches, with each
    frame's confidence (:meth:`pipelines.inference.predictor.Predictor.predict_scored`)."""

    def __init__(self, model_files, actors: int = 1, uncertain_below: float = 0.5) -> None:
        super().__init__(model_files, actors)
        self.uncertain_below = uncertain_below

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ok = batch["error"] == ""
        n = len(ok)
        masks = np.zeros(batch["prepared"].shape[:3], dtype=np.uint8)
        scores = {k: np.full(n, np.nan, dtype=np.float32) for k in SCORE_NAMES}
        if ok.any():  # error and deferred rows carry a zero placeholder: not predicted
            masks[ok], got = self.predictor.predict_scored(
                batch["prepared"][ok], self.uncertain_below
            )
            for k in SCORE_NAMES:
                scores[k][ok] = got[k]
        out = {k: v for k, v in batch.items() if k != "prepared"}
        out["small_mask"] = masks
        out.update(scores)
        return out


class Scorer(ModelActor):
    """Actor stage: a batch of shard rows -> one row holding the batch's confusion matrix
    (flattened, ``n_class * n_class``) and its frame count."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n_class = self.predictor.spec.n_class
        pred = self.predictor.predict_prepared(batch["image"])
        label = torch.as_tensor(np.array(batch["label"]))  # a copy: Ray's arrays are read-only
        conf = confusion_matrix(torch.from_numpy(pred), label, n_class)
        return {"confusion": conf.numpy().reshape(1, -1), "frames": np.array([len(pred)])}
