"""MLflow tracking plumbing shared by the jobs: where the store is, experiments, resumable runs,
and keeping secrets out of params, tags and logs.

Default store: the embedded ``sqlite:///mlflow.db`` in the working directory, with artifacts in
``mlartifacts/`` beside it. Set ``MLFLOW_TRACKING_URI`` (e.g. ``http://mlflow:5000``) for a
server; the server then stores artifacts (locally or in S3).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlparse, urlunparse

from pipelines import compat
from pipelines.core.errors import TransientError, UserError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
RUN_NAME_TAG = "mlflow.runName"

# Environment variables whose values must never reach MLflow or the logs.
SECRET_ENV_VARS = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "RAY_AUTH_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)
_SECRET_KEY_RE = re.compile(r"(secret|password|passwd|token|credential|access_key)", re.I)


class TrackingError(UserError):
    """The tracking store cannot be used (message says which and why)."""


class TrackingUnreachable(TrackingError, TransientError):
    """The tracking server does not answer (now: it may be restarting)."""


def tracking_uri(uri: str | None = None) -> str:
    """The tracking URI to use, with a relative sqlite path made absolute so that Ray workers
    (whose working directory differs) open the same database."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = Path(uri[len("sqlite:///") :]).expanduser().resolve()
        return f"sqlite:///{path}"
    if "://" not in uri:  # a plain folder: MLflow's file store
        return Path(uri).expanduser().resolve().as_uri()
    return uri


def is_local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:"))


def default_artifact_location(uri: str) -> str | None:
    """For the embedded stores, artifacts go beside the database (absolute, for Ray workers);
    a tracking server chooses its own."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
    return None


def display_uri(uri: str) -> str:
    """A URI safe to print: any user:password is removed."""
    parsed = urlparse(uri)
    if parsed.username or parsed.password:
        host = parsed.hostname or ""
        if parsed.port:
            host += f":{parsed.port}"
        return urlunparse(parsed._replace(netloc=f"***@{host}"))
    return uri


def check_tracking(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, with a clear message, when a tracking server is not reachable."""
    if is_local_store(uri):
        return
    import requests

    health = uri.rstrip("/") + "/health"
    try:
        r = requests.get(health, timeout=timeout_s)
    except requests.RequestException as e:
        raise TrackingUnreachable(
            f"MLflow tracking server {display_uri(uri)} is not reachable "
            f"({type(e).__name__}); start it or set MLFLOW_TRACKING_URI"
        ) from None
    if r.status_code >= 400:
        raise TrackingError(
            f"MLflow tracking server {display_uri(uri)} answered {r.status_code} on /health"
        )


def configure(uri: str | None = None) -> str:
    """Point this process's MLflow at the store and return the (absolute) URI."""
    import mlflow

    uri = tracking_uri(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def ensure_experiment(name: str, uri: str) -> str:
    """The id of experiment ``name``, created (with an absolute artifact location for the
    embedded stores) when missing."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            raise TrackingError(
                f"MLflow experiment {name!r} is deleted; restore it or pick a new name"
            )
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=default_artifact_location(uri))


def find_run(experiment_id: str, run_name: str, uri: str) -> str | None:
    """The id of the newest run called ``run_name`` in the experiment (for resuming)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def run_params(experiment: str, run_name: str, uri: str) -> dict[str, str] | None:
    """The params of the newest run called ``run_name`` in the experiment named
    ``experiment``, or None (no such experiment or run). Creates nothing."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    run_id = find_run(exp.experiment_id, run_name, uri) if exp else None
    return client.get_run(run_id).data.params if run_id else None


def run_param(experiment: str, run_name: str, key: str, uri: str) -> str | None:
    """One of :func:`run_params` (None when absent)."""
    return (run_params(experiment, run_name, uri) or {}).get(key)


def _secret_values() -> list[str]:
    return [v for k in SECRET_ENV_VARS if (v := os.environ.get(k)) and len(v) >= 4]


def redact(values: dict) -> dict:
    """A copy of ``values`` safe to log: keys that name secrets are dropped, any value that
    contains a secret from the environment is masked, URIs lose their user:password."""
    secrets = _secret_values()
    out = {}
    for k, v in values.items():
        if _SECRET_KEY_RE.search(str(k)):
            continue
        if isinstance(v, dict):
            out[k] = redact(v)
            continue
        text = str(v)
        if "://" in text:
            text = display_uri(text)
        for s in secrets:
            text = text.replace(s, "***")
        out[k] = v if text == str(v) else text
    return out


def dataset_input(version, split: str):
    """An ingested dataset version as an MLflow dataset (metadata only: the shards stay where
    they are): name ``VERSION/SPLIT``, digest the manifest's SHA-256 prefix (MLflow keeps at
    most 36 characters), source the version folder's URI (``s3://`` or a local path). Logged
    with ``mlflow.log_input`` it shows in the run's Datasets column and links the run (and
    metrics logged with ``dataset=``) to exactly that data."""
    from mlflow.data.meta_dataset import MetaDataset

    source = compat.dataset_source(display_uri(version.uri))
    name = f"{version.name or 'pinned'}/{split}"
    return MetaDataset(source, name=name, digest=version.manifest_sha256)


def image_steps(client, run_id: str, key: str) -> set[int]:
    """The steps at which the run holds image ``key`` complete (the PNG and its thumbnail)."""
    return {step for (step, _), paths in compat.mlflow_image_files(client, run_id, key).items()
            if len(paths) == 2}  # fmt: skip


def remove_partial_images(client, run_id: str, key: str, step: int) -> list[str]:
    """Delete the half of image ``key`` at ``step`` that a send cut short left behind (its PNG
    uploaded, the process killed or the server lost before the thumbnail): the image is sent
    again whole, and the run page must not show the stray half beside it. Returns the paths
    deleted. Only call it from the one process that sends the run's images."""
    halves = [p for (s, _), paths in compat.mlflow_image_files(client, run_id, key).items()
              if s == step and len(paths) == 1 for p in paths]  # fmt: skip
    for path in halves:
        compat.delete_run_artifact(client, run_id, path)
    return halves


def local_store_problem(uri: str, hosts: set[str], autoscaling: bool) -> str | None:
    """Why ``uri`` cannot serve training workers on these nodes, or None. A sqlite or file
    store lives on one machine's disk: rank 0 logs from whichever node it runs on, and the
    driver registers from its own, so every node must be on this machine (``hosts``: the
    hostnames of the cluster's nodes); an autoscaling cluster adds machines."""
    if not is_local_store(uri) or (len(hosts) <= 1 and not autoscaling):
        return None
    where = f"{len(hosts)} machines" if len(hosts) > 1 else "an autoscaling cluster"
    return (
        f"MLFLOW_TRACKING_URI {display_uri(uri)} is a store on this machine's disk, but the Ray "
        f"cluster spans {where}: the training workers' records would land where the driver "
        "never reads them. Set MLFLOW_TRACKING_URI to the tracking server (http://...)"
    )


def check_reachable_from_workers(uri: str, cluster) -> None:
    """Refuse a tracking store the training workers' nodes cannot reach (see
    :func:`local_store_problem`); ``cluster``: :func:`pipelines.runtime.capacity.cluster`."""
    import ray

    hosts = {n["NodeManagerHostname"] for n in ray.nodes() if n.get("Alive")}
    problem = local_store_problem(uri, hosts, cluster.autoscaling)
    if problem:
        raise TrackingError(problem)
