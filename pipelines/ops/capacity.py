"""Fitting a job to the Ray cluster it runs on, before anything is scheduled.

A job whose actors or training workers take every CPU leaves none for Ray Data's read and
decode tasks, and Ray then waits for the cluster to grow, forever on a fixed cluster, with no
error. So each job sizes itself first: training workers get fractional logical CPUs when the
cluster is short (a logical CPU is a scheduling share, not a core: the workers still use what
the machine has), actor pools shrink, and what cannot fit fails at once with one line naming
the CPUs needed and available and what to change.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.core.errors import UserError
from pipelines.core.options import option

DATA_CPUS = 1.0  # kept free for Ray Data's read/decode tasks
MIN_WORKER_CPUS = 0.25  # below this a share is too small to be worth scheduling
_AUTOSCALING_HINT = " (an autoscaling cluster: pass --cluster-cpus with its limit)"


class CapacityError(UserError):
    """The job cannot fit on the cluster (the message says what is needed and what to change)."""


@dataclass(frozen=True)
class Cluster:
    cpus: float
    gpus: float
    source: str  # "the Ray cluster" or "--cluster-cpus"

    def describe(self) -> str:
        gpus = f" and {self.gpus:g} GPUs" if self.gpus else ""
        return f"{self.cpus:g} CPUs{gpus} ({self.source})"


@dataclass(frozen=True, kw_only=True)
class ActorPoolOptions:
    """``--batch-size``, ``--actors`` and ``--use-gpu`` of the jobs that run a pool of model
    actors (labeling, promotion's evaluation), sized by :func:`plan_actor_pool`."""

    batch_size: int = option(8, "frames per model call", min=1, group="model actors")
    actors: int | None = option(
        None, "model replicas (default: one per GPU, else 1)", min=1, group="model actors"
    )
    use_gpu: bool | None = option(
        None,
        "one GPU per model actor (default: when the cluster has GPUs now; pass --use-gpu for "
        "GPU workers that autoscale from zero)",
        group="model actors",
    )


def cluster(cpus_override: float | None = None) -> Cluster:
    """What the connected Ray cluster has now. An autoscaling cluster may grow: pass the CPUs it
    can scale to (``--cluster-cpus``) and the check uses that instead."""
    import ray

    res = ray.cluster_resources()
    if cpus_override is not None:
        return Cluster(float(cpus_override), res.get("GPU", 0.0), "--cluster-cpus")
    return Cluster(res.get("CPU", 0.0), res.get("GPU", 0.0), "the Ray cluster")


def fit_training(
    c: Cluster, workers: int, cpus_per_worker: float, *, explicit: bool
) -> tuple[float, str | None]:
    """CPUs per training worker that leave ``DATA_CPUS`` for the data pipeline, and a note when
    it was lowered. ``explicit``: the user chose ``--cpus-per-worker``, so it is not lowered."""
    need = workers * cpus_per_worker + DATA_CPUS
    if need <= c.cpus:
        return cpus_per_worker, None
    fitted = int((c.cpus - DATA_CPUS) / workers * 100) / 100  # rounded down to 0.01
    if explicit or fitted < MIN_WORKER_CPUS:
        most = int((c.cpus - DATA_CPUS) / MIN_WORKER_CPUS)
        if explicit:
            fix = "Lower --cpus-per-worker or --num-workers, or add nodes"
        elif most >= 1:
            fix = f"Lower --num-workers to at most {most}, or add nodes"
        else:
            fix = f"Add nodes: a training job needs at least {DATA_CPUS + MIN_WORKER_CPUS:g} CPUs"
        raise CapacityError(
            f"--num-workers {workers} x --cpus-per-worker {cpus_per_worker:g} + {DATA_CPUS:g} "
            f"CPU for the data pipeline need {need:g} CPUs; the cluster has {c.describe()}. "
            + fix
            + (_AUTOSCALING_HINT if c.source != "--cluster-cpus" else "")
        )
    note = (
        f"the cluster has {c.describe()}: {workers} workers x {fitted:g} CPU (not "
        f"{cpus_per_worker:g}) + {DATA_CPUS:g} CPU for the data pipeline"
    )
    return fitted, note


def fit_actor_pool(
    c: Cluster, actors: int, *, use_gpu: bool, explicit: bool
) -> tuple[int, str | None]:
    """Model actors that fit beside the data pipeline: CPU actors take one CPU each and
    ``DATA_CPUS`` stay free; GPU actors take one GPU each. Returns (actors, note when lowered);
    with ``explicit`` (``--actors`` given) a pool that does not fit is an error instead."""
    if use_gpu:
        room = int(c.gpus)
        what = f"{actors} GPU actors need {actors} GPUs"
    else:
        room = int(c.cpus - DATA_CPUS)
        what = (
            f"{actors} CPU actors + {DATA_CPUS:g} CPU for reading need {actors + DATA_CPUS:g} CPUs"
        )
    if actors <= room:
        return actors, None
    if explicit or room < 1:
        raise CapacityError(
            f"{what}; the cluster has {c.describe()}. "
            + (f"Lower --actors to {room}" if room >= 1 else "Add nodes")
            + (_AUTOSCALING_HINT if c.source != "--cluster-cpus" and not use_gpu else "")
        )
    return room, f"the cluster has {c.describe()}: {room} model actors (not {actors})"


def plan_actor_pool(
    c: Cluster, actors: int | None, use_gpu: bool | None
) -> tuple[int, bool, str | None]:
    """The model actors of a labeling or evaluation job: ``use_gpu`` None means "when the
    cluster has GPUs now", ``actors`` None one per GPU (else one), fitted by
    :func:`fit_actor_pool` (an explicit ``actors`` that does not fit is an error). Returns
    (actors, use_gpu, note when lowered)."""
    gpus = int(c.gpus)
    use_gpu = gpus > 0 if use_gpu is None else use_gpu
    fitted, note = fit_actor_pool(
        c, actors or max(1, gpus), use_gpu=use_gpu, explicit=actors is not None
    )
    return fitted, use_gpu, note


def check_reader(c: Cluster) -> None:
    """Evaluation reads with Ray Data tasks in the driver's cluster: at least one CPU."""
    if c.cpus < DATA_CPUS:
        raise CapacityError(
            f"reading the evaluation data needs {DATA_CPUS:g} CPU; the cluster has {c.describe()}"
        )


def node_cpus() -> int:
    """The CPUs of the node this process runs on: what Ray counts there, at most the cores
    this process may run on (a node started with more logical CPUs than cores, as the test
    suite's is, must not get more threads than cores)."""
    import os

    import ray

    here = ray.get_runtime_context().get_node_id()
    node = next((n for n in ray.nodes() if n["NodeID"] == here), None)
    logical = int(node["Resources"].get("CPU", 1)) if node else 1
    return max(1, min(logical, len(os.sched_getaffinity(0))))
