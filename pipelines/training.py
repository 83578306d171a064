"""How a model learns: the optimization recipe, its parameter groups, the step, and the loop
that every Ray Train worker runs (``jobs/train.py`` only parses, validates and wires).

Two recipes:

- ``default`` (torchvision's segmentation reference): SGD, momentum 0.9, weight decay 1e-4,
  learning rate 0.01 with poly decay (power 0.9) over all steps, loss averaged over pixels.
  For the ResNet-101 model and for VGG FCNs trained with per-pixel mean loss.
- ``reference`` (the FCN paper's Caffe solvers, VGG FCNs only): loss *summed* over pixels,
  fixed learning rate 1e-10 (FCN-32s), 1e-12 (FCN-16s), 1e-14 (FCN-8s, staged), 1e-10
  (FCN-8s at-once), momentum 0.99, weight decay 5e-4. The tiny rates are what a summed loss
  over ~10^5 pixels per image needs; momentum 0.99 averages over ~100 steps of batch 1.

Both share the reference nets' parameter groups: the bilinear upsamplers stay fixed (Caffe
``lr_mult: 0`` on every ``upscore*``) unless ``learn_upsampling``; biases learn at twice the
rate without weight decay (Caffe ``lr_mult: 2, decay_mult: 0``); normalization parameters
(the ResNet's BatchNorm) have no weight decay (torchvision's ``norm_weight_decay=0``).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import fcn_models
from pipelines import labels, tracking
from pipelines.errors import UserError
from pipelines.frames import FrameTransform
from pipelines.metrics import confusion_matrix, flat_metrics, scores
from pipelines.predictor import ModelSpec, load_model_dir, load_tensors, save_model_dir, unwrap
from pipelines.progress import duration

log = logging.getLogger("jobs.train")

TRAIN_STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.json"  # the epoch's metrics, validation confusion matrix, frames by rank
# The epoch's pictures as sent to MLflow, kept in its checkpoint too: a resumed run re-sends
# whatever of its last checkpoint's record never reached the run (the worker that was sending
# it died with its node, or with the whole job).
RECORD_DIR = "mlflow_record"
FAIL_MARKER = ".fail-once-done"

RECIPES = ("default", "reference")
# The FCN reference solvers (fcn.berkeleyvision.org voc-fcn*/solver.prototxt).
REFERENCE_LR = {"fcn32s": 1e-10, "fcn16s": 1e-12, "fcn8s": 1e-14, "fcn8s_atonce": 1e-10}


class RecipeError(UserError):
    """A recipe that does not apply to the chosen model."""


@dataclass(frozen=True)
class Recipe:
    """Optimizer, schedule and loss of one training run."""

    name: str
    lr: float
    momentum: float
    weight_decay: float
    poly_power: float | None  # None: a fixed learning rate
    loss_reduction: str  # "mean" over pixels, or "sum" over each image's pixels
    learn_upsampling: bool = False


def make_recipe(
    name: str,
    model: str,
    *,
    lr: float | None = None,
    momentum: float | None = None,
    weight_decay: float | None = None,
    learn_upsampling: bool = False,
) -> Recipe:
    """The named recipe for ``model``; explicit values override the recipe's own."""
    if name == "default":
        base = Recipe("default", 0.01, 0.9, 1e-4, 0.9, "mean", learn_upsampling)
    elif name == "reference":
        if model not in REFERENCE_LR:
            raise RecipeError(
                f"--recipe reference reproduces the FCN paper's VGG solvers "
                f"({', '.join(REFERENCE_LR)}); {model} has none: use --recipe default"
            )
        base = Recipe("reference", REFERENCE_LR[model], 0.99, 5e-4, None, "sum", learn_upsampling)
    else:
        raise RecipeError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
    return Recipe(
        base.name,
        base.lr if lr is None else lr,
        base.momentum if momentum is None else momentum,
        base.weight_decay if weight_decay is None else weight_decay,
        base.poly_power,
        base.loss_reduction,
        learn_upsampling,
    )


_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def set_trainable(model: nn.Module, *, learn_upsampling: bool) -> None:
    """Freeze (or unfreeze) the bilinear upsamplers: every transposed conv of the FCNs.

    Call before wrapping in DDP, which registers only parameters that require grad."""
    for m in model.modules():
        if isinstance(m, nn.ConvTranspose2d):
            m.requires_grad_(learn_upsampling)


def param_groups(model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """The reference parameter groups of the trainable parameters: weights (lr, decay),
    biases (2 x lr, no decay), normalization parameters (lr, no decay)."""
    norm_ids = {
        id(p) for m in model.modules() if isinstance(m, _NORMS) for p in m.parameters(False)
    }
    weights, biases, norms = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in norm_ids:
            norms.append(p)
        elif name.endswith("bias"):
            biases.append(p)
        else:
            weights.append(p)
    groups = [
        {"name": "weights", "params": weights, "lr": lr, "weight_decay": weight_decay},
        {"name": "biases", "params": biases, "lr": 2 * lr, "weight_decay": 0.0},
        {"name": "norm", "params": norms, "lr": lr, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def make_optimizer(
    model: nn.Module, recipe: Recipe, total_steps: int
) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.LambdaLR]:
    """SGD over the reference parameter groups, and the recipe's schedule (stepped once per
    optimizer step): poly decay to zero at ``total_steps``, or a fixed rate."""
    optimizer = torch.optim.SGD(
        param_groups(model, recipe.lr, recipe.weight_decay),
        lr=recipe.lr,
        momentum=recipe.momentum,
    )
    power = recipe.poly_power
    if power is None:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: max(0.0, 1 - step / total_steps) ** power
        )
    return optimizer, scheduler


def make_loss(recipe: Recipe):
    """Pixel-wise cross-entropy, ignore pixels excluded. ``sum``: summed over each image's
    pixels and averaged over images (Caffe's ``normalize: false`` divides by the batch)."""
    if recipe.loss_reduction == "mean":
        return nn.CrossEntropyLoss(ignore_index=labels.IGNORE_INDEX)
    summed = nn.CrossEntropyLoss(ignore_index=labels.IGNORE_INDEX, reduction="sum")
    return lambda logits, target: summed(logits, target) / len(target)


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


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """An independent 32-bit seed per (run seed, epoch, rank): a resumed run draws what the
    uninterrupted one would have drawn in that epoch, not epoch 0's numbers again."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def save_train_state(directory: Path, optimizer, scheduler, epoch: int, step: int) -> None:
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch,
            "global_step": step,
        },
        directory / TRAIN_STATE_FILE,
    )


def load_train_state(directory: Path) -> dict:
    """A checkpoint's optimizer and schedule state, loaded as data (``weights_only``):
    nothing is unpickled."""
    return load_tensors(directory / TRAIN_STATE_FILE)


def restore_train_state(state: dict, optimizer, scheduler) -> tuple[int, int]:
    """Optimizer (momentum buffers) and schedule position from :func:`load_train_state`;
    returns the (next epoch, global step)."""
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state["epoch"] + 1, state["global_step"]


def broadcast_buffers(model: nn.Module, src: int = 0) -> None:
    """Rank ``src``'s buffers (BatchNorm running statistics) on every rank. DDP broadcasts
    them before each training forward, but that forward then updates them per rank, so after
    the last step the ranks differ; validation must score the weights that are checkpointed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for b in model.buffers():
            dist.broadcast(b, src)


def sum_over_ranks(conf: torch.Tensor, stats: torch.Tensor, frames: torch.Tensor) -> list[int]:
    """``conf`` and ``stats`` summed over all ranks, in place; returns the frames each rank
    scored. Scores come from the summed confusion matrix, never from averaged rank scores."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [int(frames)]
    dist.all_reduce(conf)
    dist.all_reduce(stats)
    by_rank = [torch.zeros_like(frames) for _ in range(dist.get_world_size())]
    dist.all_gather(by_rank, frames)
    return [int(n) for n in by_rank]


def check_replicas_agree(model: nn.Module) -> None:
    """Raise unless every rank holds the same weights and buffers (a float64 checksum,
    compared by all-reduce min/max): validation must score one model, the checkpointed one."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    tensors = [t.detach() for t in (*model.parameters(), *model.buffers())]
    total = torch.stack([t.double().sum() for t in tensors]).sum()
    lo, hi = total.clone(), total.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if lo != hi:
        raise RuntimeError(
            f"rank {dist.get_rank()}: the ranks hold different weights or BatchNorm statistics "
            f"before validation (checksums {float(lo)!r} .. {float(hi)!r})"
        )


# --------------------------------------------------------------------------------------------
# The training loop, run by every Ray Train worker.
# --------------------------------------------------------------------------------------------
def train_loop_per_worker(config: dict) -> None:
    import ray
    import ray.train
    import ray.train.torch

    from pipelines.dataset import torch_batches

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    transform = FrameTransform.from_dict(config["transform"])
    n_class = config["n_class"]
    per_worker_batch = config["batch_size"] // world
    amp = bool(config["amp"])
    recipe = Recipe(**config["recipe"])
    channels_last = amp and device.type == "cuda"
    # Subnormal floats (the first steps' tiny gradients behind the zero-initialised heads)
    # make x86 CPUs ~10x slower; flushing them to zero changes nothing a model can learn.
    torch.set_flush_denormal(True)

    # -- model, optimizer, schedule; resumed from the last checkpoint when there is one -----
    checkpoint = ray.train.get_checkpoint()
    train_state, resumed_record = None, None
    if checkpoint:
        with checkpoint.as_directory() as d:  # one download (S3) for model and train state
            model, _ = load_model_dir(d)
            train_state = load_train_state(Path(d))
            if rank == 0:
                resumed_record = read_epoch_record(Path(d))
    else:
        opts = {}
        if config.get("backbone_weights_ref") is not None:
            opts["backbone_weights"] = ray.get(config["backbone_weights_ref"])
        torch.manual_seed(config["seed"])  # the same initial weights on every rank
        model = fcn_models.build_model(config["model"], n_class, **opts)
    set_trainable(model, learn_upsampling=recipe.learn_upsampling)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if device.type == "cuda" and world > 1:
        # BatchNorm statistics over the global batch, not each GPU's few frames (torchvision's
        # segmentation reference does the same). gloo on CPU has no SyncBatchNorm kernel.
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = ray.train.torch.prepare_model(model)

    # The step count is known before training from the manifest: streaming_split(equal=True)
    # gives every rank floor(frames / world) rows, and the last partial batch is dropped.
    steps_per_epoch = max(1, (config["train_frames"] // world) // per_worker_batch)
    optimizer, scheduler = make_optimizer(model, recipe, steps_per_epoch * config["epochs"])
    start_epoch, global_step = 0, 0
    if train_state is not None:
        start_epoch, global_step = restore_train_state(train_state, optimizer, scheduler)
    criterion = make_loss(recipe)

    tracker = system = None
    if rank == 0 and config.get("mlflow_run_id"):
        tracker = EpochLogger(config["tracking_uri"], config["mlflow_run_id"])
        if resumed_record is not None:
            tracker.catch_up(*resumed_record)
        if config.get("system_metrics_seconds", 0) > 0:
            system = SystemMetrics(config["tracking_uri"], config["mlflow_run_id"],
                                   config["system_metrics_seconds"])  # fmt: skip
    progress = config.get("progress") if rank == 0 else None  # the driver's stall watchdog
    lines = (
        StepProgress(
            config.get("progress_seconds", 30.0), steps_per_epoch, config["epochs"], start_epoch
        )  # fmt: skip
        if rank == 0
        else None
    )

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)

    for epoch in range(start_epoch, config["epochs"]):
        seed = epoch_seed(config["seed"], epoch, rank)
        torch.manual_seed(seed)  # dropout (VGG FCNs)
        # -- train ------------------------------------------------------------------------
        model.train()
        loss_sum = torch.zeros((), device=device)
        seen = torch.zeros((), device=device)
        t0 = time.perf_counter()
        batches = torch_batches(
            train_shard, per_worker_batch, transform, device, drop_last=True,
            shuffle_buffer=config["shuffle_buffer"], shuffle_seed=seed,
        )  # fmt: skip
        # Where the epoch's time goes (rank 0's clock): set-up until the first batch (Ray Data
        # starts the epoch's execution), waiting for later batches, and the steps themselves.
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
            loss = train_step(
                model, batch, criterion, optimizer, autocast, channels_last=channels_last
            )
            scheduler.step()
            global_step += 1
            step_in_epoch += 1
            loss_sum += loss * len(batch["image"])
            seen += len(batch["image"])
            _maybe_fail_once(config, rank, global_step)
            if progress is not None:
                progress.beat.remote(f"epoch {epoch + 1} step {global_step}")
            if lines is not None:
                lines.step(epoch, step_in_epoch, len(batch["image"]), loss,
                           end_of_epoch=step_in_epoch == steps_per_epoch)  # fmt: skip
        train_seconds = time.perf_counter() - t0

        # -- validate: each rank scores its exact part of the split with rank 0's weights and
        # buffers (what is checkpointed); the confusion matrices are summed ------------------
        t_val = time.perf_counter()
        net = unwrap(model).eval()
        broadcast_buffers(net)
        check_replicas_agree(net)
        conf, val_frames, samples = evaluate_shard(
            net, val_shard, per_worker_batch, transform, device, n_class, autocast,
            n_samples=4 if rank == 0 else 0,
        )  # fmt: skip
        val_seconds = time.perf_counter() - t_val
        stats = torch.stack([loss_sum, seen, val_frames]).double()
        by_rank = sum_over_ranks(conf, stats, val_frames)
        metrics = {
            "epoch": epoch,
            "train_loss": float(stats[0] / max(1.0, float(stats[1]))),
            "train_images_per_s": float(stats[1]) / max(train_seconds, 1e-9),
            "epoch_setup_s": setup_s,
            "epoch_wait_s": wait_s,
            "epoch_compute_s": train_seconds - setup_s - wait_s,
            "val_seconds": val_seconds,
            "lr": scheduler.get_last_lr()[0],
            "val_frames": int(stats[2]),  # every validation frame, scored once across ranks
            **flat_metrics(scores(conf.cpu().numpy()), "val_"),
        }
        details = {"val_confusion": conf.cpu().tolist(),
                   "val_frames_by_rank": by_rank}  # fmt: skip
        pictures = epoch_pictures(epoch, conf, samples) if rank == 0 else {}
        _checkpoint_and_report(config, rank, model, optimizer, scheduler, global_step, metrics,
                               details, pictures, transform)  # fmt: skip
        if progress is not None:
            progress.beat.remote(f"epoch {epoch + 1} validated and checkpointed")
        if tracker is not None:
            tracker.log_epoch(epoch, metrics, pictures)
        if system is not None:
            system.keep_alive()
        if rank == 0:
            # A logger, not print: Ray Train tees a worker's print into its own logger, so
            # every print line would reach the driver twice.
            log.info(
                "epoch %d/%d: loss %.4f val mIoU %.4f pixel acc %.4f %.1f img/s",
                epoch + 1, config["epochs"], metrics["train_loss"], metrics["val_miou"],
                metrics["val_pixel_acc"], metrics["train_images_per_s"],
            )  # fmt: skip
    if system is not None:
        system.close()
    if tracker is not None:
        tracker.close()


def evaluate_shard(
    net: nn.Module,
    shard,
    batch_size: int,
    transform: FrameTransform,
    device: torch.device,
    n_class: int,
    autocast,
    n_samples: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[np.ndarray, np.ndarray]]]:
    """(confusion matrix, frames, up to ``n_samples`` (frame, prediction) pairs) of ``net``
    on this rank's part of a split. The plain module, so no DDP collective runs per batch
    (the ranks' parts differ in length)."""
    from pipelines.dataset import torch_batches

    conf = torch.zeros(n_class, n_class, dtype=torch.int64, device=device)
    frames = torch.zeros((), device=device)
    samples: list[tuple[np.ndarray, np.ndarray]] = []
    with torch.no_grad(), autocast:
        for batch in torch_batches(shard, batch_size, transform, device):
            pred = net(batch["image"]).argmax(1)
            conf += confusion_matrix(pred, batch["label"], n_class)
            frames += len(pred)
            if len(samples) < n_samples:
                samples += _overlay_samples(
                    batch["image"], pred, transform, n_samples - len(samples)
                )
    return conf, frames, samples


def epoch_pictures(epoch: int, conf: torch.Tensor, samples) -> dict[str, bytes]:
    """The epoch's pictures for MLflow, by image key (logged at step ``epoch``): the confusion
    matrix and, with ``samples`` ((frame, prediction) pairs), their overlays."""
    from pipelines.pictures import confusion_png, grid, overlay, png

    pictures = {"confusion": confusion_png(conf.cpu().numpy())}
    if samples:
        tiles = grid([overlay(img, m) for img, m in samples], columns=2, width=512)
        pictures["overlays"] = png(tiles)
    return pictures


def write_epoch_record(
    directory: Path, metrics: dict, details: dict, pictures: dict[str, bytes]
) -> None:
    """The epoch's metrics and details (METRICS_FILE) and pictures (RECORD_DIR) in a
    checkpoint directory."""
    (directory / METRICS_FILE).write_text(json.dumps({**metrics, **details}, indent=1))
    for key, data in pictures.items():
        (directory / RECORD_DIR).mkdir(parents=True, exist_ok=True)
        (directory / RECORD_DIR / f"{key}.png").write_bytes(data)


def read_epoch_record(directory: Path) -> tuple[int, dict, dict[str, bytes]] | None:
    """(epoch, metrics, pictures) of a checkpoint written by this loop, as it was sent to
    MLflow; None for a checkpoint without one."""
    metrics_file, record = directory / METRICS_FILE, directory / RECORD_DIR
    if not metrics_file.is_file():
        return None
    logged = json.loads(metrics_file.read_text())
    metrics = {k: v for k, v in logged.items() if isinstance(v, (int, float)) and k != "epoch"}
    pictures = (
        {p.stem: p.read_bytes() for p in sorted(record.glob("*.png"))} if record.is_dir() else {}
    )
    return int(logged["epoch"]), metrics, pictures


def _checkpoint_and_report(
    config, rank, model, optimizer, scheduler, global_step, metrics, details, pictures, transform
) -> None:
    """Rank 0 writes the checkpoint (DDP keeps the weights identical), with the epoch's
    MLflow record; every rank reports."""
    import tempfile

    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if rank == 0:
            spec = ModelSpec(
                model=config["model"],
                n_class=config["n_class"],
                transform=transform,
                class_names=labels.CLASS_NAMES,
                info={
                    "epoch": metrics["epoch"],
                    "val_miou": metrics["val_miou"],
                    **config["provenance"],
                },
            )
            save_model_dir(tmp, model, spec)
            save_train_state(Path(tmp), optimizer, scheduler, metrics["epoch"], global_step)
            write_epoch_record(Path(tmp), metrics, details, pictures)
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt)


def _maybe_fail_once(config: dict, rank: int, step: int) -> None:
    """Chaos testing: kill this worker's process once, at a given step, to exercise Ray
    Train's restart-from-checkpoint. A marker in run storage makes it happen only once."""
    from pipelines.storage import resolve

    at = config.get("fail_once_at_step")
    if at is None or rank != 0 or step != at:
        return
    marker = resolve(config["storage"]).join(config["run_name"], FAIL_MARKER)
    if marker.exists():
        return
    marker.write_text(f"failed at step {step}\n")
    # The test is of a worker that dies *after* a checkpoint was recorded: Ray Train's
    # controller registers a reported checkpoint when it next polls the workers (every 2 s,
    # later on a loaded machine); dying before that poll loses the registration, and the
    # re-run would start from scratch. (Seen on 2 cores: the kill came 3 s after the report.)
    time.sleep(8)
    log.warning("chaos: killing rank %d at step %d", rank, step)
    os._exit(1)


def _overlay_samples(images, pred, transform: FrameTransform, n: int) -> list:
    mean = torch.tensor(transform.mean, device=images.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(transform.std, device=images.device).view(1, 3, 1, 1) * 255
    raw = (images[:n].float() * std + mean).clamp(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy()
    return [(img, m) for img, m in zip(raw, pred[:n].byte().cpu().numpy(), strict=True)]


class SystemMetrics:
    """MLflow's system metrics (``system/cpu_utilization_percentage``, memory, disk, network,
    and ``system/gpu_*`` where NVML is there) of this node, sampled into the run every
    ``interval_s``. MLflow's monitor thread stops for good when a call to the tracking server
    fails; :meth:`keep_alive` (called every epoch) starts a new one that continues the steps,
    so a server restart costs a gap, not the rest of the run. Never raises: monitoring must
    not end training."""

    def __init__(self, tracking_uri: str, run_id: str, interval_s: float) -> None:
        self.tracking_uri, self.run_id, self.interval_s = tracking_uri, run_id, interval_s
        self.monitor = None
        self.starts = 0
        self.keep_alive()

    def keep_alive(self) -> None:
        thread = self.monitor._process if self.monitor is not None else None
        if thread is not None and thread.is_alive():
            return
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(
                self.run_id, sampling_interval=self.interval_s, samples_before_logging=1,
                resume_logging=True, tracking_uri=self.tracking_uri,
            )  # fmt: skip
            self.monitor.start()
            self.starts += 1
        except Exception as e:  # noqa: BLE001
            log.warning("MLflow system metrics not recorded (%s: %s)", type(e).__name__, e)
            self.monitor = None

    def close(self) -> None:
        if self.monitor is not None:
            try:
                self.monitor.finish()
            except Exception as e:  # noqa: BLE001
                log.warning("MLflow system metrics: %s", e)


class StepProgress:
    """Rank 0's progress lines, readable under ``ray job submit`` (no terminal): at most
    every ``every_s`` seconds and at the end of each epoch, the step, images/s since the
    last line, the loss of the last step, and the ETA of the epoch and of the run."""

    def __init__(self, every_s: float, steps_per_epoch: int, epochs: int, first_epoch: int):
        self.every_s, self.steps_per_epoch, self.epochs = every_s, steps_per_epoch, epochs
        self.left_at_start = (epochs - first_epoch) * steps_per_epoch
        self.done = 0  # steps run by this process (a resumed run starts at its epoch)
        self.t_start = self.t_last = time.monotonic()
        self.images_since = 0

    def step(self, epoch: int, step_in_epoch: int, images: int, loss: torch.Tensor,
             end_of_epoch: bool = False) -> str | None:  # fmt: skip
        """Count a step; returns the line when one is due (and logs it)."""
        self.done += 1
        self.images_since += images
        now = time.monotonic()
        if now - self.t_last < self.every_s and not end_of_epoch:
            return None
        rate = self.images_since / max(now - self.t_last, 1e-9)
        per_step = (now - self.t_start) / self.done
        epoch_left = (self.steps_per_epoch - step_in_epoch) * per_step
        run_left = (self.left_at_start - self.done) * per_step
        line = (
            f"epoch {epoch + 1}/{self.epochs} step {step_in_epoch}/{self.steps_per_epoch}: "
            f"{rate:.1f} img/s, loss {float(loss):.4f}, epoch ETA {duration(epoch_left)}, "
            f"run ETA {duration(run_left)}"
        )  # float(loss): one host sync per line, not per step
        log.info("%s", line)
        self.t_last, self.images_since = now, 0
        return line


def _brief(e: Exception) -> str:
    """``Type: first line of the message`` (at most 200 characters) for a log line."""
    text = str(e)
    return f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"


class EpochLogger:
    """Rank 0's per-epoch MLflow record (metrics by step, the confusion matrix, overlays),
    sent by a background thread so that the tracking server's state never fails or stalls
    training: a call that fails is retried with backoff until it goes through, in order, and
    what waits meanwhile is kept in memory (a few pictures and numbers an epoch). ``close``
    waits for the backlog, up to ``flush_s``, and reports what could not be sent."""

    def __init__(self, tracking_uri: str, run_id: str, flush_s: float = 600.0) -> None:
        from mlflow import MlflowClient

        # One short try per call here; this thread's own backoff does the waiting (MLflow's
        # default retries would hold each call for minutes).
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.run_id = run_id
        self.flush_s = flush_s
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._send_all, name="mlflow-logger", daemon=True)
        self._thread.start()

    def log_epoch(self, epoch: int, metrics: dict, pictures: dict[str, bytes]) -> None:
        """The epoch's metrics and pictures (by image key), both at step ``epoch``."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        values = [Metric(k, float(v), now, epoch) for k, v in metrics.items() if k != "epoch"]
        self._put(f"epoch {epoch} metrics", self.client.log_batch, self.run_id, metrics=values)
        for key, data in pictures.items():
            self._put(f"epoch {epoch} {key} image", self._log_image, key, epoch, data)

    def catch_up(self, epoch: int, metrics: dict, pictures: dict[str, bytes]) -> None:
        """Send what of an epoch's record the run lacks (a resumed run's last checkpoint:
        the worker sending it may have died before it was through). What is there already
        is left alone: nothing is recorded twice."""

        def send_missing() -> None:
            from mlflow.entities import Metric

            history = self.client.get_metric_history(self.run_id, "val_miou")
            if metrics and epoch not in {m.step for m in history}:
                now = int(time.time() * 1000)
                values = [Metric(k, float(v), now, epoch) for k, v in metrics.items()]
                self.client.log_batch(self.run_id, metrics=values)
                log.info("MLflow: epoch %d metrics re-sent from its checkpoint", epoch)
            for key, data in pictures.items():
                if self._log_image(key, epoch, data):
                    log.info("MLflow: epoch %d %s image re-sent from its checkpoint", epoch, key)

        self._put(f"epoch {epoch} record (catching up)", send_missing)

    def _log_image(self, key: str, step: int, data: bytes) -> bool:
        """Log a PNG as MLflow image ``key`` at ``step`` (the run page's image slider), unless
        the run has it already: a retry after a call that failed halfway, or a resumed run's
        catch-up, never logs it twice. True when it was sent."""
        import io

        from PIL import Image

        if step in tracking.image_steps(self.client, self.run_id, key):
            return False
        try:
            for path in tracking.remove_partial_images(self.client, self.run_id, key, step):
                log.info("MLflow: removed %s, the half of an image a cut-short send left", path)
        except Exception as e:  # noqa: BLE001 - a store that refuses deletes must not stop the image
            log.warning("MLflow: could not remove the half of image %s step %d a cut-short send "
                        "left (%s); sending the image anyway", key, step, _brief(e))  # fmt: skip
        self.client.log_image(
            self.run_id, Image.open(io.BytesIO(data)), key=key, step=step, synchronous=True
        )
        return True

    def _put(self, what: str, call, *args, **kwargs) -> None:
        self._queue.put((what, call, args, kwargs))

    def _send_all(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            what, call, args, kwargs = item
            delay = 1.0
            while True:
                try:
                    call(*args, **kwargs)
                    break
                except Exception as e:  # noqa: BLE001 - the server's state must not end training
                    log.warning("MLflow: %s not recorded yet (%s); retrying in %.0f s",
                                what, _brief(e), delay)  # fmt: skip
                    time.sleep(delay)
                    delay = min(delay * 2, 10.0)  # a server back is used within 10 s
            self._queue.task_done()

    def pending(self) -> int:
        return self._queue.unfinished_tasks

    def close(self) -> None:
        """Wait for the backlog (up to ``flush_s``); what is still unsent is named in the log
        (the epoch's metrics are in its checkpoint's metrics.json too)."""
        deadline = time.monotonic() + self.flush_s
        while self.pending() and time.monotonic() < deadline:
            time.sleep(0.2)
        if self.pending():
            log.error("MLflow: %d records of this run could not be sent in %.0f s; they are "
                      "lost from the run (each epoch's metrics stay in its checkpoint)",
                      self.pending(), self.flush_s)  # fmt: skip
        self._queue.put(None)
