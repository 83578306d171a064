"""The safe loader for notebooks and services: a registered version (``models:/NAME@ALIAS``,
``models:/NAME/VERSION``, ``models:/NAME/latest``) or a local model directory, as a
:class:`pipelines.inference.LaneModel`.

Instead of ``mlflow.pyfunc.load_model``, which unpickles ``python_model.pkl`` and imports the
code bundled with the version (anyone who can write to the artifact store runs code in the
caller), it does what the jobs do (:mod:`pipelines.registry.versions`): the URI resolved once
to a version, its two model files fetched as bytes and checked against the digests recorded at
registration, the weights loaded as data (``weights_only=True``). It lives here, not in
:mod:`pipelines.inference`, because resolving a URI needs the registry and inference comes
before it (tests/unit/test_package_rules.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from mlflow import MlflowClient

from pipelines.inference import LaneModel
from pipelines.inference.model import URI_SCHEME
from pipelines.inference.model_dir import SPEC_FILE
from pipelines.registry.versions import ARTIFACT_KEY, RegistryError, load_predictor, resolve_version
from pipelines.runtime import tracking

if TYPE_CHECKING:
    import torch


def load_model(
    uri: str | os.PathLike,
    *,
    tracking_uri: str | None = None,
    device: torch.device | str | None = None,
) -> LaneModel:
    """``uri`` as a :class:`~pipelines.inference.LaneModel` (``predict``, ``predict_scored``),
    loaded as data, never unpickled: a ``models:/`` URI through the registry at
    ``tracking_uri`` (default: ``MLFLOW_TRACKING_URI``, else the jobs' ``sqlite:///mlflow.db``;
    MLflow's process-wide URI is left alone), each file checked against its recorded digest;
    or a local path: a model directory (``model.pt`` + ``model.json``) or a registered
    version's downloaded folder (``artifacts/model_dir/`` inside; a local copy has no digests
    to check). ``device``: None picks the GPU if there is one.

    Raises a :class:`~pipelines.core.errors.UserError` with one line naming the URI: unknown
    model, version or alias (:class:`~pipelines.registry.versions.RegistryError`), a changed
    file (digest mismatch), a tracking server that does not answer
    (:class:`~pipelines.runtime.tracking.TrackingUnreachable`)."""
    text = os.fspath(uri)
    if not text.startswith("models:"):
        if URI_SCHEME.match(text):
            raise RegistryError(
                f"{text}: expected models:/NAME@ALIAS, models:/NAME/VERSION, "
                "models:/NAME/latest or a local model directory"
            )
        folder = Path(text).expanduser() / "artifacts" / ARTIFACT_KEY
        return LaneModel.from_dir(folder if (folder / SPEC_FILE).is_file() else text, device=device)
    client = _client(tracking_uri)
    ref = resolve_version(text, client)
    return LaneModel(load_predictor(ref, client, device), source=ref.uri)


def _client(uri: str | None) -> MlflowClient:
    """A client of the store at ``uri`` (tracking and registry), after checking it is there:
    a server that answers, a sqlite file that exists (MLflow would create an empty one)."""
    uri = tracking.tracking_uri(uri)
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :])
        if not path.is_file():
            raise tracking.TrackingError(
                f"MLflow store {uri}: no such database file; pass tracking_uri= or set "
                "MLFLOW_TRACKING_URI to the store the model is registered in"
            )
    tracking.check_tracking(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)
