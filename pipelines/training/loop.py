"""The Ray Train adapter around the engine (:mod:`pipelines.training.engine`): what every
worker runs. Config in; per epoch, this rank's Ray Data shard as batches -> ``train_one_epoch``
-> ``evaluate`` on this rank's exact part of the validation split, summed over the ranks -> a
checkpoint and ``ray.train.report``. Rank 0 also keeps the MLflow record
(:mod:`pipelines.training.record`), progress lines, and reports steps to the driver's watchdog.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipelines.core import labels
from pipelines.core.metrics import flat_metrics, scores
from pipelines.inference.device import check_gpu
from pipelines.inference.model_dir import ModelSpec, unwrap
from pipelines.runtime import faults
from pipelines.runtime.progress import StepLine
from pipelines.training import engine
from pipelines.training.augment import Augment, augment_batch, step_generator
from pipelines.training.batches import torch_batches
from pipelines.training.checkpoint import checkpoint_due, read_epoch_record, write_epoch_record
from pipelines.training.config import LoopConfig
from pipelines.training.distributed import (
    allreduce_bytes_per_step,
    broadcast_buffers,
    check_replicas_agree,
    compress_gradients,
    sum_over_ranks,
)
from pipelines.training.engine import EpochStats, TrainState
from pipelines.training.record import EpochLogger, SystemMetrics, epoch_pictures, overlay_samples

log = logging.getLogger(__name__)


@dataclass
class Rank:
    """This worker's place in the run: its rank, the world size, and the run's config."""

    cfg: LoopConfig
    rank: int
    world: int
    steps_per_epoch: int

    @property
    def batch_size(self) -> int:
        return self.cfg.job.batch_size // self.world


@dataclass
class Rank0Record:
    """What only rank 0 keeps: the MLflow record, the node's system metrics, progress lines."""

    tracker: EpochLogger | None
    system: SystemMetrics | None
    lines: StepLine


def train_loop_per_worker(config: dict) -> None:
    import ray.train

    cfg = LoopConfig.from_dict(config)
    # Subnormal floats (the first steps' tiny gradients behind the zero-initialised heads)
    # make x86 CPUs ~10x slower; flushing them to zero changes nothing a model can learn.
    torch.set_flush_denormal(True)
    me, state, start_epoch, resumed_record = start(cfg)
    record = rank0_record(me, state, start_epoch, resumed_record) if me.rank == 0 else None
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    for epoch in range(start_epoch, cfg.job.epochs):
        seed = engine.epoch_seed(cfg.job.seed, epoch, me.rank)
        torch.manual_seed(seed)  # dropout (VGG FCNs)
        stats = train_epoch(me, state, train_shard, epoch, seed, record)
        metrics, details, pictures = validate(me, state, val_shard, epoch, stats)
        checkpoint_and_report(me, state, metrics, details, pictures)
        if record is not None:
            end_of_epoch(me, record, epoch, metrics, pictures)
    if record is not None:
        for part in (record.system, record.tracker):
            if part is not None:
                part.close()


def start(cfg: LoopConfig) -> tuple[Rank, TrainState, int, tuple | None]:
    """This rank's engine state, resumed from the run's last checkpoint when there is one;
    returns (rank, state, first epoch, rank 0's resumed MLflow record)."""
    import ray
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    check_gpu(ray.get_gpu_ids())  # never a silent CPU fallback on a broken GPU
    device = ray.train.torch.get_device()
    checkpoint = ray.train.get_checkpoint()
    train_state = resumed_record = None
    if checkpoint:
        with checkpoint.as_directory() as d:  # one download (S3) for model and train state
            model, train_state = engine.load_checkpoint(d)
            if rank == 0:
                resumed_record = read_epoch_record(Path(d))
    else:
        backbone = ray.get(cfg.backbone_weights) if cfg.backbone_weights is not None else None
        model = engine.build_model(cfg.job.model, cfg.n_class, seed=cfg.job.seed,
                                   backbone_weights=backbone)  # fmt: skip
    # The step count is known before training from the manifest: streaming_split(equal=True)
    # gives every rank floor(frames / world) rows, and the last partial batch is dropped.
    steps = max(1, (cfg.train_frames // world) // (cfg.job.batch_size // world))
    state = engine.build_train_state(
        model, cfg.recipe, total_steps=steps * cfg.job.epochs, device=device,
        amp=bool(cfg.job.amp), wrap=lambda m: ddp(m, cfg, device, world),
    )  # fmt: skip
    start_epoch = 0
    if train_state is not None:
        start_epoch = engine.resume(state, train_state,
                                    new_hyperparameters=cfg.job.allow_config_change)  # fmt: skip
    return Rank(cfg, rank, world, steps), state, start_epoch, resumed_record


def ddp(model: nn.Module, cfg: LoopConfig, device: torch.device, world: int) -> nn.Module:
    """The model as DDP trains it across the ranks (Ray Train's ``prepare_model``), with
    SyncBatchNorm and bf16 gradient compression when asked."""
    import ray.train.torch

    if cfg.job.sync_batchnorm and device.type == "cuda" and world > 1:
        # BatchNorm statistics over the global batch, not each GPU's few frames (torchvision's
        # segmentation reference does the same). gloo on CPU has no SyncBatchNorm kernel.
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = ray.train.torch.prepare_model(model)
    compress_gradients(model, cfg.job.grad_compression)
    return model


def rank0_record(me: Rank, state: TrainState, start_epoch: int, resumed: tuple | None):
    """Rank 0's MLflow record (catching up what a resumed run's last epoch never sent),
    system metrics and progress lines; logs what each step all-reduces."""
    job, tracker, system = me.cfg.job, None, None
    if me.cfg.mlflow_run_id:
        tracker = EpochLogger(me.cfg.tracking_uri, me.cfg.mlflow_run_id)
        if resumed is not None:
            tracker.catch_up(*resumed)
        if job.system_metrics_seconds > 0:
            system = SystemMetrics(me.cfg.tracking_uri, me.cfg.mlflow_run_id,
                                   job.system_metrics_seconds)  # fmt: skip
    lines = StepLine(job.progress_seconds or float("inf"), me.steps_per_epoch, job.epochs,
                     start_epoch)  # fmt: skip
    # What each step puts on the wire (once per run attempt): the log and the run's
    # allreduce_bytes_per_step metric.
    sent = allreduce_bytes_per_step(state.model, job.grad_compression)
    log.info("DDP all-reduces %.1f MB of gradients per step per rank (--grad-compression %s)",
             sent / 1e6, job.grad_compression)  # fmt: skip
    if tracker is not None:
        tracker.log_epoch(start_epoch, {"allreduce_bytes_per_step": sent}, {})
    return Rank0Record(tracker, system, lines)


def train_epoch(me: Rank, state: TrainState, shard, epoch: int, seed: int,
                record: Rank0Record | None) -> EpochStats:  # fmt: skip
    """This rank's part of the training set through :func:`engine.train_one_epoch`: raw
    batches augmented on the device (``--augment``), else normalized by the collate."""
    transform, augment = me.cfg.transform, None
    if me.cfg.job.augment:
        generator = step_generator(state.device, seed)

        def augment(b: dict) -> dict:
            return augment_batch(b, Augment(), transform, generator)

    batches = torch_batches(
        shard, me.batch_size, transform, state.device, drop_last=True,
        shuffle_buffer=me.cfg.job.shuffle_buffer, shuffle_seed=seed, normalize=augment is None,
    )  # fmt: skip

    def stepped(step_in_epoch: int, images: int, loss: torch.Tensor) -> None:
        faults.point("train.step", step=state.global_step, storage=me.cfg.job.storage,
                     run_name=me.cfg.job.run_name)  # fmt: skip
        if me.cfg.progress is not None:
            me.cfg.progress.beat.remote(f"epoch {epoch + 1} step {state.global_step}")
        record.lines.step(epoch, step_in_epoch, images, loss,
                          end_of_epoch=step_in_epoch == me.steps_per_epoch)  # fmt: skip

    on_step = stepped if record is not None else None
    return engine.train_one_epoch(state, batches, augment=augment, on_step=on_step)


def validate(me: Rank, state: TrainState, shard, epoch: int,
             train: EpochStats) -> tuple[dict, dict, dict[str, bytes]]:  # fmt: skip
    """Each rank scores its exact part of the split with rank 0's weights and buffers (what is
    checkpointed); the confusion matrices are summed over the ranks. Returns the epoch's
    metrics (reported), details (kept in the checkpoint) and pictures (rank 0's)."""
    t_val = time.perf_counter()
    net = unwrap(state.model)
    broadcast_buffers(net)
    check_replicas_agree(net)
    frames = torch.zeros((), device=state.device)
    samples: list = []
    n_samples = 4 if me.rank == 0 else 0

    def seen(batch: dict, pred: torch.Tensor) -> None:
        nonlocal frames
        frames += len(pred)
        if len(samples) < n_samples:
            samples.extend(overlay_samples(batch["image"], pred, me.cfg.transform,
                                           n_samples - len(samples)))  # fmt: skip

    # The plain module: no DDP collective per batch (the ranks' parts differ in length).
    batches = torch_batches(shard, me.batch_size, me.cfg.transform, state.device)
    conf = engine.evaluate(net, batches, me.cfg.n_class, autocast=state.autocast, on_batch=seen)
    val_seconds = time.perf_counter() - t_val
    stats = torch.stack([train.loss_sum, train.images, frames]).double()
    by_rank = sum_over_ranks(conf, stats, frames)
    metrics = {
        "epoch": epoch,
        "train_loss": float(stats[0] / max(1.0, float(stats[1]))),
        "train_images_per_s": float(stats[1]) / max(train.seconds, 1e-9),
        "epoch_setup_s": train.setup_s,
        "epoch_wait_s": train.wait_s,
        "epoch_compute_s": train.compute_s,
        "val_seconds": val_seconds,
        "lr": state.lr,
        "val_frames": int(stats[2]),  # every validation frame, scored once across ranks
        **flat_metrics(scores(conf.cpu().numpy()), "val_"),
    }
    details = {"val_confusion": conf.cpu().tolist(), "val_frames_by_rank": by_rank}
    pictures = epoch_pictures(epoch, conf, samples) if me.rank == 0 else {}
    return metrics, details, pictures


def checkpoint_and_report(me: Rank, state: TrainState, metrics: dict, details: dict,
                          pictures: dict) -> None:  # fmt: skip
    """On the epochs ``--checkpoint-every`` picks (and the last), rank 0 writes the checkpoint
    (DDP keeps the weights identical), with the epoch's MLflow record; every rank reports.
    With ``--checkpoint-upload async`` Ray Train uploads it from a background thread and
    deletes the local copy after: the ranks go on with the next epoch meanwhile (the upload
    is waited for before the run ends)."""
    import ray.train

    job = me.cfg.job
    upload = (ray.train.CheckpointUploadMode.ASYNC if job.checkpoint_upload == "async"
              else ray.train.CheckpointUploadMode.SYNC)  # fmt: skip
    if me.rank != 0 or not checkpoint_due(metrics["epoch"], job.epochs, job.checkpoint_every):
        ray.train.report(metrics, checkpoint=None, checkpoint_upload_mode=upload)
        return
    # Not a TemporaryDirectory: an async upload reads it after report returns. Ray deletes
    # it once uploaded (either mode); here only when the report itself fails.
    tmp = tempfile.mkdtemp(prefix="checkpoint-")
    try:
        info = {"epoch": metrics["epoch"], "val_miou": metrics["val_miou"], **me.cfg.provenance}
        spec = ModelSpec(model=job.model, n_class=me.cfg.n_class, transform=me.cfg.transform,
                         class_names=labels.CLASS_NAMES, info=info)  # fmt: skip
        engine.save_checkpoint(tmp, state, spec, metrics["epoch"])
        write_epoch_record(Path(tmp), metrics, details, pictures)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_upload_mode=upload,
                         delete_local_checkpoint_after_upload=True)  # fmt: skip
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def end_of_epoch(me: Rank, record: Rank0Record, epoch: int, metrics: dict, pictures: dict) -> None:
    """Rank 0, after the epoch's report: the watchdog's beat, the MLflow record, the log line."""
    if me.cfg.progress is not None:
        me.cfg.progress.beat.remote(f"epoch {epoch + 1} validated and checkpointed")
    if record.tracker is not None:
        record.tracker.log_epoch(epoch, metrics, pictures)
    if record.system is not None:
        record.system.keep_alive()
    # A logger, not print: Ray Train tees a worker's print into its own logger, so every
    # print line would reach the driver twice.
    log.info(
        "epoch %d/%d: loss %.4f val mIoU %.4f pixel acc %.4f %.1f img/s",
        epoch + 1, me.cfg.job.epochs, metrics["train_loss"], metrics["val_miou"],
        metrics["val_pixel_acc"], metrics["train_images_per_s"],
    )  # fmt: skip
