"""The labeling job's model stage: a Ray Data actor holding one model (PyTorch lives here,
not in :mod:`pipelines.labeling`, whose CPU tasks then start without importing it)."""

from __future__ import annotations

import numpy as np

from pipelines.labeling import SCORE_NAMES
from pipelines.predictor import ModelActor


class Segmenter(ModelActor):
    """Actor stage: holds one model (built once per actor) and predicts batches, with each
    frame's confidence (:meth:`pipelines.predictor.Predictor.predict_scored`)."""

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
