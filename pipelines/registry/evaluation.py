"""Evaluation of a model version on ingested shards, on the cluster: Ray Data streams the
split through a pool of model actors (a GPU each when the cluster has them), each batch comes
back as its confusion matrix (:func:`pipelines.inference.evaluate.evaluate`, the one the
training loop validates with), and the driver only sums them. Promotion uses it.

The driver of a promotion on KubeRay is the head pod, which has no GPU and no CPUs for work
(``num-cpus: 0``): it must never run the model itself.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pipelines.core.errors import UserError
from pipelines.core.frames import FrameTransform
from pipelines.core.labels import CLASS_NAMES
from pipelines.core.metrics import scores
from pipelines.data.shards import build_dataset
from pipelines.data.versions import resolve_dataset
from pipelines.inference.actors import Scorer
from pipelines.inference.model_dir import SPEC_FILE, ModelSpec


class EvaluationError(UserError):
    """A model and a dataset that cannot be compared."""


def evaluate_version(model_files: dict[str, bytes], data_uri: str, split: str = "val",
                     **options) -> dict:  # fmt: skip
    """One model's :func:`evaluate_versions`."""
    return evaluate_versions([model_files], data_uri, split, **options)[0]


def evaluate_versions(
    models: list[dict[str, bytes]],
    data_uri: str,
    split: str = "val",
    *,
    batch_size: int = 8,
    actors: int = 1,
    use_gpu: bool = False,
    on_frames: Callable[[int], None] | None = None,
) -> list[dict]:
    """For each model, its scores (pixel acc, mean class acc, mIoU, fwIoU, per-class IoU),
    ``frames`` and ``confusion`` on one split of an ingested dataset (a version folder; a
    dataset root is resolved to its current version), all in one pass: the split is read
    once and one pool of actors holds every model (a promotion's candidate and holder).
    ``models``: each model directory's files as bytes
    (:func:`pipelines.registry.versions.fetch_verified`), put in Ray's object store once for
    the actors. ``on_frames`` is called with the frames scored so far after each batch is
    summed.

    The shards hold frames already cropped and resized by ingest, so the dataset's transform
    must be each model's: otherwise a model would be scored on inputs it never sees when
    serving, and the comparison would be meaningless.
    """
    import ray

    specs = [ModelSpec.from_json(files[SPEC_FILE].decode()) for files in models]
    version = resolve_dataset(data_uri)
    data_uri = version.uri
    data = FrameTransform.from_dict(version.manifest["transform"]).geometry
    for spec in specs:
        if data != spec.transform.geometry:
            raise EvaluationError(
                f"{data_uri}: data was ingested with {data} but the model expects "
                f"{spec.transform.geometry}; re-ingest with the model's --size/--crop-top"
            )
    scored = build_dataset(data_uri, split).map_batches(
        Scorer,
        batch_size=batch_size,
        batch_format="numpy",
        fn_constructor_kwargs={"models": ray.put(models), "actors": actors},
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=1 if use_gpu else 0,
    )
    confs = [np.zeros((s.n_class, s.n_class), dtype=np.int64) for s in specs]
    frames = 0
    # One row per model batch: progress (the watchdog's beat) after each.
    for batch in scored.iter_batches(batch_size=1, batch_format="numpy"):
        for i, conf in enumerate(confs):
            conf += batch[f"confusion_{i}"].sum(axis=0).reshape(conf.shape)
        frames += int(batch["frames"].sum())
        if on_frames is not None:
            on_frames(frames)
    if frames == 0:
        raise EvaluationError(f"{data_uri}/{split}: no frames to evaluate")
    results = []
    for spec, conf in zip(specs, confs, strict=True):
        result = scores(conf, spec.class_names or CLASS_NAMES)
        results.append({**result, "frames": frames, "confusion": conf.tolist()})
    return results
