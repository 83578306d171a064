"""Registered model versions as the jobs use them: ``models:/`` URIs resolved once to a version,
the frame transform a version expects (a tag: no download), and its files loaded as data,
each checked against the digest recorded at registration.

Nothing of a version is unpickled or imported: its pyfunc wrapper (``python_model.pkl``, bundled
code, :mod:`pipelines.registry.pyfunc`) is for outside clients that choose to trust the store.
No PyTorch here: labeling's driver resolves and verifies versions without it.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from pipelines.core.errors import UserError
from pipelines.core.frames import FrameTransform
from pipelines.inference.model_dir import MODEL_FILE, SPEC_FILE

ARTIFACT_KEY = "model_dir"  # the pyfunc's artifact: artifacts/model_dir/{model.pt,model.json}
TRANSFORM_TAG = "frame_transform"  # version tag: the FrameTransform the model expects (JSON)
# Version tags: the sha256 of each file of the model directory, recorded at registration and
# checked by every load (a changed file in the artifact store is refused, not run).
DIGEST_TAGS = {MODEL_FILE: "weights_sha256", SPEC_FILE: "spec_sha256"}


class RegistryError(UserError):
    """A model URI, name, version or alias that does not resolve."""


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/]+)|@(?P<alias>[^/]+))$")


def resolve_version(model: str, client: MlflowClient | None = None) -> ModelRef:
    """``models:/NAME@ALIAS``, ``models:/NAME/VERSION`` or ``models:/NAME/latest`` -> the
    concrete version, resolved once (a job pins it, so a promotion during a run changes
    nothing mid-way)."""
    client = client or MlflowClient()
    m = _MODELS_URI.match(model.strip())
    if not m:
        raise RegistryError(
            f"{model!r}: expected models:/NAME@ALIAS, models:/NAME/VERSION or models:/NAME/latest"
        )
    name = m["name"]
    try:
        if m["alias"]:
            mv = client.get_model_version_by_alias(name, m["alias"])
        elif m["version"] == "latest":
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise RegistryError(f"registered model {name!r} has no versions")
            mv = max(versions, key=lambda v: int(v.version))
        else:
            mv = client.get_model_version(name, m["version"])
    except mlflow.exceptions.MlflowException as e:
        raise RegistryError(f"{model}: {e.message}") from None
    return ModelRef(name=name, version=str(mv.version))


def version_transform(ref: ModelRef, client: MlflowClient | None = None) -> FrameTransform:
    """The frame transform a registered version was trained with, from its tag (no download:
    labeling prepares frames on CPU workers before any model is loaded)."""
    tags = (client or MlflowClient()).get_model_version(ref.name, ref.version).tags
    if TRANSFORM_TAG not in tags:
        raise RegistryError(
            f"{ref.uri} has no {TRANSFORM_TAG} tag (it was not registered by jobs.train)"
        )
    return FrameTransform.from_dict(json.loads(tags[TRANSFORM_TAG]))


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_verified(ref: ModelRef, client: MlflowClient | None = None) -> dict[str, bytes]:
    """The version's model directory files ({MODEL_FILE: ..., SPEC_FILE: ...}) as bytes,
    each checked against the digest recorded at registration, or :class:`RegistryError`.
    The labeling driver fetches them once and shares them with its actors (Ray's object
    store), so a changed file is one clear error before any actor starts and no actor
    downloads the model again."""
    client = client or MlflowClient()
    try:
        version = client.get_model_version(ref.name, ref.version)
        base = client.get_model_version_download_uri(ref.name, ref.version).rstrip("/")
    except mlflow.exceptions.MlflowException as e:
        raise RegistryError(f"{ref.uri}: {e.message}") from None
    missing = [tag for tag in DIGEST_TAGS.values() if not version.tags.get(tag)]
    if missing:
        raise RegistryError(
            f"{ref.uri} has no {' / '.join(missing)} tag: it was not registered by this "
            "version of jobs.train, so its files cannot be checked; register it again"
        )
    files = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, tag in DIGEST_TAGS.items():
            try:
                # The client's store, not the process's: a notebook's load_model(tracking_uri=)
                # leaves MLflow's global URI alone (``mlflow-artifacts:`` resolves against it).
                path = mlflow.artifacts.download_artifacts(
                    artifact_uri=f"{base}/artifacts/{ARTIFACT_KEY}/{name}",
                    dst_path=tmp,
                    tracking_uri=client.tracking_uri,
                )
                data = Path(path).read_bytes()
            except (mlflow.exceptions.MlflowException, OSError) as e:
                raise RegistryError(
                    f"{ref.uri}: cannot read its {name} ({type(e).__name__}: {e})"
                ) from None
            actual, expected = hashlib.sha256(data).hexdigest(), version.tags[tag]
            if actual != expected:
                raise RegistryError(
                    f"{ref.uri}: {name} has sha256 {actual}, not the {expected} recorded at "
                    f"registration (tag {tag}): the stored file was changed; refusing to load it"
                )
            files[name] = data
    return files


def load_predictor(ref: ModelRef, client: MlflowClient | None = None, device=None):
    """A registered version loaded as data: its model directory's weights
    (``weights_only=True``) and spec (JSON), rebuilt by this project's ``build_model``, each
    file checked against the digest recorded at registration. Nothing of the version is
    unpickled or imported: its pyfunc wrapper (``python_model.pkl``, bundled code) is for
    clients that choose to trust the store. ``device``: as ``Predictor``'s (None: the GPU if
    there is one)."""
    from pipelines.inference.predictor import Predictor

    return Predictor.from_files(fetch_verified(ref, client), device)


def logged_model_id(version) -> str | None:
    """The MLflow 3 logged model (``m-...``) a registered version was created from: its
    ``model_id``, or, where the registry store does not keep that field (the sqlite store),
    the id in its ``models:/m-...`` source. None for a version registered otherwise."""
    if getattr(version, "model_id", None):
        return version.model_id
    match = re.fullmatch(r"models:/(m-[0-9a-f]+)(/.*)?", version.source or "")
    return match.group(1) if match else None
