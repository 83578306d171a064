"""The loop every Ray Train worker runs: config in, one epoch of DDP steps, validation on this
rank's exact part of the split, a checkpoint and ``ray.train.report`` out, per epoch.

Read top to bottom: :func:`train_loop_per_worker` builds (or resumes) the model, optimizer and
schedule, then for each epoch calls :func:`train_epoch`, :func:`validate` and
:func:`checkpoint_and_report`; rank 0 also keeps the MLflow record
(:mod:`pipelines.training.record`) and reports steps to the driver's watchdog.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import fcn_models
from pipelines.core import labels
from pipelines.core.metrics import confusion_matrix, flat_metrics, scores
from pipelines.inference.device import check_gpu
from pipelines.inference.model_dir import ModelSpec, load_model_dir, save_model_dir, unwrap
from pipelines.ops import faults
from pipelines.ops.progress import StepLine
from pipelines.training.augment import Augment, augment_batch, step_generator
from pipelines.training.batches import torch_batches
from pipelines.training.checkpoint import (
    checkpoint_due,
    load_train_state,
    read_epoch_record,
    restore_train_state,
    save_train_state,
    write_epoch_record,
)
from pipelines.training.config import LoopConfig
from pipelines.training.distributed import (
    allreduce_bytes_per_step,
    broadcast_buffers,
    check_replicas_agree,
    compress_gradients,
    sum_over_ranks,
)
from pipelines.training.recipe import make_loss, make_optimizer, set_trainable
from pipelines.training.record import EpochLogger, SystemMetrics, epoch_pictures, overlay_samples
from pipelines.training.step import epoch_seed, train_step

log = logging.getLogger(__name__)

# Marks, in run storage, that the "train.exit_at_step" fault point has fired for the run.
FAULT_MARKER = ".fault-exit-at-step-done"


@dataclass
class Worker:
    """This rank's place in the run and what it trains with."""

    cfg: LoopConfig
    rank: int
    world: int
    device: torch.device
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    criterion: object
    autocast: torch.autocast
    channels_last: bool
    steps_per_epoch: int
    global_step: int = 0

    @property
    def batch_size(self) -> int:
        return self.cfg.job.batch_size // self.world


def train_loop_per_worker(config: dict) -> None:
    import ray.train

    cfg = LoopConfig.from_dict(config)
    # Subnormal floats (the first steps' tiny gradients behind the zero-initialised heads)
    # make x86 CPUs ~10x slower; flushing them to zero changes nothing a model can learn.
    torch.set_flush_denormal(True)
    w, start_epoch, resumed_record = make_worker(cfg)
    tracker = system = lines = None
    if w.rank == 0:
        if cfg.mlflow_run_id:
            tracker = EpochLogger(cfg.tracking_uri, cfg.mlflow_run_id)
            if resumed_record is not None:
                tracker.catch_up(*resumed_record)
            if cfg.job.system_metrics_seconds > 0:
                system = SystemMetrics(cfg.tracking_uri, cfg.mlflow_run_id,
                                       cfg.job.system_metrics_seconds)  # fmt: skip
        lines = StepLine(cfg.job.progress_seconds or float("inf"), w.steps_per_epoch,
                         cfg.job.epochs, start_epoch)  # fmt: skip
        # What each step puts on the wire (once per run attempt): the log and the run's
        # allreduce_bytes_per_step metric.
        sent = allreduce_bytes_per_step(w.model, cfg.job.grad_compression)
        log.info("DDP all-reduces %.1f MB of gradients per step per rank (--grad-compression "
                 "%s)", sent / 1e6, cfg.job.grad_compression)  # fmt: skip
        if tracker is not None:
            tracker.log_epoch(start_epoch, {"allreduce_bytes_per_step": sent}, {})
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    for epoch in range(start_epoch, cfg.job.epochs):
        seed = epoch_seed(cfg.job.seed, epoch, w.rank)
        torch.manual_seed(seed)  # dropout (VGG FCNs)
        train = train_epoch(w, train_shard, epoch, seed, lines)
        metrics, details, pictures = validate(w, val_shard, epoch, train)
        checkpoint_and_report(w, metrics, details, pictures)
        if w.rank == 0 and cfg.progress is not None:
            cfg.progress.beat.remote(f"epoch {epoch + 1} validated and checkpointed")
        if tracker is not None:
            tracker.log_epoch(epoch, metrics, pictures)
        if system is not None:
            system.keep_alive()
        if w.rank == 0:
            # A logger, not print: Ray Train tees a worker's print into its own logger, so
            # every print line would reach the driver twice.
            log.info(
                "epoch %d/%d: loss %.4f val mIoU %.4f pixel acc %.4f %.1f img/s",
                epoch + 1, cfg.job.epochs, metrics["train_loss"], metrics["val_miou"],
                metrics["val_pixel_acc"], metrics["train_images_per_s"],
            )  # fmt: skip
    if system is not None:
        system.close()
    if tracker is not None:
        tracker.close()


def make_worker(cfg: LoopConfig) -> tuple[Worker, int, tuple | None]:
    """The model, optimizer and schedule of this rank, resumed from the run's last checkpoint
    when there is one; returns (worker, first epoch, rank 0's resumed MLflow record)."""
    import ray
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    check_gpu(ray.get_gpu_ids())  # never a silent CPU fallback on a broken GPU
    device = ray.train.torch.get_device()
    amp = bool(cfg.job.amp)
    channels_last = amp and device.type == "cuda"
    checkpoint = ray.train.get_checkpoint()
    train_state = resumed_record = None
    if checkpoint:
        with checkpoint.as_directory() as d:  # one download (S3) for model and train state
            model, _ = load_model_dir(d)
            train_state = load_train_state(Path(d))
            if rank == 0:
                resumed_record = read_epoch_record(Path(d))
    else:
        opts = {}
        if cfg.backbone_weights is not None:
            opts["backbone_weights"] = ray.get(cfg.backbone_weights)
        torch.manual_seed(cfg.job.seed)  # the same initial weights on every rank
        model = fcn_models.build_model(cfg.job.model, cfg.n_class, **opts)
    set_trainable(model, learn_upsampling=cfg.recipe.learn_upsampling)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.job.sync_batchnorm and device.type == "cuda" and world > 1:
        # BatchNorm statistics over the global batch, not each GPU's few frames (torchvision's
        # segmentation reference does the same). gloo on CPU has no SyncBatchNorm kernel.
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = ray.train.torch.prepare_model(model)
    compress_gradients(model, cfg.job.grad_compression)
    # The step count is known before training from the manifest: streaming_split(equal=True)
    # gives every rank floor(frames / world) rows, and the last partial batch is dropped.
    steps = max(1, (cfg.train_frames // world) // (cfg.job.batch_size // world))
    optimizer, scheduler = make_optimizer(model, cfg.recipe, steps * cfg.job.epochs)
    start_epoch, global_step = 0, 0
    if train_state is not None:
        start_epoch, global_step = restore_train_state(
            train_state, optimizer, scheduler, new_hyperparameters=cfg.job.allow_config_change
        )
    w = Worker(
        cfg=cfg, rank=rank, world=world, device=device, model=model, optimizer=optimizer,
        scheduler=scheduler, criterion=make_loss(cfg.recipe),
        autocast=torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp),
        channels_last=channels_last, steps_per_epoch=steps, global_step=global_step,
    )  # fmt: skip
    return w, start_epoch, resumed_record


def train_epoch(w: Worker, shard, epoch: int, seed: int, lines: StepLine | None) -> dict:
    """One pass of DDP steps over this rank's part of the training set. Returns its loss sum,
    frames and where its time went on this rank's clock: set-up until the first batch (Ray
    Data starts the epoch's execution), waiting for later batches, and the steps."""
    w.model.train()
    loss_sum = torch.zeros((), device=w.device)
    seen = torch.zeros((), device=w.device)
    t0 = time.perf_counter()
    augment = Augment() if w.cfg.job.augment else None
    generator = step_generator(w.device, seed)
    batches = torch_batches(
        shard, w.batch_size, w.cfg.transform, w.device, drop_last=True,
        shuffle_buffer=w.cfg.job.shuffle_buffer, shuffle_seed=seed, normalize=augment is None,
    )  # fmt: skip
    setup_s = wait_s = 0.0
    stream, first, step_in_epoch = iter(batches), True, 0
    while True:
        t_wait = time.perf_counter()
        batch = next(stream, None)
        if first:
            setup_s, first = time.perf_counter() - t_wait, False
        else:
            wait_s += time.perf_counter() - t_wait
        if batch is None:
            break
        if augment is not None:  # on the device, in the step's stream
            batch = augment_batch(batch, augment, w.cfg.transform, generator)
        loss = train_step(w.model, batch, w.criterion, w.optimizer, w.autocast,
                          channels_last=w.channels_last)  # fmt: skip
        w.scheduler.step()
        w.global_step += 1
        step_in_epoch += 1
        loss_sum += loss * len(batch["image"])
        seen += len(batch["image"])
        if w.rank == 0:
            _exit_at_step_fault(w)
            if w.cfg.progress is not None:
                w.cfg.progress.beat.remote(f"epoch {epoch + 1} step {w.global_step}")
            lines.step(epoch, step_in_epoch, len(batch["image"]), loss,
                       end_of_epoch=step_in_epoch == w.steps_per_epoch)  # fmt: skip
    seconds = time.perf_counter() - t0
    return {"loss_sum": loss_sum, "seen": seen, "seconds": seconds, "setup_s": setup_s,
            "wait_s": wait_s}  # fmt: skip


def validate(w: Worker, shard, epoch: int, train: dict) -> tuple[dict, dict, dict[str, bytes]]:
    """Each rank scores its exact part of the split with rank 0's weights and buffers (what is
    checkpointed); the confusion matrices are summed over the ranks. Returns the epoch's
    metrics (reported), details (kept in the checkpoint) and pictures (rank 0's)."""
    t_val = time.perf_counter()
    net = unwrap(w.model).eval()
    broadcast_buffers(net)
    check_replicas_agree(net)
    conf, val_frames, samples = evaluate_shard(
        net, shard, w.batch_size, w.cfg.transform, w.device, w.cfg.n_class, w.autocast,
        n_samples=4 if w.rank == 0 else 0,
    )  # fmt: skip
    val_seconds = time.perf_counter() - t_val
    stats = torch.stack([train["loss_sum"], train["seen"], val_frames]).double()
    by_rank = sum_over_ranks(conf, stats, val_frames)
    metrics = {
        "epoch": epoch,
        "train_loss": float(stats[0] / max(1.0, float(stats[1]))),
        "train_images_per_s": float(stats[1]) / max(train["seconds"], 1e-9),
        "epoch_setup_s": train["setup_s"],
        "epoch_wait_s": train["wait_s"],
        "epoch_compute_s": train["seconds"] - train["setup_s"] - train["wait_s"],
        "val_seconds": val_seconds,
        "lr": w.scheduler.get_last_lr()[0],
        "val_frames": int(stats[2]),  # every validation frame, scored once across ranks
        **flat_metrics(scores(conf.cpu().numpy()), "val_"),
    }
    details = {"val_confusion": conf.cpu().tolist(), "val_frames_by_rank": by_rank}
    pictures = epoch_pictures(epoch, conf, samples) if w.rank == 0 else {}
    return metrics, details, pictures


def evaluate_shard(
    net: nn.Module,
    shard,
    batch_size: int,
    transform,
    device: torch.device,
    n_class: int,
    autocast,
    n_samples: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[np.ndarray, np.ndarray]]]:
    """(confusion matrix, frames, up to ``n_samples`` (frame, prediction) pairs) of ``net``
    on this rank's part of a split. The plain module, so no DDP collective runs per batch
    (the ranks' parts differ in length)."""
    conf = torch.zeros(n_class, n_class, dtype=torch.int64, device=device)
    frames = torch.zeros((), device=device)
    samples: list[tuple[np.ndarray, np.ndarray]] = []
    with torch.no_grad(), autocast:
        for batch in torch_batches(shard, batch_size, transform, device):
            pred = net(batch["image"]).argmax(1)
            conf += confusion_matrix(pred, batch["label"], n_class)
            frames += len(pred)
            if len(samples) < n_samples:
                samples += overlay_samples(
                    batch["image"], pred, transform, n_samples - len(samples)
                )
    return conf, frames, samples


def checkpoint_and_report(w: Worker, metrics: dict, details: dict, pictures: dict) -> None:
    """On the epochs ``--checkpoint-every`` picks (and the last), rank 0 writes the checkpoint
    (DDP keeps the weights identical), with the epoch's MLflow record; every rank reports.
    With ``--checkpoint-upload async`` Ray Train uploads it from a background thread and
    deletes the local copy after: the ranks go on with the next epoch meanwhile (the upload
    is waited for before the run ends)."""
    import ray.train

    job = w.cfg.job
    upload = (ray.train.CheckpointUploadMode.ASYNC if job.checkpoint_upload == "async"
              else ray.train.CheckpointUploadMode.SYNC)  # fmt: skip
    if w.rank != 0 or not checkpoint_due(metrics["epoch"], job.epochs, job.checkpoint_every):
        ray.train.report(metrics, checkpoint=None, checkpoint_upload_mode=upload)
        return
    # Not a TemporaryDirectory: an async upload reads it after report returns. Ray deletes
    # it once uploaded (either mode); here only when the report itself fails.
    tmp = tempfile.mkdtemp(prefix="checkpoint-")
    try:
        info = {"epoch": metrics["epoch"], "val_miou": metrics["val_miou"], **w.cfg.provenance}
        spec = ModelSpec(model=job.model, n_class=w.cfg.n_class, transform=w.cfg.transform,
                         class_names=labels.CLASS_NAMES, info=info)  # fmt: skip
        save_model_dir(tmp, w.model, spec)
        save_train_state(Path(tmp), w.optimizer, w.scheduler, metrics["epoch"], w.global_step)
        write_epoch_record(Path(tmp), metrics, details, pictures)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_upload_mode=upload,
                         delete_local_checkpoint_after_upload=True)  # fmt: skip
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _exit_at_step_fault(w: Worker) -> None:
    """Fault point ``train.exit_at_step`` (:mod:`pipelines.ops.faults`): rank 0's process dies
    once at that global step, to exercise a resume from the last checkpoint. A marker in run
    storage makes it happen once per run."""
    from pipelines.storage import resolve

    at = faults.armed("train.exit_at_step")
    if not at or w.global_step != int(at):
        return
    marker = resolve(w.cfg.job.storage).join(w.cfg.job.run_name, FAULT_MARKER)
    if marker.exists():
        return
    marker.write_text(f"failed at step {w.global_step}\n")
    # The fault is of a worker that dies *after* a checkpoint was recorded: Ray Train's
    # controller registers a reported checkpoint when it next polls the workers (every 2 s,
    # later on a loaded machine); dying before that poll loses the registration, and the
    # re-run would start from scratch. (Seen on 2 cores: the kill came 3 s after the report.)
    time.sleep(8)
    faults.exit_process("train.exit_at_step", 1)
