"""Shared fixtures: a real S3-protocol server (moto, server mode) on 127.0.0.1, a real local
Ray cluster with token authentication, real MLflow stores (sqlite), synthetic drive data.

Every server started here is stopped here.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data" / "apollo-lane-labels"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The environment is fixed before anything starts, so that Ray workers (which inherit it)
# see the same S3 endpoint and fake credentials, and Ray's token lives in a test folder, never
# in the user's ~/.ray.
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="lane-tests-"))
S3_PORT = free_port()
S3_ENDPOINT = f"http://127.0.0.1:{S3_PORT}"
_TOKEN = _SESSION_DIR / "ray_auth_token"
_TOKEN.write_text(secrets.token_hex(32))
os.environ.update(
    {
        "AWS_ACCESS_KEY_ID": "testing-key-id",
        "AWS_SECRET_ACCESS_KEY": "testing-secret-key-do-not-log",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": S3_ENDPOINT,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(_TOKEN),
        # Ray binds to, and drivers resolve 127.0.0.1 to, the loopback address instead of the
        # machine's (Ray's single-machine mode): every cluster the tests start is loopback-only.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
        "RAY_DEDUP_LOGS": "0",
        "MLFLOW_TRACKING_URI": f"sqlite:///{_SESSION_DIR / 'default-mlflow.db'}",
        "MLFLOW_ENABLE_ASYNC_LOGGING": "false",
        "GIT_PYTHON_REFRESH": "quiet",
        "TQDM_DISABLE": "1",
    }
)
os.environ.pop("RAY_ADDRESS", None)


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early with status {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def job_env(**extra: str) -> dict[str, str]:
    """The environment of a job run in its own process on the session's Ray cluster."""
    import ray

    return {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, **extra}


def start_job(module: str, *argv: str) -> subprocess.Popen:
    """``python -m MODULE ARGV`` in its own process on the session's Ray cluster; its stdout
    and stderr merged, as text (``communicate()`` for them)."""
    return subprocess.Popen(
        [sys.executable, "-m", module, *argv],
        cwd=ROOT, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def s3_server():
    """moto in server mode on 127.0.0.1; yields the endpoint. Buckets: ``lanes``."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(S3_PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(S3_PORT, proc)
        import boto3

        boto3.client("s3", endpoint_url=S3_ENDPOINT).create_bucket(Bucket="lanes")
        yield S3_ENDPOINT
    finally:
        stop(proc)


@pytest.fixture
def s3_prefix(s3_server, request) -> str:
    """A fresh s3:// prefix for one test."""
    return f"s3://lanes/{request.node.name}-{secrets.token_hex(4)}"


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster (token auth on), shared by the session."""
    import ray

    # 2-core CI machine: logical CPUs let 2 train workers and Ray Data tasks run side by side.
    ray.init(num_cpus=4, logging_level="ERROR", log_to_driver=True)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    yield ray
    ray.shutdown()


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch) -> str:
    """A fresh sqlite MLflow store (tracking + registry) for one test."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


# -- synthetic data ----------------------------------------------------------------------------
# Small frames keep CI fast; the crop keeps the real recipe's proportion (690 of 1710 rows).
FRAME_W, FRAME_H, CROP_TOP = 846, 428, 172
MODEL_W, MODEL_H = 128, 64


@pytest.fixture(scope="session")
def test_transform():
    from pipelines.core.frames import FrameTransform

    return FrameTransform(width=MODEL_W, height=MODEL_H, crop_top=CROP_TOP)


@pytest.fixture(scope="session")
def synthetic_tree(tmp_path_factory) -> Path:
    from pipelines.data.synthetic import write_tree

    out = tmp_path_factory.mktemp("synthetic")
    write_tree(out, 24, records=4, width=FRAME_W, height=FRAME_H, seed=1)
    return out


def ingest_config(source, dest, transform, **options):
    """The tests' ingest of ``source`` into ``dest`` with ``transform``'s geometry, without
    progress lines."""
    from pipelines.data.ingest import IngestConfig

    return IngestConfig.of_transform(source, dest, transform, progress_seconds=None, **options)


@pytest.fixture(scope="session")
def local_shards(synthetic_tree, tmp_path_factory, ray_cluster, test_transform) -> str:
    """The synthetic tree ingested to a local folder (read-only for tests)."""
    from pipelines.data.ingest import ingest

    dest = tmp_path_factory.mktemp("shards")
    result = ingest(
        ingest_config(str(synthetic_tree), str(dest), test_transform, val_fraction=0.25)
    )
    assert result.valid == 24
    return str(dest)


# -- registered models -------------------------------------------------------------------------
def make_model(constant_class: int | None = None, seed: int = 0):
    """An FCN-8s ResNet-101 whose predictions are known without training.

    ``constant_class``: zero score heads except a positive layer4 bias for that class, so the
    net predicts that class at every pixel (bilinear upsampling of a positive constant stays
    positive). ``None``: small random heads on the random backbone, so predictions vary with
    the input.
    """
    import torch

    from fcn_models import build_model

    torch.manual_seed(seed)
    model = build_model("fcn8s_resnet101", 8).eval()
    heads = (model.score_layer2, model.score_layer3, model.score_layer4)
    with torch.no_grad():
        for head in heads:
            if constant_class is None:
                head.weight.normal_(0, 0.01)
            else:
                head.weight.zero_()
                head.bias.zero_()
        if constant_class is not None:
            model.score_layer4.bias[constant_class] = 1.0
    return model


@pytest.fixture
def register_version(tmp_path, mlflow_store, test_transform):
    """``register_version(name, constant_class=None, seed=0, transform=None) -> version``:
    registers a model
    built by :func:`make_model` the way jobs.train does (pyfunc + tags) in the test's store.

    Every version it registers carries a planted ``python_model.pkl`` that would create a
    file when unpickled; the test fails afterwards if that file exists: whatever the test ran
    (labeling, promotion, evaluation, in this process or in Ray workers) loaded the versions
    as data."""
    import mlflow

    from pipelines.core import labels
    from pipelines.inference.model_dir import ModelSpec, save_model_dir
    from pipelines.ops import tracking
    from pipelines.registry.pyfunc import register_model_dir

    def register(
        name: str, constant_class: int | None = None, seed: int = 0, transform=None
    ) -> str:
        model_dir = tmp_path / f"model-{name}-{constant_class}-{seed}"
        spec = ModelSpec("fcn8s_resnet101", 8, transform or test_transform, labels.CLASS_NAMES)
        save_model_dir(model_dir, make_model(constant_class, seed), spec)
        # An experiment of our own: the default one would put artifacts in ./mlruns.
        experiment = tracking.ensure_experiment("registered-by-tests", mlflow_store)
        with mlflow.start_run(experiment_id=experiment, run_name=f"register-{name}"):
            version = register_model_dir(model_dir, name, {"made_by": "tests"})
        plant_malicious_pickle(name, str(version.version), canary)
        return str(version.version)

    canary = tmp_path / "planted-pickle-ran"
    yield register
    assert not canary.exists(), "a job unpickled a registered version's python_model.pkl"


# -- trust boundaries ------------------------------------------------------------------------------
class _Touch:
    """Unpickled, it creates ``path``: what a planted pickle could do instead."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def malicious_pickle(canary: Path) -> bytes:
    """A pickle that creates the file ``canary`` when it is unpickled."""
    import pickle

    return pickle.dumps(_Touch(canary))


def stored_model(name: str, version: str) -> Path:
    """The folder of a registered version's pyfunc model in the tests' local artifact store
    (MLmodel, python_model.pkl, artifacts/model_dir/...)."""
    from urllib.parse import urlparse

    from mlflow import MlflowClient

    uri = MlflowClient().get_model_version_download_uri(name, version)
    assert uri.startswith("file://"), uri
    return Path(urlparse(uri).path)


def plant_malicious_pickle(name: str, version: str, canary: Path) -> None:
    """Replace a registered version's ``python_model.pkl`` with one that creates ``canary``
    when unpickled (as whoever can write to the artifact store could)."""
    (stored_model(name, version) / "python_model.pkl").write_bytes(malicious_pickle(canary))
