"""The registered model: an MLflow pyfunc around :class:`pipelines.predictor.Predictor`, and the
registry operations the jobs share (resolve ``models:/`` URIs, load, aliases with history).

Pyfunc contract: input a numpy batch of RGB frames, uint8, shape (N, H, W, 3), any N and any
H x W (crop, resize and normalization run inside); output (N, H, W) uint8 training-id masks at
the input's size. ``mlflow.pyfunc.load_model("models:/NAME/VERSION")`` does this in a plain
Python process, no Ray needed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

import fcn_models
import pipelines
from pipelines import tracking
from pipelines.errors import UserError
from pipelines.frames import MIN_FRAME, FrameTransform
from pipelines.predictor import MODEL_FILE, SPEC_FILE, ModelSpec, Predictor

ARTIFACT_KEY = "model_dir"
TRANSFORM_TAG = "frame_transform"  # version tag: the FrameTransform the model expects (JSON)
# Version tags: the sha256 of each file of the model directory, recorded at registration and
# checked by every load (a changed file in the artifact store is refused, not run).
DIGEST_TAGS = {MODEL_FILE: "weights_sha256", SPEC_FILE: "spec_sha256"}
PREVIOUS_ALIAS_TAG = "previous_{alias}"  # registered-model tag: version that held the alias before


log = logging.getLogger(__name__)


class RegistryError(UserError):
    """A model URI, name, version or alias that does not resolve."""


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


def version_transform(ref: ModelRef, client: MlflowClient | None = None) -> FrameTransform:
    """The frame transform a registered version was trained with, from its tag (no download:
    labeling prepares frames on CPU workers before any model is loaded)."""
    tags = (client or MlflowClient()).get_model_version(ref.name, ref.version).tags
    if TRANSFORM_TAG not in tags:
        raise RegistryError(
            f"{ref.uri} has no {TRANSFORM_TAG} tag (it was not registered by jobs.train)"
        )
    return FrameTransform.from_dict(json.loads(tags[TRANSFORM_TAG]))


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


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_predictor(ref: ModelRef, client: MlflowClient | None = None) -> Predictor:
    """A registered version loaded as data: its model directory's weights
    (``weights_only=True``) and spec (JSON), rebuilt by this project's ``build_model``, each
    file checked against the digest recorded at registration. Nothing of the version is
    unpickled or imported: its pyfunc wrapper (``python_model.pkl``, bundled code) is for
    clients that choose to trust the store."""
    return Predictor.from_files(fetch_verified(ref, client))


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
                path = mlflow.artifacts.download_artifacts(
                    artifact_uri=f"{base}/artifacts/{ARTIFACT_KEY}/{name}", dst_path=tmp
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


def logged_model_id(version) -> str | None:
    """The MLflow 3 logged model (``m-...``) a registered version was created from: its
    ``model_id``, or, where the registry store does not keep that field (the sqlite store),
    the id in its ``models:/m-...`` source. None for a version registered otherwise."""
    if getattr(version, "model_id", None):
        return version.model_id
    match = re.fullmatch(r"models:/(m-[0-9a-f]+)(/.*)?", version.source or "")
    return match.group(1) if match else None


def alias_holder(name: str, alias: str, client: MlflowClient) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except mlflow.exceptions.MlflowException:
        return None


HISTORY_TAG = "alias_history_{alias}"  # registered-model tag: the alias's moves (JSON, newest last)
HISTORY_KEEP = 30  # entries kept (an MLflow tag value holds 5000 characters)
LOCK_NAME = "{name}.lock-{alias}"  # a registered model that exists only while a move is made
LOCK_TTL_S = 120.0  # a lock older than this was left by a killed job (the move takes seconds)


class AliasMoved(RegistryError):
    """The alias no longer points where the caller last saw it (compare-and-swap lost)."""


@contextmanager
def alias_lock(name: str, alias: str, client: MlflowClient, wait_s: float = 60.0):
    """Mutual exclusion for the moves of ``name@alias``, by every promote and rollback, on any
    machine: MLflow's only atomic operation is creating a registered model under a name that
    must not exist yet, so the lock is a registered model named ``LOCK_NAME``, deleted on
    exit. One left by a killed job is removed once older than ``LOCK_TTL_S``."""
    lock = LOCK_NAME.format(name=name, alias=alias)
    deadline = time.monotonic() + wait_s
    while True:
        try:
            client.create_registered_model(
                lock, description=f"lock for moving {name}@{alias}; deleted when the move is done"
            )
            break
        except mlflow.exceptions.MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        try:
            held = client.get_registered_model(lock)
        except mlflow.exceptions.MlflowException:
            continue  # released meanwhile: try again at once
        age_s = time.time() - held.creation_timestamp / 1000
        if age_s > LOCK_TTL_S:
            log.warning("removing the stale lock %s (%.0f s old)", lock, age_s)
            _delete_quietly(client, lock)
            continue
        if time.monotonic() > deadline:
            raise RegistryError(
                f"{name}@{alias}: another promotion or rollback holds {lock} "
                f"({age_s:.0f} s old); try again, or delete it if no job is running"
            )
        time.sleep(0.5)
    try:
        yield
    finally:
        _delete_quietly(client, lock)


def _delete_quietly(client: MlflowClient, name: str) -> None:
    try:
        client.delete_registered_model(name)
    except mlflow.exceptions.MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise


def alias_history(name: str, alias: str, client: MlflowClient) -> list[dict]:
    model = client.get_registered_model(name)
    return json.loads(model.tags.get(HISTORY_TAG.format(alias=alias), "[]"))


def _holder(model, alias: str) -> str | None:
    version = model.aliases.get(alias)
    return None if version is None else str(version)


def _record_move(model, alias, client, version, previous, how: str) -> None:
    """Remember ``previous`` for rollback and append the move to the history, from ``model``
    as read under the lock."""
    name = model.name
    if previous is not None:
        client.set_registered_model_tag(name, PREVIOUS_ALIAS_TAG.format(alias=alias), previous)
    history = json.loads(model.tags.get(HISTORY_TAG.format(alias=alias), "[]"))
    history.append({"version": version, "previous": previous, "how": how,
                    "at": datetime.now(timezone.utc).isoformat(timespec="seconds")})  # fmt: skip
    client.set_registered_model_tag(
        name, HISTORY_TAG.format(alias=alias), json.dumps(history[-HISTORY_KEEP:])
    )


def move_alias(
    name: str, alias: str, version: str, client: MlflowClient, *, expected: str | None = None
) -> str | None:
    """Point ``alias`` at ``version`` if it still points at ``expected`` (None: at nothing), a
    compare-and-swap under :func:`alias_lock`; AliasMoved otherwise. The previous holder is
    remembered (for rollback) and the move appended to the alias's history. Returns the
    previous holder."""
    with alias_lock(name, alias, client):
        model = client.get_registered_model(name)  # holder and history in one read
        previous = _holder(model, alias)
        if previous != expected:
            raise AliasMoved(
                f"{name}@{alias} was moved from {_v(expected)} to {_v(previous)} meanwhile "
                "(by another promotion or a rollback)"
            )
        client.set_registered_model_alias(name, alias, version)
        _record_move(model, alias, client, version, previous, "promote")
    return previous


def _v(version: str | None) -> str:
    return "nothing" if version is None else f"v{version}"


def rollback_alias(name: str, alias: str, client: MlflowClient) -> tuple[str | None, str]:
    """Point ``alias`` back at its previous holder; the version rolled back from becomes the
    new "previous" (so a second rollback undoes the first). Returns (from, to)."""
    try:
        client.get_registered_model(name)
    except mlflow.exceptions.MlflowException as e:
        raise RegistryError(f"registered model {name!r}: {e.message}") from None
    with alias_lock(name, alias, client):
        model = client.get_registered_model(name)  # read under the lock: the latest moves
        previous = model.tags.get(PREVIOUS_ALIAS_TAG.format(alias=alias))
        if not previous:
            raise RegistryError(
                f"{name}@{alias}: no previous holder recorded, nothing to roll back to"
            )
        current = _holder(model, alias)
        client.set_registered_model_alias(name, alias, previous)
        _record_move(model, alias, client, previous, current, "rollback")
    return current, previous
