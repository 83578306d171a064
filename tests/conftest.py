"""Shared fixtures: a real S3-protocol server (moto, server mode) on 127.0.0.1, a real local
Ray cluster with token authentication, real MLflow stores (sqlite), synthetic drive data.

Every server started here is stopped here.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path

import pytest

from tests.support.helpers import (
    CROP_TOP,
    FRAME_H,
    FRAME_W,
    MODEL_H,
    MODEL_W,
    free_port,
    ingest_config,
    moto_server,
)
from tests.support.models import register_test_model

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


@pytest.fixture(scope="session")
def s3_server():
    """moto in server mode on 127.0.0.1; yields the endpoint. Buckets: ``lanes``."""
    import boto3

    with moto_server(S3_PORT) as (_, endpoint):
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="lanes")
        yield endpoint


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


@pytest.fixture(scope="session")
def local_shards(synthetic_tree, tmp_path_factory, ray_cluster, test_transform) -> str:
    """The synthetic tree ingested to a local folder (read-only for tests)."""
    from pipelines.data.workflow import ingest

    dest = tmp_path_factory.mktemp("shards")
    result = ingest(
        ingest_config(str(synthetic_tree), str(dest), test_transform, val_fraction=0.25)
    )
    assert result.valid == 24
    return str(dest)


@pytest.fixture
def register_version(tmp_path, mlflow_store, test_transform):
    """``register_version(name, constant_class=None, seed=0, transform=None) -> version``:
    registers a model built by :func:`make_model` the way jobs.train does (pyfunc + tags) in
    the test's store.

    Every version it registers carries a planted ``python_model.pkl`` that would create a
    file when unpickled; the test fails afterwards if that file exists: whatever the test ran
    (labeling, promotion, evaluation, in this process or in Ray workers) loaded the versions
    as data."""
    canary = tmp_path / "planted-pickle-ran"

    def register(name: str, constant_class: int | None = None, seed: int = 0,
                 transform=None) -> str:  # fmt: skip
        return register_test_model(mlflow_store, tmp_path, name, transform or test_transform,
                                   canary, constant_class, seed)  # fmt: skip

    yield register
    assert not canary.exists(), "a job unpickled a registered version's python_model.pkl"
