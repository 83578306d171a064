"""The training driver, top to bottom: fit the workers to the cluster -> resolve the dataset
version once and check everything that can fail before a worker starts -> start (or resume)
the MLflow run -> run Ray Train's ``TorchTrainer`` under a watchdog -> register the best
checkpoint.

Re-running with the same ``run_name`` and ``storage`` resumes from the last checkpoint, on the
dataset version the run started on, and continues the same MLflow run.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from pipelines.core import labels
from pipelines.core.errors import BrokenGpuError, Exit
from pipelines.core.frames import FrameTransform
from pipelines.core.options import ConfigError, as_dict
from pipelines.data.shards import build_dataset, shard_files
from pipelines.data.versions import DatasetVersion, resolve_dataset
from pipelines.runtime import capacity, faults, progress, tracking, watchdog
from pipelines.runtime.cluster import init_ray, quiet_ray_data
from pipelines.storage import Location, resolve
from pipelines.training.batches import split_config
from pipelines.training.config import LoopConfig, TrainConfig
from pipelines.training.loop import train_loop_per_worker
from pipelines.training.weights import BackboneWeightsError, load_backbone_weights

__all__ = ["TrainConfig", "run"]


def run(cfg: TrainConfig) -> int:
    """The training job. Exit status: 0 trained and registered; 1 training failed (a worker
    crashed with no restarts left), 6 stalled (both say how to resume)."""
    cfg = cfg.resolved()
    tracking_uri = tracking.configure()
    where = init_ray(min_cpus=int(cfg.num_workers * (cfg.cpus_per_worker or 1.0)) + 2)
    quiet_ray_data()
    # Everything that can fail on the driver fails before a node is asked for, and a cluster
    # too small for the job before the tracking store is touched (one line, no MLflow logs).
    now = capacity.cluster(cfg.cluster_cpus)
    capacity.check_training(now, cfg.num_workers, cfg.cpus_per_worker, cfg.use_gpu,
                            cfg.skip_gpu_check)  # fmt: skip
    data, manifest, backbone = prepare_data(cfg, tracking_uri)
    changed = check_resume_config(cfg, tracking_uri)
    tracking.check_reachable_from_workers(tracking_uri, now)
    workers = capacity.training_workers(
        cfg.num_workers, cfg.cpus_per_worker, cfg.use_gpu, cluster_cpus=cfg.cluster_cpus,
        timeout_s=cfg.provision_timeout, skip_gpu_check=cfg.skip_gpu_check,
        every_s=cfg.progress_seconds,
    )  # fmt: skip
    with workers as (cpus, note, _):
        if note:
            print(note, flush=True)
        cfg = replace(cfg, cpus_per_worker=cpus, data=data.uri)  # workers get the version folder
        return train(cfg, data, manifest, backbone, tracking_uri, where, changed)


def train(cfg: TrainConfig, data: DatasetVersion, manifest: dict, backbone: dict | None,
          tracking_uri: str, where: str, changed: dict[str, str]) -> int:  # fmt: skip
    """Start or resume the MLflow run, fit, register the best checkpoint."""
    import mlflow
    import ray

    transform = FrameTransform.from_dict(manifest["transform"])
    provenance = provenance_of(cfg, data)
    params = {**as_dict(cfg), "frame_transform": transform.to_dict(), **provenance,
              "train_frames": manifest["counts"]["train"],
              "val_frames": manifest["counts"]["val"]}  # fmt: skip
    run_id, resumed = start_or_resume_run(cfg, tracking_uri, params, data)
    if changed:  # params cannot change in MLflow: the new values are tags of the run
        mlflow.set_tags({f"resumed_with.{k}": v for k, v in changed.items()})
    print(
        f"{'resuming' if resumed else 'starting'} run {cfg.run_name!r} on {where} Ray: "
        f"{cfg.num_workers} {'GPU' if cfg.use_gpu else 'CPU'} workers, MLflow run {run_id} "
        f"at {tracking.display_uri(tracking_uri)}",
        flush=True,
    )
    loop = LoopConfig(
        job=cfg, recipe=cfg.recipe_in_force(), transform=transform,
        n_class=manifest.get("n_class", labels.N_CLASSES),
        train_frames=manifest["counts"]["train"], tracking_uri=tracking_uri,
        mlflow_run_id=run_id, provenance=provenance,
        # Read and checked once here; the workers get it through the object store.
        backbone_weights=ray.put(backbone) if backbone is not None else None,
        progress=progress.progress_actor(),  # rank 0 reports each step; the watchdog reads it
    )  # fmt: skip
    storage = resolve(cfg.storage)
    result = fit(cfg, loop, storage)
    if isinstance(result, int):
        return result
    best = best_checkpoint(result)
    if best is None:
        end_run_quietly("FAILED")
        print("error: training produced no checkpoint", file=sys.stderr)
        return 1
    checkpoint, best_metrics = best
    version = register(cfg, checkpoint, best_metrics, provenance)
    mlflow.end_run()
    print(
        f"done: best val mIoU {best_metrics['val_miou']:.4f} (epoch {best_metrics['epoch'] + 1}); "
        f"registered models:/{cfg.register_as}/{version.version}; MLflow run {run_id}; "
        f"checkpoints in {storage.join(cfg.run_name).uri}",
        flush=True,
    )
    return 0


def prepare_data(cfg: TrainConfig, tracking_uri: str) -> tuple[DatasetVersion, dict, dict | None]:
    """The dataset version this run trains on (resolved once; for a resumed run, the one it
    started on), its manifest, and the backbone weights checked against the model."""
    data = resolve_dataset(cfg.data)
    manifest, backbone = preflight(cfg, data)
    started_on = resumed_data(cfg, data, tracking_uri)
    if started_on is not None:
        data = started_on
        manifest, backbone = preflight(cfg, data)
    return data, manifest, backbone


def preflight(cfg: TrainConfig, data: DatasetVersion) -> tuple[dict, dict | None]:
    """Every check on the data and arguments that can fail before a worker starts (before
    MLflow is touched, so that a bad argument is one line). Returns the data manifest and the
    backbone weights (checked against the model) when ``backbone_weights`` is given."""

    manifest = data.manifest
    for split in ("train", "val"):
        if not shard_files(data.uri, split):
            raise ConfigError(
                f"{data.location.join(split).uri}: no Parquet shards; "
                + (
                    "ingest with --val-fraction > 0 and at least two drives"
                    if split == "val"
                    else "run jobs.ingest first"
                )
            )
    if manifest["counts"]["train"] < cfg.batch_size:
        raise ConfigError(
            f"--batch-size {cfg.batch_size} is larger than the training set "
            f"({manifest['counts']['train']} frames)"
        )
    backbone = None
    if cfg.backbone_weights:
        n_class = manifest.get("n_class", labels.N_CLASSES)
        try:
            backbone = load_backbone_weights(cfg.backbone_weights, cfg.model, n_class)
        except BackboneWeightsError as e:
            raise ConfigError(f"--backbone-weights: {e}") from None
    return manifest, backbone


#: What a resumed run must share with the run it continues: the model and its recipe. (Scale,
#: tracking and checkpoint options may change between attempts.)
RESUME_MUST_MATCH = ("model", "backbone_weights", "epochs", "batch_size", "recipe", "lr",
                     "momentum", "weight_decay", "learn_upsampling", "seed", "shuffle_buffer",
                     "amp", "augment")  # fmt: skip


def check_resume_config(cfg: TrainConfig, tracking_uri: str) -> dict[str, str]:
    """Refuse to resume a run with other hyperparameters than it started with: the restored
    optimizer and schedule would silently override some and the run's params would show the
    old ones; with ``allow_config_change``, returns the changed values (to record). (``cfg``
    is resolved: recipe defaults filled in, as they were logged.)"""
    logged = tracking.run_params(cfg.experiment, cfg.run_name, tracking_uri)
    if not logged:
        return {}
    now = as_dict(cfg)
    changed = {k: str(now[k]) for k in RESUME_MUST_MATCH
               if k in logged and logged[k] != str(now[k])}  # fmt: skip
    diff = [f"{k} {logged[k]} -> {v}" for k, v in changed.items()]
    if diff and not cfg.allow_config_change:
        raise ConfigError(
            f"--run-name {cfg.run_name} started with other hyperparameters than these: "
            f"{', '.join(diff)}. Resume with the run's values, start a new --run-name, or "
            "pass --allow-config-change"
        )
    if diff:
        print(f"resuming with changed hyperparameters: {', '.join(diff)}", flush=True)
    return changed


def resumed_data(
    cfg: TrainConfig, data: DatasetVersion, tracking_uri: str
) -> DatasetVersion | None:
    """For a resumed run whose dataset has a newer version now, the version it started on (in
    its params), so that a version committed meanwhile never mixes into the training of one
    model; else None."""
    tracking.check_tracking(tracking_uri)
    started_on = tracking.run_param(cfg.experiment, cfg.run_name, "data_version_uri", tracking_uri)
    if not started_on or started_on == data.uri:
        return None
    print(f"resuming on the dataset version the run started on: {started_on}", flush=True)
    return resolve_dataset(started_on)


def provenance_of(cfg: TrainConfig, data: DatasetVersion) -> dict[str, str]:
    """Where the model comes from: the data version (and its manifest's digest) and the code;
    params of the run, tags of the registered version, info of every checkpoint."""
    return {
        "data": data.root,
        "data_version": data.name,
        "data_version_uri": data.uri,
        "data_manifest": data.manifest_uri,
        "data_manifest_sha256": data.manifest_sha256,
        "code_version": code_version(),
        "run_name": cfg.run_name,
    }


def code_version() -> str:
    """The package version, the git commit when there is one, and a digest of the code."""
    root = Path(__file__).resolve().parents[2]
    digest = hashlib.sha256()
    for pkg in ("fcn_models", "pipelines", "jobs"):
        for path in sorted((root / pkg).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    version = f"code-{digest.hexdigest()[:12]}"
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()  # fmt: skip
        version = f"git-{commit}+{version}"
    except (OSError, subprocess.SubprocessError):
        pass
    return version


def start_or_resume_run(
    cfg: TrainConfig, tracking_uri: str, params: dict, data: DatasetVersion
) -> tuple[str, bool]:
    """The MLflow run for ``cfg.run_name``: the existing one when resuming, else a new one
    with its params and its data as MLflow dataset inputs (the Datasets column)."""
    import mlflow

    experiment_id = tracking.ensure_experiment(cfg.experiment, tracking_uri)
    run_id = tracking.find_run(experiment_id, cfg.run_name, tracking_uri)
    resumed = run_id is not None
    if resumed:
        mlflow.start_run(run_id=run_id)
    else:
        run = mlflow.start_run(experiment_id=experiment_id, run_name=cfg.run_name)
        run_id = run.info.run_id
        mlflow.log_params(tracking.redact(params))
        for split, context in (("train", "training"), ("val", "validation")):
            mlflow.log_input(tracking.dataset_input(data, split), context=context)
    return run_id, resumed


def make_trainer(cfg: TrainConfig, loop: LoopConfig, storage: Location):
    """Ray Train's ``TorchTrainer`` for the run: DDP workers, checkpoints in ``storage`` (best
    ``keep_checkpoints`` by val mIoU), restarts from the last one, the shards as datasets."""
    import ray.train
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop.to_dict(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={
                "CPU": cfg.cpus_per_worker,
                **({"GPU": 1} if cfg.use_gpu else {}),
            },
        ),
        run_config=ray.train.RunConfig(
            name=cfg.run_name,
            storage_path=storage.path,
            storage_filesystem=storage.patient_fs,  # checkpoint uploads ride out outages
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.keep_checkpoints,
                checkpoint_score_attribute="val_miou",
                checkpoint_score_order="max",
            ),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            worker_runtime_env=faults.runtime_env(),  # the tests' armed fault points
        ),
        datasets={
            "train": build_dataset(cfg.data, "train", shuffle_seed=cfg.seed),
            "val": build_dataset(cfg.data, "val"),
        },
        dataset_config=split_config(),
    )


def fit(cfg: TrainConfig, loop: LoopConfig, storage: Location):
    """``trainer.fit()`` under the watchdog; the result, or the exit status of a failure (its
    message and how to resume printed, the MLflow run marked FAILED)."""
    import ray
    import ray.train

    resume = (
        f"Checkpoints are kept in {storage.join(cfg.run_name).uri}: re-run the same "
        f"command (--run-name {cfg.run_name}) to resume from the last one."
    )
    dog = watchdog.Watchdog(
        cfg.stall_minutes * 60,
        "training",
        poll=lambda: ray.get(loop.progress.last.remote(), timeout=30),
        hint=f"The cluster has {capacity.cluster().describe()}: if the job waits for "
        "resources, lower --num-workers or add nodes; if steps are just slow, raise "
        "--stall-minutes",
    )
    trainer = make_trainer(cfg, loop, storage)
    try:
        with dog:
            return trainer.fit()
    except watchdog.Stalled as e:
        end_run_quietly("FAILED")
        print(f"error: {e}\n{resume}", file=sys.stderr)
        return Exit.STALLED
    except ray.train.TrainingFailedError as e:
        # The workers' own tracebacks are already in the log above; say what it means.
        end_run_quietly("FAILED")
        if (why := broken_gpu(e)) is not None:
            print(f"error: {why}", file=sys.stderr)
            return Exit.BROKEN_GPU
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(
            f"error: training failed after {cfg.max_failures} restart(s): {first}\n{resume}",
            file=sys.stderr,
        )
        return 1
    except BaseException:
        end_run_quietly("FAILED")
        raise


#: NCCL refusing a process group on a worker without a usable GPU (Ray Train sets it up
#: before the loop runs).
_NCCL_WITHOUT_GPU = re.compile(r"ProcessGroupNCCL is only supported with GPUs.*")
#: A worker's BrokenGpuError as text, where Ray kept only text.
_BROKEN_GPU_TEXT = re.compile(r"BrokenGpuError: (.+)")


def broken_gpu(failure: BaseException) -> str | None:
    """The one-line reason when a training failure is a worker Ray gave a GPU that CUDA cannot
    use, else None: the loop's own :class:`BrokenGpuError` (:mod:`pipelines.inference.device`),
    found among the exceptions Ray Train keeps per rank (the failure's text is cut in the
    middle past 1,000 characters, so the text alone can lose it), or NCCL refusing a process
    group."""
    causes = [failure, *getattr(failure, "worker_failures", {}).values()]
    if getattr(failure, "controller_failure", None) is not None:
        causes.append(failure.controller_failure)
    for cause in causes:
        while cause is not None:
            if isinstance(cause, BrokenGpuError):
                return str(cause)
            cause = cause.__cause__
    text = "\n".join(str(c) for c in causes)
    if m := _BROKEN_GPU_TEXT.search(text):
        return m[1]
    if m := _NCCL_WITHOUT_GPU.search(text):
        return (
            f"the training workers were given GPUs that CUDA cannot use ({m[0].strip()}); use an "
            "image whose CUDA the nodes' driver supports, or nodes with a newer driver"
        )
    return None


def end_run_quietly(status: str) -> None:
    """Mark the MLflow run ended; a tracking server that is down must not hide the error (or
    the resume message) that follows."""
    import mlflow

    try:
        mlflow.end_run(status=status)
    except Exception as e:  # noqa: BLE001
        print(
            f"warning: could not mark the MLflow run {status} ({type(e).__name__}); "
            "it stays RUNNING until the run is resumed",
            file=sys.stderr,
        )


def best_checkpoint(result):
    """(checkpoint, metrics) with the best val mIoU (the later epoch on a tie), or the last."""
    candidates = [(c, m) for c, m in (result.best_checkpoints or []) if "val_miou" in m]
    if not candidates:
        return (result.checkpoint, result.metrics) if result.checkpoint else None
    return max(candidates, key=lambda cm: (cm[1]["val_miou"], cm[1]["epoch"]))


def register(cfg: TrainConfig, checkpoint, metrics: dict, provenance: dict):
    """Log the best checkpoint as a pyfunc model in the run and register it, with tags."""
    import mlflow

    from pipelines.registry.pyfunc import register_model_dir

    tags = {
        "val_miou": f"{metrics['val_miou']:.6f}",
        "epoch": str(metrics["epoch"]),
        "run_name": cfg.run_name,
        **{k: provenance[k] for k in ("data", "data_version", "data_manifest",
                                      "data_manifest_sha256", "code_version")},
    }  # fmt: skip
    with checkpoint.as_directory() as d:
        version = register_model_dir(d, cfg.register_as, tags)
    mlflow.log_metric("best_val_miou", metrics["val_miou"])
    return version
