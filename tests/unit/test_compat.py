"""Each private API of pipelines.compat against the installed MLflow and Ray: when an upgrade
changes one, this fails here, naming it, instead of somewhere deep in a job."""

from __future__ import annotations

import inspect
import time

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient

from pipelines import compat


@pytest.fixture
def run_id(mlflow_store):
    mlflow.set_experiment("compat")
    with mlflow.start_run() as run:
        yield run.info.run_id


def test_image_files_are_found_by_key_and_step(mlflow_store, run_id):
    client = MlflowClient()
    picture = np.zeros((8, 8, 3), dtype=np.uint8)
    client.log_image(run_id, picture, key="val/overlays", step=3)
    client.log_image(run_id, picture, key="confusion", step=0)
    files = compat.mlflow_image_files(client, run_id, "val/overlays")
    [(step, _)] = files
    assert step == 3
    # The PNG and its thumbnail: a complete image.
    assert sorted(p.rpartition(".")[2] for p in files[step, _]) == ["png", "webp"]


def test_a_run_artifact_can_be_deleted(mlflow_store, run_id, tmp_path):
    client = MlflowClient()
    (tmp_path / "a.txt").write_text("a")
    client.log_artifact(run_id, str(tmp_path / "a.txt"), "images")
    compat.delete_run_artifact(client, run_id, "images/a.txt")
    assert [a.path for a in client.list_artifacts(run_id, "images")] == []


@pytest.mark.parametrize("uri", ["s3://bucket/shards/versions/v1", "/data/shards/versions/v1"])
def test_dataset_sources_resolve_and_serialise(uri):
    source = compat.dataset_source(uri)
    assert uri.rpartition("/")[2] in source.to_json()


def test_the_system_metrics_monitor_starts_logs_and_is_seen_to_stop(mlflow_store, run_id):
    monitor = compat.start_system_metrics(run_id, 0.2, mlflow_store)
    try:
        assert compat.system_metrics_alive(monitor)
        deadline = time.monotonic() + 30
        client = MlflowClient()
        while not client.get_metric_history(run_id, "system/cpu_utilization_percentage"):
            assert time.monotonic() < deadline, "no system metrics after 30 s"
            time.sleep(0.2)
    finally:
        monitor.finish()
    assert not compat.system_metrics_alive(monitor)


def test_parquet_reads_with_the_v1_datasource_and_restores_the_switch(ray_cluster, tmp_path):
    import ray

    files = []
    for i in range(2):
        pq.write_table(pa.table({"x": [i, i]}), tmp_path / f"{i}.parquet")
        files.append(str(tmp_path / f"{i}.parquet"))
    ctx = ray.data.DataContext.get_current()
    before = ctx.use_datasource_v2
    ds = compat.read_parquet_v1(files)
    assert ctx.use_datasource_v2 == before
    assert sorted(r["x"] for r in ds.take_all()) == [0, 0, 1, 1]


def test_data_config_configure_has_the_overridden_signature():
    from ray.train import DataConfig

    params = list(inspect.signature(DataConfig.configure).parameters)
    assert params[:5] == ["self", "datasets", "world_size", "worker_handles", "worker_node_ids"]
    config = compat.exact_eval_split_config("train", ("val",))
    assert isinstance(config, DataConfig)
