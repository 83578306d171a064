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
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

import fcn_models
from jobs._cli import ConfigError, cli, init_ray, parse_args, quiet_ray_data
from pipelines import labels, tracking
from pipelines.dataset import Augment, build_dataset, shard_files, split_config, torch_batches
from pipelines.frames import FrameTransform
from pipelines.ingest import MANIFEST_NAME, manifest_sha256, read_manifest
from pipelines.metrics import confusion_matrix, flat_metrics, scores
from pipelines.pictures import confusion_png, grid, overlay
from pipelines.predictor import ModelSpec, load_model_dir, save_model_dir, unwrap
from pipelines.storage import resolve

log = logging.getLogger("jobs.train")

TRAIN_STATE_FILE = "train_state.pt"
FAIL_MARKER = ".fail-once-done"


@dataclass
class TrainConfig:
    data: str
    storage: str
    experiment: str
    register_as: str
    model: str = "fcn8s_resnet101"
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    epochs: int = 10
    batch_size: int = 16
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
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
        help="ingested dataset URI (folder with train/, val/ and manifest.json; local or s3://)",
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
        "--cpus-per-worker", type=float, default=1.0, help="CPUs reserved per training worker"
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
        "--lr", type=float, default=0.01, help="base learning rate (SGD, poly decay power 0.9)"
    )
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=1e-4)
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
    if cfg.batch_size < cfg.num_workers:
        raise ConfigError(
            f"--batch-size {cfg.batch_size} is smaller than --num-workers {cfg.num_workers}: "
            "the global batch is split over the workers, each needs at least one frame"
        )
    if cfg.model not in fcn_models.MODEL_NAMES:
        raise ConfigError(
            f"unknown --model {cfg.model!r}; choose one of {', '.join(fcn_models.MODEL_NAMES)}"
        )
    if cfg.amp is None:
        cfg.amp = cfg.use_gpu
    if cfg.run_name is None:
        cfg.run_name = f"{cfg.model}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    return cfg


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
# The training loop, run by every Ray Train worker.
# --------------------------------------------------------------------------------------------
def train_loop_per_worker(config: dict) -> None:
    import ray.train
    import ray.train.torch
    from torch import nn

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    transform = FrameTransform.from_dict(config["transform"])
    n_class = config["n_class"]
    per_worker_batch = config["batch_size"] // world
    amp = bool(config["amp"])
    torch.manual_seed(config.get("seed", 0))

    # -- model, optimizer, schedule; resumed from the last checkpoint when there is one -----
    checkpoint = ray.train.get_checkpoint()
    state = None
    if checkpoint:
        with checkpoint.as_directory() as d:
            model, _ = load_model_dir(d)
            state = torch.load(Path(d) / TRAIN_STATE_FILE, map_location="cpu", weights_only=False)
    else:
        opts = {}
        if config.get("backbone_weights"):
            from pipelines.weights import load_state_dict

            opts["backbone_weights"] = load_state_dict(config["backbone_weights"])
        model = fcn_models.build_model(config["model"], n_class, **opts)
    if amp and device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    if device.type == "cuda" and world > 1:
        # BatchNorm statistics over the global batch, not each GPU's few frames (torchvision's
        # segmentation reference does the same). gloo on CPU has no SyncBatchNorm kernel.
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = ray.train.torch.prepare_model(model)

    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=config["lr"],
        momentum=config["momentum"],
        weight_decay=config["weight_decay"],
    )
    # torchvision segmentation recipe: poly decay, power 0.9, over all iterations. The step count
    # is known before training from the manifest: the training split is divided equally.
    steps_per_epoch = max(1, (config["train_frames"] // world) // per_worker_batch)
    total_steps = steps_per_epoch * config["epochs"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: max(0.0, 1 - step / total_steps) ** 0.9
    )
    start_epoch, global_step = 0, 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, global_step = state["epoch"] + 1, state["global_step"]
    criterion = nn.CrossEntropyLoss(ignore_index=labels.IGNORE_INDEX)

    mlflow_client = None
    if rank == 0 and config.get("mlflow_run_id"):
        from mlflow import MlflowClient

        mlflow_client = MlflowClient(
            tracking_uri=config["tracking_uri"], registry_uri=config["tracking_uri"]
        )

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)

    for epoch in range(start_epoch, config["epochs"]):
        # -- train ------------------------------------------------------------------------
        model.train()
        loss_sum = torch.zeros((), device=device)
        seen = torch.zeros((), device=device)
        t0 = time.perf_counter()
        for batch in torch_batches(
            train_shard, per_worker_batch, transform, device, drop_last=True
        ):
            loss = train_step(
                model,
                batch,
                criterion,
                optimizer,
                autocast,
                channels_last=amp and device.type == "cuda",
            )
            scheduler.step()
            global_step += 1
            loss_sum += loss * len(batch["image"])
            seen += len(batch["image"])
            _maybe_fail_once(config, rank, global_step)
        train_seconds = time.perf_counter() - t0

        # -- validate: each rank scores its exact part; confusion matrices are summed --------
        # The unwrapped module is used so that no DDP collective runs per (uneven) batch.
        net = unwrap(model).eval()
        conf = torch.zeros(n_class, n_class, dtype=torch.int64, device=device)
        val_frames = torch.zeros((), device=device)
        samples: list[tuple[np.ndarray, np.ndarray]] = []
        with torch.no_grad(), autocast:
            for batch in torch_batches(val_shard, per_worker_batch, transform, device):
                pred = net(batch["image"]).argmax(1)
                conf += confusion_matrix(pred, batch["label"], n_class)
                val_frames += len(pred)
                if rank == 0 and len(samples) < 4:
                    samples += _overlay_samples(batch["image"], pred, transform, 4 - len(samples))
        stats = torch.stack([loss_sum, seen, val_frames]).double()
        if world > 1:
            torch.distributed.all_reduce(conf)
            torch.distributed.all_reduce(stats)
        result = scores(conf.cpu().numpy())
        metrics = {
            "epoch": epoch,
            "train_loss": float(stats[0] / max(1.0, float(stats[1]))),
            "train_images_per_s": float(stats[1]) / max(train_seconds, 1e-9),
            "lr": scheduler.get_last_lr()[0],
            "val_frames": int(stats[2]),  # every validation frame, scored once across ranks
            **flat_metrics(result, "val_"),
        }

        # -- checkpoint (rank 0 writes; DDP keeps the weights identical) and report ---------
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                spec = ModelSpec(
                    model=config["model"],
                    n_class=n_class,
                    transform=transform,
                    class_names=labels.CLASS_NAMES,
                    info={"epoch": epoch, "val_miou": metrics["val_miou"], **config["provenance"]},
                )
                save_model_dir(tmp, model, spec)
                torch.save(
                    {
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "epoch": epoch,
                        "global_step": global_step,
                    },
                    Path(tmp) / TRAIN_STATE_FILE,
                )
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt)
        if mlflow_client is not None:
            _log_epoch(mlflow_client, config["mlflow_run_id"], epoch, metrics, conf, samples)
        if rank == 0:
            # A logger, not print: Ray Train tees a worker's print into its own logger, so
            # every print line would reach the driver twice.
            log.info(
                "epoch %d/%d: loss %.4f val mIoU %.4f pixel acc %.4f %.1f img/s",
                epoch + 1, config["epochs"], metrics["train_loss"], metrics["val_miou"],
                metrics["val_pixel_acc"], metrics["train_images_per_s"],
            )  # fmt: skip


def train_step(
    model, batch: dict, criterion, optimizer, autocast, *, channels_last: bool = False
) -> torch.Tensor:
    """One optimization step on a batch; returns the (detached) loss."""
    x, y = batch["image"], batch["label"]
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast:
        loss = criterion(model(x).float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def _maybe_fail_once(config: dict, rank: int, step: int) -> None:
    """Chaos testing: kill this worker's process once, at a given step, to exercise Ray
    Train's restart-from-checkpoint. A marker in run storage makes it happen only once."""
    at = config.get("fail_once_at_step")
    if at is None or rank != 0 or step != at:
        return
    marker = resolve(config["storage"]).join(config["run_name"], FAIL_MARKER)
    if marker.exists():
        return
    marker.write_text(f"failed at step {step}\n")
    log.warning("chaos: killing rank %d at step %d", rank, step)
    os._exit(1)


def _overlay_samples(images, pred, transform: FrameTransform, n: int) -> list:
    mean = torch.tensor(transform.mean, device=images.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(transform.std, device=images.device).view(1, 3, 1, 1) * 255
    raw = (images[:n].float() * std + mean).clamp(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy()
    return [(img, m) for img, m in zip(raw, pred[:n].byte().cpu().numpy(), strict=True)]


def _log_epoch(client, run_id: str, epoch: int, metrics: dict, conf, samples) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    values = [Metric(k, float(v), now, epoch) for k, v in metrics.items() if k != "epoch"]
    client.log_batch(run_id, metrics=values)
    client.log_image(
        run_id,
        np.asarray(_png_to_array(confusion_png(conf.cpu().numpy()))),
        artifact_file=f"confusion/epoch_{epoch:03d}.png",
    )
    if samples:
        picture = grid([overlay(img, m) for img, m in samples], columns=2, width=512)
        client.log_image(run_id, picture, artifact_file=f"overlays/epoch_{epoch:03d}.png")


def _png_to_array(data: bytes) -> np.ndarray:
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# --------------------------------------------------------------------------------------------
# The driver.
# --------------------------------------------------------------------------------------------
def preflight(cfg: TrainConfig, tracking_uri: str) -> dict:
    """Every check that can fail before a worker starts. Returns the data manifest."""
    import ray

    manifest = read_manifest(cfg.data)
    for split in ("train", "val"):
        if not shard_files(cfg.data, split):
            raise ConfigError(
                f"{resolve(cfg.data).join(split).uri}: no Parquet shards; "
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
    tracking.check_tracking(tracking_uri)
    return manifest


def start_or_resume_run(cfg: TrainConfig, tracking_uri: str, params: dict) -> tuple[str, bool]:
    """The MLflow run for ``cfg.run_name``: the existing one when resuming, else a new one."""
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
    return run_id, resumed


@cli
def main(argv: list[str] | None = None) -> int:
    import mlflow
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = load_config(argv)
    tracking_uri = tracking.configure()
    where = init_ray(min_cpus=int(cfg.num_workers * cfg.cpus_per_worker) + 2)
    quiet_ray_data()
    manifest = preflight(cfg, tracking_uri)
    transform = FrameTransform.from_dict(manifest["transform"])
    data_loc, storage = resolve(cfg.data), resolve(cfg.storage)
    provenance = {
        "data": data_loc.uri,
        "data_manifest": data_loc.join(MANIFEST_NAME).uri,
        "data_manifest_sha256": manifest_sha256(cfg.data),
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
    run_id, resumed = start_or_resume_run(cfg, tracking_uri, params)
    print(
        f"{'resuming' if resumed else 'starting'} run {cfg.run_name!r} on {where} Ray: "
        f"{cfg.num_workers} {'GPU' if cfg.use_gpu else 'CPU'} workers, MLflow run {run_id} "
        f"at {tracking.display_uri(tracking_uri)}",
        flush=True,
    )

    loop_config = {
        **asdict(cfg),
        "transform": transform.to_dict(),
        "n_class": manifest.get("n_class", labels.N_CLASSES),
        "train_frames": manifest["counts"]["train"],
        "tracking_uri": tracking_uri,
        "mlflow_run_id": run_id,
        "provenance": provenance,
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
            storage_filesystem=storage.fs,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=cfg.keep_checkpoints,
                checkpoint_score_attribute="val_miou",
                checkpoint_score_order="max",
            ),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
        ),
        datasets={
            "train": build_dataset(cfg.data, "train", augment=Augment() if cfg.augment else None),
            "val": build_dataset(cfg.data, "val"),
        },
        dataset_config=split_config(),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        # The workers' own tracebacks are already in the log above; say what it means.
        mlflow.end_run(status="FAILED")
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(
            f"error: training failed after {cfg.max_failures} restart(s): {first}\n"
            f"Checkpoints are kept in {storage.join(cfg.run_name).uri}: re-run the same "
            f"command (--run-name {cfg.run_name}) to resume from the last one.",
            file=sys.stderr,
        )
        return 1
    except BaseException:
        mlflow.end_run(status="FAILED")
        raise
    best = _best_checkpoint(result)
    if best is None:
        mlflow.end_run(status="FAILED")
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
