"""The registered model: an MLflow pyfunc around :class:`pipelines.inference.predictor.Predictor`,
and registration (the model directory logged as the pyfunc's artifact, tagged with its frame
transform and file digests).

Pyfunc contract: input a numpy batch of RGB frames, uint8, shape (N, H, W, 3), any N and any
H x W (crop, resize and normalization run inside); output (N, H, W) uint8 training-id masks at
the input's size. ``mlflow.pyfunc.load_model("models:/NAME/VERSION")`` does this in a plain
Python process, no Ray needed.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

import fcn_models
import pipelines
from pipelines.core.frames import MIN_FRAME
from pipelines.inference.model_dir import SPEC_FILE, ModelSpec
from pipelines.inference.predictor import Predictor
from pipelines.ops import tracking
from pipelines.registry.versions import ARTIFACT_KEY, DIGEST_TAGS, TRANSFORM_TAG, sha256_file


class LaneSegmentationModel(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc: (N, H, W, 3) uint8 RGB frames -> (N, H, W) uint8 training-id masks."""

    def load_context(self, context) -> None:
        self.predictor = Predictor.load(context.artifacts[ARTIFACT_KEY])

    def predict(self, context, model_input, params=None) -> np.ndarray:
        # MLflow hands a named tensor input over as {name: array} after schema enforcement.
        if isinstance(model_input, dict) and len(model_input) == 1:
            model_input = next(iter(model_input.values()))
        frames = np.asarray(model_input)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(
                f"expected a uint8 batch of RGB frames shaped (N, H, W, 3), got shape "
                f"{frames.shape} dtype {frames.dtype}"
            )
        masks = self.predictor.predict(frames)
        if not masks:
            return np.zeros(frames.shape[:3], dtype=np.uint8)
        return np.stack(masks)


def signature() -> ModelSignature:
    # -1: any batch size and any frame size.
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, 3), name="frames")]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1), name="masks")]),
    )


def _pip_requirements(version: Callable[[str], str] | None = None) -> list[str]:
    """What the pyfunc needs, pinned to the versions that trained it, without a local
    version label: a local build's ``torch 2.13.0+cpu`` is served by no package index, and
    ``torch==2.13.0`` is the same release for whichever build (CPU, CUDA) rebuilds it."""
    from importlib.metadata import version as installed

    from packaging.version import Version

    version = version or installed
    return [
        f"{p}=={Version(version(p)).public}" for p in ("torch", "torchvision", "numpy", "pillow")
    ]


def log_model(
    model_dir: str | Path, *, registered_model_name: str | None, input_example: np.ndarray
):
    """Log a model directory as a pyfunc in the active run (and register it).

    The code of ``fcn_models`` and ``pipelines`` travels with the model (``code_paths``), so
    loading needs only the pip requirements, not this project installed.
    """
    code = [str(Path(fcn_models.__file__).parent), str(Path(pipelines.__file__).parent)]
    with tempfile.TemporaryDirectory() as tmp:
        # MLflow stores an artifact folder under its own name: a fixed one gives every version
        # the same layout, which the jobs read as data (artifacts/model_dir/model.pt).
        staged = shutil.copytree(model_dir, Path(tmp) / ARTIFACT_KEY)
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=LaneSegmentationModel(),
            artifacts={ARTIFACT_KEY: str(staged)},
            code_paths=code,
            signature=signature(),
            input_example=input_example,
            registered_model_name=registered_model_name,
            pip_requirements=_pip_requirements(),
        )


def register_model_dir(model_dir: str | Path, name: str, tags: dict[str, str]):
    """Log a model directory as a pyfunc in the active run, register it as a new version of
    ``name`` and tag that version with ``tags`` (secrets redacted) plus its frame transform.
    Returns the ``ModelVersion``."""
    spec = ModelSpec.from_json((Path(model_dir) / SPEC_FILE).read_text())
    t = spec.transform
    # A small valid frame: 64x64 keeps rows when the crop is relative to the source height;
    # with absolute crops, enough rows to survive them.
    rows = MIN_FRAME if t.source_height else max(MIN_FRAME, t.crop_top + t.crop_bottom + 32)
    example = np.zeros((1, rows, MIN_FRAME, 3), dtype=np.uint8)
    info = log_model(model_dir, registered_model_name=name, input_example=example)
    version = str(info.registered_model_version)
    client = MlflowClient()
    digests = {tag: sha256_file(Path(model_dir) / f) for f, tag in DIGEST_TAGS.items()}
    all_tags = {**tags, TRANSFORM_TAG: json.dumps(t.to_dict()), **digests}
    for k, v in tracking.redact(all_tags).items():
        client.set_model_version_tag(name, version, k, v)
    return client.get_model_version(name, version)
