"""The registered model: an MLflow pyfunc around :class:`pipelines.inference.predictor.Predictor`,
and registration (the model directory logged as the pyfunc's artifact, tagged with its frame
transform and file digests).

Pyfunc contract: input a numpy batch of RGB frames, uint8, shape (N, H, W, 3), any N and any
H x W (crop, resize and normalization run inside); output (N, H, W) uint8 training-id masks at
the input's size. For MLflow-native clients (``mlflow models serve``, ``mlflow.pyfunc``), which
unpickle ``python_model.pkl`` and so trust the store; this project's code loads versions as
data instead, :func:`pipelines.registry.load_model` for notebooks and services (same masks).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

import fcn_models
import pipelines
from pipelines.core.frames import MIN_FRAME
from pipelines.inference import LaneModel
from pipelines.inference.model_dir import SPEC_FILE, ModelSpec
from pipelines.inference.predictor import Predictor
from pipelines.registry.versions import ARTIFACT_KEY, DIGEST_TAGS, TRANSFORM_TAG, sha256_file
from pipelines.runtime import tracking


class LaneSegmentationModel(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc: (N, H, W, 3) uint8 RGB frames -> (N, H, W) uint8 training-id masks, by
    :meth:`pipelines.inference.LaneModel.predict` (what ``pipelines.registry.load_model``
    returns, without the pickle)."""

    def load_context(self, context) -> None:
        directory = context.artifacts[ARTIFACT_KEY]
        self.model = LaneModel(Predictor.load(directory), source=str(directory))

    # ``model_input: np.ndarray``: MLflow wraps ``predict`` by its input's type hint when the
    # class is defined; without one, or with one it cannot check, it warns on every import
    # (every jobs.label and jobs.promote start). For np.ndarray it checks nothing and keeps
    # the logged signature (a uint8 (-1, -1, -1, 3) tensor), which it enforces before this runs.
    def predict(
        self, context, model_input: np.ndarray, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        # The signature's tensor is named: MLflow hands it over as {"frames": array}.
        if isinstance(model_input, dict) and len(model_input) == 1:
            model_input = next(iter(model_input.values()))
        return self.model.predict(model_input)


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


class _PickleWarningFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Passing a Python object as `python_model`")


@contextmanager
def _quiet_pickle_warning() -> Iterator[None]:
    """MLflow warns on every registration that a ``python_model`` object is pickled and that
    unpickling runs code. True, and known: the pickle exists only for MLflow-native clients
    that choose to trust the store (this module's docstring); the jobs and ``load_model``
    never read it (tests/integration/test_trust.py). Only that one message is dropped."""
    logger = logging.getLogger("mlflow.pyfunc")
    quiet = _PickleWarningFilter()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


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
        with _quiet_pickle_warning():
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
