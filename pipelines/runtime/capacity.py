"""Fitting a job to the Ray cluster it runs on, before anything is scheduled: the one place
that decides what a job asks for and whether it can have it.

A job whose actors or training workers take every CPU leaves none for Ray Data's read and
decode tasks, and Ray then waits for the cluster to grow, forever on a fixed cluster, with no
error. So each job sizes itself first: training workers get fractional logical CPUs when the
cluster is short (a logical CPU is a scheduling share, not a core: the workers still use what
the machine has), actor pools shrink, and what cannot fit fails at once with one line naming
the CPUs needed and available and what to change.

On a cluster that can grow (an autoscaler reports to it, as KubeRay's does), resources are
requests, not a snapshot: what the job asks for explicitly (``--use-gpu``, ``--actors``,
``--num-workers``) is requested from the autoscaler (``ray.autoscaler.sdk.request_resources``)
and waited for with progress lines, bounded by ``--provision-timeout``; what no node type can
ever provide fails at once with the autoscaler's reason; the request is withdrawn when the job
ends, so that idle GPU nodes go.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pipelines.core.errors import TransientError, UserError
from pipelines.core.options import option

log = logging.getLogger(__name__)

DATA_CPUS = 1.0  # kept free for Ray Data's read/decode tasks
MIN_WORKER_CPUS = 0.25  # below this a share is too small to be worth scheduling
_AUTOSCALING_HINT = " (an autoscaling cluster: pass --cluster-cpus with its limit)"


class CapacityError(UserError):
    """The job cannot fit on the cluster (the message says what is needed and what to change)."""


class ProvisioningTimeout(TransientError):
    """An autoscaling cluster did not provide what the job asked for in time."""


@dataclass(frozen=True)
class Cluster:
    cpus: float
    gpus: float
    source: str  # "the Ray cluster" or "--cluster-cpus"
    autoscaling: bool = False  # an autoscaler reports to it: it can grow

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
    provision_timeout: float = option(
        900.0,
        "seconds an autoscaling cluster may take to provide the actors' GPUs or CPUs",
        above=0,
        group="model actors",
    )


def cluster(cpus_override: float | None = None) -> Cluster:
    """What the connected Ray cluster has now. An autoscaling cluster may grow: pass the CPUs it
    can scale to (``--cluster-cpus``) and the check uses that instead."""
    import ray

    res = ray.cluster_resources()
    state = autoscaler()
    # An autoscaler reports to every cluster (a laptop's too). One that publishes its node
    # groups' maxima grows when they reach beyond what it has now; one that does not (Ray's
    # fake provider, v2's read-only one) may grow unless known read-only, and is asked: a
    # request it can never meet comes back infeasible at its next update (seconds).
    if state is None or state["readonly"]:
        grows = False
    elif state["max"]:
        grows = any(v > res.get(k, 0.0) for k, v in state["max"].items())
    else:
        grows = True
    if cpus_override is not None:
        return Cluster(float(cpus_override), res.get("GPU", 0.0), "--cluster-cpus", grows)
    return Cluster(res.get("CPU", 0.0), res.get("GPU", 0.0), "the Ray cluster", grows)


def autoscaler() -> dict | None:
    """The autoscaler's report (:func:`pipelines.compat.autoscaler_state`), None without one."""
    import ray

    from pipelines import compat

    return compat.autoscaler_state(ray.get_runtime_context().gcs_address)


# -- an autoscaling cluster: requests ---------------------------------------------------------
def describe_bundles(bundles: list[dict[str, float]]) -> str:
    """``[{"GPU": 1, "CPU": 1}] * 2`` -> "2 GPUs and 2 CPUs"."""
    total: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            total[k] = total.get(k, 0) + v
    gpu_first = sorted(total.items(), key=lambda kv: kv[0] != "GPU")
    return " and ".join(f"{v:g} {k}{'' if v == 1 else 's'}" for k, v in gpu_first)


def missing(bundles: list[dict[str, float]], have: dict[str, float]) -> list[dict[str, float]]:
    """The resources of ``bundles`` the cluster's totals ``have`` lack, as one bundle."""
    need: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            need[k] = need.get(k, 0) + v
    short = {k: v - have.get(k, 0.0) for k, v in need.items() if have.get(k, 0.0) < v}
    return [short] if short else []


@contextmanager
def provisioned(
    bundles: list[dict[str, float]], what: str, timeout_s: float, every_s: float | None = 30.0
) -> Iterator[Cluster]:
    """Hold an autoscaling cluster's room for ``bundles`` while the block runs: request them,
    wait until the cluster has them (progress lines every ``every_s``), withdraw the request on
    exit. On a fixed cluster, or one that has them already, nothing is requested. Raises
    :class:`CapacityError` for bundles no node type can provide (the autoscaler says so) and
    :class:`ProvisioningTimeout` when they do not arrive within ``timeout_s``."""
    import ray
    from ray.autoscaler.sdk import request_resources

    now = cluster()
    if not now.autoscaling:
        yield now
        return
    request_resources(bundles=bundles)
    try:
        yield _wait_for(bundles, what, timeout_s, every_s)
    finally:
        if ray.is_initialized():
            withdraw(request_resources)


def withdraw(request_resources) -> None:
    """Withdraw the job's autoscaler request as it ends. A failure here (the GCS slow to answer
    on a loaded head) must not turn the job's outcome, already decided and printed, into a
    traceback and another exit status: it is a warning, and the nodes stay until the next
    request replaces this one or they are scaled down by hand."""
    try:
        request_resources(bundles=[])
    except Exception as e:  # noqa: BLE001
        print(
            f"warning: could not withdraw this job's autoscaler request ({type(e).__name__}: "
            f"{str(e).strip()[:200]}); its nodes stay up until another job's request replaces "
            "it",
            file=sys.stderr,
            flush=True,
        )


def _wait_for(bundles: list[dict[str, float]], what: str, timeout_s: float,
              every_s: float | None) -> Cluster:  # fmt: skip
    import ray

    start, last_line = time.monotonic(), float("-inf")
    while True:
        short = missing(bundles, ray.cluster_resources())
        if not short:
            return cluster()
        state = autoscaler() or {"launching": {}, "infeasible": [], "failed": []}
        # Only this request's bundles: the report may still describe an earlier request.
        ours = [b for b in state["infeasible"] if b in bundles]
        if ours and len(ours) == len(state["infeasible"]):
            raise CapacityError(
                f"{what} asks for {describe_bundles(bundles)}; the cluster's node types can "
                f"never provide {describe_bundles(ours)} at once (the autoscaler reports it "
                f"infeasible; the cluster has {cluster().describe()}). Ask for less, or give "
                "the cluster node types (or a maximum number of them) that have it"
            )
        doing = _autoscaler_doing(state)
        waited = time.monotonic() - start
        if waited > timeout_s:
            raise ProvisioningTimeout(
                f"{what}: {describe_bundles(short)} never arrived within --provision-timeout "
                f"{timeout_s:g}s ({doing}); the cluster has {cluster().describe()}. Re-run "
                "later, or raise --provision-timeout"
            )
        if every_s is not None and time.monotonic() - last_line >= every_s:
            print(f"waiting for {describe_bundles(short)}: {doing} [{waited:.0f}s]", flush=True)
            last_line = time.monotonic()
        time.sleep(1.0)


def _autoscaler_doing(state: dict) -> str:
    if state["launching"]:
        nodes = ", ".join(f"{n} node(s) of {t}" for t, n in sorted(state["launching"].items()))
        return f"autoscaler launching {nodes}"
    if state["failed"]:
        return f"autoscaler launches failed: {'; '.join(state['failed'][:3])}"
    return "autoscaler has not started a node yet"


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


# -- what each job asks for -----------------------------------------------------------------
def actor_pool_bundles(actors: int, use_gpu: bool) -> list[dict[str, float]]:
    """A pool of model actors (a GPU, or a CPU, each) and a CPU for reading frames."""
    actor = {"GPU": 1.0, "CPU": 1.0} if use_gpu else {"CPU": 1.0}
    return [dict(actor) for _ in range(actors)] + [{"CPU": DATA_CPUS}]


@contextmanager
def actor_pool(
    opts: ActorPoolOptions, what: str, cluster_cpus: float | None = None,
    every_s: float | None = 30.0,
) -> Iterator[tuple[int, bool, str | None, Cluster]]:  # fmt: skip
    """The model actors of a labeling or evaluation job while the block runs: (actors,
    use_gpu, note when lowered, cluster). On an autoscaling cluster an explicit ``--actors`` or
    ``--use-gpu`` is requested and waited for (:func:`provisioned`); otherwise the pool is
    fitted to what the cluster has now (:func:`plan_actor_pool`)."""
    now = cluster(cluster_cpus)
    if now.autoscaling and (opts.actors is not None or opts.use_gpu):
        actors, use_gpu = opts.actors or 1, bool(opts.use_gpu)
        bundles = actor_pool_bundles(actors, use_gpu)
        with provisioned(bundles, what, opts.provision_timeout, every_s) as grown:
            if cluster_cpus is not None:
                grown = Cluster(cluster_cpus, grown.gpus, "--cluster-cpus", True)
            yield (*plan_actor_pool(grown, actors, use_gpu), grown)
        return
    yield (*plan_actor_pool(now, opts.actors, opts.use_gpu), now)


@contextmanager
def training_workers(
    workers: int, cpus_per_worker: float | None, use_gpu: bool, *, cluster_cpus: float | None,
    timeout_s: float, skip_gpu_check: bool = False, every_s: float | None = 30.0,
) -> Iterator[tuple[float, str | None, Cluster]]:  # fmt: skip
    """CPUs per training worker while the block runs (the whole ``fit``): (cpus, note when
    lowered, cluster). On an autoscaling cluster the workers (and a CPU for the data pipeline)
    are requested and waited for; on a fixed one, fitted or refused at once
    (:func:`fit_training`)."""
    now = cluster(cluster_cpus)
    cpus = cpus_per_worker or 1.0
    if now.autoscaling:
        worker = {"CPU": cpus, **({"GPU": 1.0} if use_gpu else {})}
        bundles = [dict(worker) for _ in range(workers)] + [{"CPU": DATA_CPUS}]
        with provisioned(bundles, "training", timeout_s, every_s) as grown:
            if cluster_cpus is not None:
                grown = Cluster(cluster_cpus, grown.gpus, "--cluster-cpus", True)
            yield (*fit_training(grown, workers, cpus, explicit=cpus_per_worker is not None),
                   grown)  # fmt: skip
        return
    yield (*check_training(now, workers, cpus_per_worker, use_gpu, skip_gpu_check), now)


def check_training(
    now: Cluster, workers: int, cpus_per_worker: float | None, use_gpu: bool,
    skip_gpu_check: bool = False,
) -> tuple[float, str | None]:  # fmt: skip
    """On a fixed cluster, the training workers' CPUs (:func:`fit_training`) or a
    :class:`CapacityError` at once; on one that grows, nothing to check before asking. (The
    driver calls it before touching the tracking store, so that a too-small cluster is one
    line.)"""
    cpus = cpus_per_worker or 1.0
    if now.autoscaling:
        return cpus, None
    if use_gpu and not skip_gpu_check and now.gpus < workers:
        raise CapacityError(
            f"--use-gpu with --num-workers {workers} needs {workers} GPUs, the Ray cluster has "
            f"{now.gpus:g}; drop --use-gpu, lower --num-workers, or pass --skip-gpu-check if "
            "GPU workers appear outside Ray's autoscaler"
        )
    return fit_training(now, workers, cpus, explicit=cpus_per_worker is not None)
