"""Train a lane segmentation FCN with Ray Train (DDP), track it in MLflow, register the best model.

    python -m jobs.train --data URI --num-workers N [--use-gpu] --epochs E --batch-size B \\
        --experiment NAME --register-as MODEL --storage URI [--run-name NAME] ...

Run it directly (starts a local Ray) or with ``ray job submit --working-dir . -- python -m
jobs.train ...`` against a cluster. Re-running with the same ``--run-name`` and ``--storage``
resumes from the last checkpoint and continues the same MLflow run.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import fcn_models
from jobs._cli import ConfigError, add_progress_arg, cli, init_ray, parse_args, quiet_ray_data
from pipelines import capacity, labels, tracking, watchdog
from pipelines.augment import Augment
from pipelines.dataset import build_dataset, shard_files, split_config
from pipelines.frames import FrameTransform
from pipelines.storage import resolve
from pipelines.training import (
    RECIPES,
    Recipe,
    RecipeError,
    make_recipe,
    train_loop_per_worker,
)
from pipelines.versions import DatasetVersion, resolve_dataset
from pipelines.weights import BackboneWeightsError, load_backbone_weights


@dataclass
class TrainConfig:
    data: str
    storage: str
    experiment: str
    register_as: str
    model: str = "fcn8s_resnet101"
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float | None = None  # default: 1, lowered to fit a small cluster
    cluster_cpus: float | None = None  # an autoscaling cluster's limit (default: what it has)
    stall_minutes: float = 30.0
    epochs: int = 10
    batch_size: int = 16
    recipe: str = "default"
    lr: float | None = None  # default: the recipe's
    momentum: float | None = None
    weight_decay: float | None = None
    learn_upsampling: bool = False
    seed: int = 0
    shuffle_buffer: int = 64
    progress_seconds: float = 30.0
    system_metrics_seconds: float = 10.0
    amp: bool | None = None  # default: on with GPUs
    backbone_weights: str | None = None
    run_name: str | None = None
    keep_checkpoints: int = 2
    max_failures: int = 3
    augment: bool = True
    skip_gpu_check: bool = False
    fail_once_at_step: int | None = None  # chaos testing


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jobs.train",
        description="Train an FCN on ingested lane shards with Ray Train (DDP); log to MLflow; "
        "register the best checkpoint. Options may also come from --config FILE (YAML, keys "
        "named like the flags); flags override the file.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", help="YAML file of options (flags override it)")
    g = p.add_argument_group("data and model")
    g.add_argument(
        "--data",
        required=True,
        help="ingested dataset (the --dest of jobs.ingest: its current version is used, "
        "resolved once; or a versions/NAME folder to pin one); local or s3://",
    )
    g.add_argument(
        "--model",
        default="fcn8s_resnet101",
        choices=fcn_models.MODEL_NAMES,
        help="model factory name",
    )
    g.add_argument(
        "--backbone-weights",
        help="ImageNet backbone state_dict (local path or s3:// URI), or 'torchvision' to download torchvision's (needs internet)",
    )
    g = p.add_argument_group("scale")
    g.add_argument(
        "--num-workers",
        type=int,
        default=2,
        help="Ray Train DDP workers (one per GPU with --use-gpu)",
    )
    g.add_argument(
        "--use-gpu",
        action="store_true",
        help="one GPU per worker (NCCL); otherwise CPU workers (gloo)",
    )
    g.add_argument(
        "--cpus-per-worker",
        type=float,
        help="logical CPUs reserved per training worker (default: 1, lowered when the cluster "
        "is too small to also run the data pipeline; given, it is kept or the job fails)",
    )
    g.add_argument(
        "--cluster-cpus",
        type=float,
        help="CPUs an autoscaling cluster can scale to (default: the CPUs it has now)",
    )
    g.add_argument(
        "--stall-minutes",
        type=float,
        default=30.0,
        help="fail the job when no training or validation step completes for this long "
        "(waiting for resources, a stuck data pipeline)",
    )
    g.add_argument(
        "--skip-gpu-check",
        action="store_true",
        help="with --use-gpu, do not require GPUs to be in the cluster now (GPU workers that autoscale from zero)",
    )
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, default=10)
    g.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="global batch size, split evenly over the workers",
    )
    g.add_argument(
        "--recipe",
        choices=RECIPES,
        default="default",
        help="default: SGD, poly decay, mean pixel loss (torchvision); reference: the FCN "
        "paper's Caffe solvers for the VGG FCNs (summed loss, fixed tiny lr, momentum 0.99)",
    )
    g.add_argument(
        "--lr", type=float, help="base learning rate (default: the recipe's, 0.01 for default)"
    )
    g.add_argument("--momentum", type=float, help="default: the recipe's (0.9 / 0.99)")
    g.add_argument("--weight-decay", type=float, help="default: the recipe's (1e-4 / 5e-4)")
    g.add_argument(
        "--learn-upsampling",
        action="store_true",
        help="train the bilinear-initialised upsamplers too (the reference keeps them fixed)",
    )
    g.add_argument(
        "--seed",
        type=int,
        default=0,
        help="initial weights, shuffling and dropout; each epoch draws from seed + epoch, so a "
        "resumed run continues the sequence",
    )
    g.add_argument(
        "--shuffle-buffer",
        type=int,
        default=64,
        help="frames per worker that each training batch is drawn from at random (0: off)",
    )
    add_progress_arg(g, "rank 0: step, images/s, loss, ETA of the epoch and the run; also at "
                     "the end of each epoch")  # fmt: skip
    g.add_argument(
        "--system-metrics-seconds",
        type=float,
        default=10.0,
        help="rank 0's node: CPU, memory and GPU utilisation sampled into the MLflow run "
        "(system/ metrics) this often; 0: off",
    )
    g.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast + channels_last (default: on with --use-gpu)",
    )
    g.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="flip / scale / colour augmentation of training frames",
    )
    g = p.add_argument_group("tracking and checkpoints")
    g.add_argument("--experiment", required=True, help="MLflow experiment name")
    g.add_argument(
        "--register-as", required=True, help="MLflow registered model name for the best checkpoint"
    )
    g.add_argument(
        "--storage",
        required=True,
        help="checkpoint storage URI (local folder or s3://bucket/prefix)",
    )
    g.add_argument(
        "--run-name",
        help="name of this run (Ray Train run and MLflow run); re-use it to resume. Default: MODEL-TIMESTAMP",
    )
    g.add_argument(
        "--keep-checkpoints", type=int, default=2, help="keep the best N checkpoints by val mIoU"
    )
    g.add_argument(
        "--max-failures",
        type=int,
        default=3,
        help="worker-group restarts from the last checkpoint before giving up",
    )
    g.add_argument("--fail-once-at-step", type=int, help=argparse.SUPPRESS)  # chaos testing
    return p


def load_config(argv: list[str] | None) -> TrainConfig:
    args = vars(parse_args(build_parser(), argv))
    args.pop("config", None)
    cfg = TrainConfig(**args)
    if cfg.num_workers < 1:
        raise ConfigError(f"--num-workers must be >= 1, got {cfg.num_workers}")
    if cfg.epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {cfg.epochs}")
    if cfg.cpus_per_worker is not None and cfg.cpus_per_worker <= 0:
        raise ConfigError(f"--cpus-per-worker must be > 0, got {cfg.cpus_per_worker:g}")
    if cfg.stall_minutes <= 0:
        raise ConfigError(f"--stall-minutes must be > 0, got {cfg.stall_minutes:g}")
    if cfg.batch_size < cfg.num_workers:
        raise ConfigError(
            f"--batch-size {cfg.batch_size} is smaller than --num-workers {cfg.num_workers}: "
            "the global batch is split over the workers, each needs at least one frame"
        )
    if cfg.batch_size % cfg.num_workers:
        raise ConfigError(
            f"--batch-size {cfg.batch_size} is not divisible by --num-workers {cfg.num_workers}: "
            f"the global batch is split evenly over the workers (try "
            f"{cfg.batch_size // cfg.num_workers * cfg.num_workers} or "
            f"{-(-cfg.batch_size // cfg.num_workers) * cfg.num_workers})"
        )
    if cfg.progress_seconds <= 0:
        raise ConfigError(f"--progress-seconds must be > 0, got {cfg.progress_seconds:g}")
    if cfg.system_metrics_seconds < 0:
        raise ConfigError(
            f"--system-metrics-seconds must be >= 0, got {cfg.system_metrics_seconds:g}"
        )
    if cfg.shuffle_buffer < 0:
        raise ConfigError(f"--shuffle-buffer must be >= 0, got {cfg.shuffle_buffer}")
    if cfg.model not in fcn_models.MODEL_NAMES:
        raise ConfigError(
            f"unknown --model {cfg.model!r}; choose one of {', '.join(fcn_models.MODEL_NAMES)}"
        )
    try:
        recipe = recipe_of(cfg)
    except RecipeError as e:
        raise ConfigError(str(e)) from None
    # The values in force, as params in MLflow and in the printed config.
    cfg.lr, cfg.momentum, cfg.weight_decay = recipe.lr, recipe.momentum, recipe.weight_decay
    if cfg.amp is None:
        cfg.amp = cfg.use_gpu
    if cfg.run_name is None:
        cfg.run_name = f"{cfg.model}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    return cfg


def recipe_of(cfg: TrainConfig) -> Recipe:
    return make_recipe(cfg.recipe, cfg.model, lr=cfg.lr, momentum=cfg.momentum,
                       weight_decay=cfg.weight_decay, learn_upsampling=cfg.learn_upsampling)  # fmt: skip


def code_version() -> str:
    """The package version, the git commit when there is one, and a digest of the code."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for pkg in ("fcn_models", "pipelines", "jobs"):
        for path in sorted((root / pkg).glob("*.py")):
            digest.update(path.name.encode() + path.read_bytes())
    version = f"code-{digest.hexdigest()[:12]}"
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        version = f"git-{commit}+{version}"
    except (OSError, subprocess.SubprocessError):
        pass
    return version


# --------------------------------------------------------------------------------------------
# The driver.
# --------------------------------------------------------------------------------------------
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


def preflight(cfg: TrainConfig, data: DatasetVersion) -> tuple[dict, dict | None]:
    """Every check on the data and arguments that can fail before a worker starts (before
    MLflow is touched, so that a bad argument is one line). Returns the data manifest and the
    backbone weights (checked against the model) when ``--backbone-weights`` is given."""
    import ray

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
    if cfg.use_gpu and not cfg.skip_gpu_check:
        gpus = ray.cluster_resources().get("GPU", 0)
        if gpus < cfg.num_workers:
            raise ConfigError(
                f"--use-gpu with --num-workers {cfg.num_workers} needs {cfg.num_workers} GPUs, "
                f"the Ray cluster has {gpus:g}; drop --use-gpu, lower --num-workers, or pass "
                "--skip-gpu-check if GPU workers autoscale from zero"
            )
    backbone = None
    if cfg.backbone_weights:
        n_class = manifest.get("n_class", labels.N_CLASSES)
        try:
            backbone = load_backbone_weights(cfg.backbone_weights, cfg.model, n_class)
        except BackboneWeightsError as e:
            raise ConfigError(f"--backbone-weights: {e}") from None
    return manifest, backbone


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


@cli
def main(argv: list[str] | None = None) -> int:
    import mlflow
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = load_config(argv)
    tracking_uri = tracking.configure()
    where = init_ray(min_cpus=int(cfg.num_workers * (cfg.cpus_per_worker or 1.0)) + 2)
    quiet_ray_data()
    cpus, note = capacity.fit_training(
        capacity.cluster(cfg.cluster_cpus), cfg.num_workers, cfg.cpus_per_worker or 1.0,
        explicit=cfg.cpus_per_worker is not None,
    )  # fmt: skip
    if note:
        print(note, flush=True)
    cfg = replace(cfg, cpus_per_worker=cpus)
    data = resolve_dataset(cfg.data)  # resolved once: the version this run trains on
    manifest, backbone = preflight(cfg, data)
    started_on = resumed_data(cfg, data, tracking_uri)
    if started_on is not None:
        data = started_on
        manifest, backbone = preflight(cfg, data)
    cfg = replace(cfg, data=data.uri)  # workers and datasets get the version folder
    transform = FrameTransform.from_dict(manifest["transform"])
    storage = resolve(cfg.storage)
    provenance = {
        "data": data.root,
        "data_version": data.name,
        "data_version_uri": data.uri,
        "data_manifest": data.manifest_uri,
        "data_manifest_sha256": data.manifest_sha256,
        "code_version": code_version(),
        "run_name": cfg.run_name,
    }
    params = {
        **asdict(cfg),
        "frame_transform": transform.to_dict(),
        **provenance,
        "train_frames": manifest["counts"]["train"],
        "val_frames": manifest["counts"]["val"],
    }
    params.pop("fail_once_at_step")
    run_id, resumed = start_or_resume_run(cfg, tracking_uri, params, data)
    print(
        f"{'resuming' if resumed else 'starting'} run {cfg.run_name!r} on {where} Ray: "
        f"{cfg.num_workers} {'GPU' if cfg.use_gpu else 'CPU'} workers, MLflow run {run_id} "
        f"at {tracking.display_uri(tracking_uri)}",
        flush=True,
    )

    progress = watchdog.progress_actor()  # rank 0 reports each step; the driver watches
    loop_config = {
        **asdict(cfg),
        "recipe": asdict(recipe_of(cfg)),
        # Read and checked once here; the workers get it through the object store.
        "backbone_weights_ref": ray.put(backbone) if backbone is not None else None,
        "transform": transform.to_dict(),
        "n_class": manifest.get("n_class", labels.N_CLASSES),
        "train_frames": manifest["counts"]["train"],
        "tracking_uri": tracking_uri,
        "mlflow_run_id": run_id,
        "provenance": provenance,
        "progress": progress,
    }
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
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
        ),
        datasets={
            "train": build_dataset(
                cfg.data, "train", Augment() if cfg.augment else None, shuffle_seed=cfg.seed
            ),
            "val": build_dataset(cfg.data, "val"),
        },
        dataset_config=split_config(),
    )
    resume = (
        f"Checkpoints are kept in {storage.join(cfg.run_name).uri}: re-run the same "
        f"command (--run-name {cfg.run_name}) to resume from the last one."
    )
    dog = watchdog.Watchdog(
        cfg.stall_minutes * 60,
        "training",
        poll=lambda: ray.get(progress.last.remote(), timeout=30),
        hint=f"The cluster has {capacity.cluster().describe()}: if the job waits for "
        "resources, lower --num-workers or add nodes; if steps are just slow, raise "
        "--stall-minutes",
    )
    try:
        with dog:
            result = trainer.fit()
    except watchdog.Stalled as e:
        end_run_quietly("FAILED")
        print(f"error: {e}\n{resume}", file=sys.stderr)
        return 1
    except ray.train.TrainingFailedError as e:
        # The workers' own tracebacks are already in the log above; say what it means.
        end_run_quietly("FAILED")
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(
            f"error: training failed after {cfg.max_failures} restart(s): {first}\n{resume}",
            file=sys.stderr,
        )
        return 1
    except BaseException:
        end_run_quietly("FAILED")
        raise
    best = _best_checkpoint(result)
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


def _best_checkpoint(result):
    candidates = [(c, m) for c, m in (result.best_checkpoints or []) if "val_miou" in m]
    if not candidates:
        return (result.checkpoint, result.metrics) if result.checkpoint else None
    return max(candidates, key=lambda cm: (cm[1]["val_miou"], cm[1]["epoch"]))


def register(cfg: TrainConfig, checkpoint, metrics: dict, provenance: dict):
    """Log the best checkpoint as a pyfunc model in the run and register it, with tags."""
    import mlflow

    from pipelines.registry import register_model_dir

    tags = {
        "val_miou": f"{metrics['val_miou']:.6f}",
        "epoch": str(metrics["epoch"]),
        "run_name": cfg.run_name,
        "data": provenance["data"],
        "data_version": provenance["data_version"],
        "data_manifest": provenance["data_manifest"],
        "data_manifest_sha256": provenance["data_manifest_sha256"],
        "code_version": provenance["code_version"],
    }
    with checkpoint.as_directory() as d:
        version = register_model_dir(d, cfg.register_as, tags)
    mlflow.log_metric("best_val_miou", metrics["val_miou"])
    return version


if __name__ == "__main__":
    sys.exit(main())
