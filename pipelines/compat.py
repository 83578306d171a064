"""The private APIs of our dependencies that the product relies on, each behind one small
function, with the version it was checked against. When a dependency is upgraded, this file is
the list to re-check; ``tests/unit/test_compat.py`` fails loudly when one of them changed.

Checked against MLflow 3.17.2, Ray 2.60.0.
"""

from __future__ import annotations

import re

# -- MLflow ---------------------------------------------------------------------------------
# ``MlflowClient.log_image(key=, step=)`` writes ``images/KEY+step+N+timestamp+T+UUID.png``,
# then ``...+compressed.webp`` beside it (MLflow 3.17, mlflow/tracking/client.py); "/" in a key
# becomes "~". There is no API that lists a run's images by key and step.
_IMAGE_FILE = re.compile(r"(?P<key>.+)\+step\+(?P<step>\d+)\+timestamp\+\d+\+(?P<id>[0-9a-f-]+)"
                         r"(?P<compressed>\+compressed\.webp|\.png)")  # fmt: skip


def mlflow_image_files(client, run_id: str, key: str) -> dict[tuple[int, str], list[str]]:
    """Image ``key``'s artifact paths in a run, by (step, upload id): two per complete image
    (the PNG and its thumbnail)."""
    files: dict[tuple[int, str], list[str]] = {}
    for a in client.list_artifacts(run_id, "images"):
        m = _IMAGE_FILE.fullmatch(a.path.rpartition("/")[2])
        if m and m["key"] == key.replace("/", "~"):
            files.setdefault((int(m["step"]), m["id"]), []).append(a.path)
    return files


def delete_run_artifact(client, run_id: str, path: str) -> None:
    """Delete one artifact of a run. MLflow's client has no delete; its artifact repositories
    (local, ``mlflow-artifacts:`` of a server, S3) do (MLflow 3.17,
    ``mlflow.store.artifact.artifact_repository_registry``)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    repo = get_artifact_repository(
        client.get_run(run_id).info.artifact_uri, tracking_uri=client.tracking_uri
    )
    repo.delete_artifacts(path)


def dataset_source(uri: str):
    """MLflow's dataset source for a URI (``s3://``, a local path, ...), as ``mlflow.data``
    resolves one internally (MLflow 3.17, ``mlflow.data.dataset_source_registry``)."""
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source

    with warnings.catch_warnings():  # "a local path can be interpreted in multiple ways"
        warnings.simplefilter("ignore", UserWarning)
        return resolve_dataset_source(uri)


def start_system_metrics(run_id: str, interval_s: float, tracking_uri: str):
    """MLflow's system-metrics monitor of this node, started for ``run_id`` and continuing its
    steps (MLflow 3.17: ``SystemMetricsMonitor`` is not exported by ``mlflow``; the public
    switch, ``mlflow.enable_system_metrics_logging``, only covers runs this process starts)."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(
        run_id, sampling_interval=interval_s, samples_before_logging=1, resume_logging=True,
        tracking_uri=tracking_uri,
    )  # fmt: skip
    monitor.start()
    return monitor


def system_metrics_alive(monitor) -> bool:
    """Whether the monitor's sampling thread still runs: it stops for good on the first failed
    call to the tracking server (MLflow 3.17: the thread is ``monitor._process``)."""
    thread = getattr(monitor, "_process", None)
    return thread is not None and thread.is_alive()


# -- Ray ----------------------------------------------------------------------------------
def read_parquet_v1(files: list[str], **kwargs):
    """``ray.data.read_parquet`` of an explicit list of files with Ray Data's V1 Parquet
    datasource. The V2 one (Ray 2.60's default, switched by ``DataContext.use_datasource_v2``)
    adds a listing stage of its own tasks that costs ~5 s on every execution (every epoch's
    pass, every evaluation) even for one small local file, against ~0.1 s
    (benchmarks/RESULTS.md; the benchmark that measured it is in commit e8c73ae); the files are known already. The datasource is chosen
    when the dataset is created."""
    import ray

    ctx = ray.data.DataContext.get_current()
    if not hasattr(ctx, "use_datasource_v2"):
        raise RuntimeError("ray.data.DataContext has no use_datasource_v2 (checked on Ray 2.60)")
    before = ctx.use_datasource_v2
    ctx.use_datasource_v2 = False
    try:
        return ray.data.read_parquet(files, **kwargs)
    finally:
        ctx.use_datasource_v2 = before


def exact_eval_split_config(train: str, evaluate: tuple[str, ...]):
    """A Ray Train ``DataConfig`` that splits ``train`` *equally* over the workers and each of
    ``evaluate`` *exactly* (``streaming_split(equal=False)``), which ``DataConfig`` itself
    cannot do for some datasets and not others: its ``configure`` is overridden (a
    DeveloperAPI, Ray 2.60: ``configure(datasets, world_size, worker_handles,
    worker_node_ids, **kwargs)``)."""
    from ray.train import DataConfig

    class _Config(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            rest = {k: v for k, v in datasets.items() if k not in evaluate}
            out = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
            for name in evaluate:
                if name not in datasets:
                    continue
                ds = datasets[name]
                if ds.name is None:
                    ds.set_name(name)
                for i, it in enumerate(ds.streaming_split(world_size, equal=False)):
                    out[i][name] = it
            return out

    return _Config(datasets_to_split=[train])


def autoscaler_state(gcs_address: str) -> dict | None:
    """What the cluster's autoscaler reports, or None when the cluster has none (a fixed
    cluster) or it has not reported yet. ``{"launching": {node type: count}, "infeasible": [bundle, ...] (one per
    requested bundle), "failed": [reason, ...], "max": {resource: most its node groups reach}
    (empty when not reported), "readonly": True when it is known that it cannot add nodes}``.
    Autoscaler v2 (what KubeRay runs with ``autoscalerOptions.version: v2``) reports its state
    to the GCS (Ray 2.60: ``GcsClient.get_cluster_status``, an ``GetClusterStatusReply``,
    whose infeasible constraints Ray's own ``ClusterStatus`` parser drops); v1 writes a JSON
    summary to the internal KV (``DEBUG_AUTOSCALING_STATUS``) without infeasible requests."""
    import json

    from ray._private import ray_constants
    from ray._raylet import (
        GCS_AUTOSCALER_STATE_NAMESPACE,
        GCS_AUTOSCALER_V2_ENABLED_KEY,
        GcsClient,
    )
    from ray.autoscaler._private.util import format_readonly_node_type
    from ray.core.generated.autoscaler_pb2 import GetClusterStatusReply

    gcs = GcsClient(address=gcs_address)
    v2 = gcs.internal_kv_get(
        GCS_AUTOSCALER_V2_ENABLED_KEY.encode(), namespace=GCS_AUTOSCALER_STATE_NAMESPACE.encode()
    )
    if v2 == b"1":
        reply = GetClusterStatusReply()
        reply.ParseFromString(gcs.get_cluster_status(timeout_s=10))
        state = reply.autoscaling_state
        if not state.autoscaler_state_version:
            return None  # enabled, but no autoscaler has reported (yet)
        launching: dict[str, int] = {}
        for r in state.pending_instance_requests:
            launching[r.ray_node_type_name] = launching.get(r.ray_node_type_name, 0) + r.count
        for i in state.pending_instances:
            launching[i.ray_node_type_name] = launching.get(i.ray_node_type_name, 0) + 1
        infeasible = [
            dict(req.request.resources_bundle)
            for c in state.infeasible_cluster_resource_constraints
            for req in c.resource_requests
            for _ in range(req.count)
        ] + [dict(r.resources_bundle) for r in state.infeasible_resource_requests]
        failed = [f"{f.ray_node_type_name}: {f.reason}" for f in state.failed_instance_requests]
        # v2's read-only provider (a manually started cluster) cannot be told from one that
        # grows before it is asked: it answers a request beyond its nodes as infeasible.
        return {"launching": launching, "infeasible": infeasible, "failed": failed,
                "max": _max_resources(), "readonly": False}  # fmt: skip
    raw = gcs.internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS.encode(), namespace=None)
    if not raw:
        return None
    report = json.loads(raw).get("autoscaler_report") or {}
    launching = dict(report.get("pending_launches") or {})
    for _ip, node_type, _status in report.get("pending_nodes") or []:
        launching[node_type] = launching.get(node_type, 0) + 1
    failed = [f"{t}: launch failed" for _ip, t in report.get("failed_nodes") or []]
    # v1's read-only provider (ray.init, `ray start` by hand) names each node's type after
    # its node id (``format_readonly_node_type``): a cluster of such types cannot add a node.
    # Its first reports may map no node yet: not a report to decide on (as v2's before it).
    mapping = report.get("node_type_mapping") or {}
    if not mapping:
        return None
    readonly = all(t == format_readonly_node_type(node) for node, t in mapping.items())
    return {"launching": launching, "infeasible": [], "failed": failed,
            "max": _max_resources(), "readonly": readonly}  # fmt: skip


def _max_resources() -> dict[str, float]:
    """The most of each resource the cluster's node groups can reach, from the cluster config
    an autoscaler may report to the GCS: Ray's own reading of it, the one Ray Train sizes its
    workers by (Ray 2.60: ``ray._private.state.state.get_max_resources_from_cluster_config``;
    ``sys.maxsize`` for unbounded groups). Empty when none is reported, which Ray 2.60's
    laptop, hand-started and fake-provider clusters all are (measured). Reads the cluster
    this process is connected to, as every caller is."""
    from ray._private.state import state

    return dict(state.get_max_resources_from_cluster_config() or {})
