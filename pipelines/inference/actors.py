"""The model stages of Ray Data pipelines: a :class:`~pipelines.inference.predictor.Predictor`
per model and actor, built once from the version's files (verified by the job's driver and shared through
Ray's object store: the actors neither download the model again nor talk to MLflow).

- :class:`Segmenter`: labeling's model stage (masks and per-frame scores);
- :class:`Scorer`: evaluation's (a confusion matrix per batch and model, by
  :func:`pipelines.inference.evaluate.evaluate`).

Called in this process (``device=...``), they are the same stages without Ray.
"""

from __future__ import annotations

import numpy as np
import torch

from pipelines.core.metrics import SCORE_NAMES
from pipelines.inference.device import raise_if_device_failed
from pipelines.inference.evaluate import evaluate
from pipelines.inference.predictor import Predictor
from pipelines.runtime import faults


def actor_predictor(model_files, actors: int = 1, max_batch: int = 8,
                    device: torch.device | str | None = None) -> Predictor:  # fmt: skip
    """One model's :class:`Predictor` for a model stage. ``model_files``: the version's files
    as bytes, verified by the driver (:func:`pipelines.registry.versions.fetch_verified`), or a
    Ray object reference to them: the actors neither download the model again nor talk to
    MLflow. ``device``: None in a Ray actor, which runs on the GPU Ray gave it (checked usable)
    or on its node's CPUs, shared among the pool's ``actors``."""
    if not isinstance(model_files, dict):  # a Ray object reference
        import ray

        model_files = ray.get(model_files)
    in_ray = device is None
    if in_ray:
        from pipelines.inference.device import ray_device

        device = ray_device()
    predictor = Predictor.from_files(model_files, device, max_batch=max_batch)
    if in_ray and predictor.device.type == "cpu":
        from pipelines.runtime.capacity import node_cpus

        # Ray gives an actor the threads of the CPUs it reserves (one). Without a GPU the
        # model is the bottleneck and the read/decode tasks beside it are short, so the model
        # gets its node's CPUs, shared among the pool's ``actors``.
        torch.set_num_threads(max(1, node_cpus() // max(1, actors)))
    return predictor


class Segmenter:
    """Labeling's model stage: holds one model (built once per actor: :func:`actor_predictor`)
    and predicts batches, with each frame's confidence (:meth:`pipelines.inference.predictor.Predictor.predict_scored`).

    Rows with ``encoded`` JPEG bytes (the GPU path, see
    :func:`pipelines.labeling.stages.load_frames`) are decoded and resized here, on the
    actor's device; a frame that cannot be becomes an error row. The other rows bring their
    ``prepared`` input, decoded by the CPU stage."""

    def __init__(self, model_files, actors: int = 1, uncertain_below: float = 0.5,
                 max_batch: int = 8, inputs_prepared: bool = False,
                 device: torch.device | str | None = None) -> None:  # fmt: skip
        self.predictor = actor_predictor(model_files, actors, max_batch, device)
        self.uncertain_below = uncertain_below
        self.inputs_prepared = inputs_prepared

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        errors = np.array(batch["error"], dtype=object)  # a copy: Ray's arrays are read-only
        x = torch.from_numpy(np.require(batch["prepared"], requirements="CW"))
        encoded = batch.get("encoded")
        if encoded is not None:
            todo = [i for i, e in enumerate(encoded) if len(e) and errors[i] == ""]
            if todo:
                x = x.to(self.predictor.device)
                got, why = self.predictor.prepare_encoded(
                    [bytes(encoded[i]) for i in todo], prepared=self.inputs_prepared
                )
                x[todo] = got
                for i, e in zip(todo, why, strict=True):
                    errors[i] = e
        ok = errors == ""
        n = len(ok)
        masks = np.zeros(x.shape[:3], dtype=np.uint8)
        scores = {k: np.full(n, np.nan, dtype=np.float32) for k in SCORE_NAMES}
        if ok.any():  # error and deferred rows carry a zero placeholder: not predicted
            idx = torch.from_numpy(np.flatnonzero(ok)).to(x.device)
            try:
                faults.point("label.predict", device=str(x.device))
                masks[ok], got = self.predictor.predict_scored(x[idx], self.uncertain_below)
            except Exception as e:  # a CUDA error is one line and exit 7, not a traceback
                raise_if_device_failed(e, x.device, "predicting")
                raise
            for k in SCORE_NAMES:
                scores[k][ok] = got[k]
        out = {k: v for k, v in batch.items() if k not in ("prepared", "encoded")}
        out["error"] = errors
        out["small_mask"] = masks
        out.update(scores)
        return out


class Scorer:
    """Evaluation's model stage: a batch of shard rows -> one row holding, for each model, the
    batch's confusion matrix (``confusion_I``, flattened, by
    :func:`pipelines.inference.evaluate.evaluate`) and the frame count. Several models in one
    actor: a promotion scores the candidate and the holder in one pass over the data, with
    one pool of actors. ``models``: each model's files, as :func:`actor_predictor` takes them
    (or a Ray object reference to the list)."""

    def __init__(self, models, actors: int = 1, max_batch: int = 8,
                 device: torch.device | str | None = None) -> None:  # fmt: skip
        if not isinstance(models, list):  # a Ray object reference
            import ray

            models = ray.get(models)
        self.predictors = [actor_predictor(m, actors, max_batch, device) for m in models]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {"frames": np.array([len(batch["image"])])}
        for i, p in enumerate(self.predictors):
            conf = evaluate(p.model, p.batches(batch["image"], batch["label"]), p.spec.n_class,
                            autocast=p.autocast())  # fmt: skip
            out[f"confusion_{i}"] = conf.cpu().numpy().reshape(1, -1)
        return out
