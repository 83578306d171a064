"""The training engine, in plain PyTorch: build a model and its training state from the typed
recipe, take a step, train an epoch over any iterable of batches, evaluate into a confusion
matrix, save and resume. No Ray: the Ray Train worker (:mod:`pipelines.training.loop`) is an
adapter that feeds it a Ray Data shard's batches and reports what it returns, and the
benchmarks and unit tests call it in-process, the same way. The shape is torchvision's
segmentation reference (``references/segmentation/train.py``: ``train_one_epoch``,
``evaluate``).

A batch is a dict with ``image`` (N, 3, H, W) float, normalized, and ``label`` (N, H, W) int64
training ids, on the training device; ``train_one_epoch(..., augment=f)`` takes raw batches
(uint8 (N, H, W, 3) images) and makes them so with ``f`` on the device, inside the step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import fcn_models
from pipelines.inference.evaluate import evaluate
from pipelines.inference.model_dir import ModelSpec, load_model_dir, save_model_dir
from pipelines.training.checkpoint import (
    load_train_state,
    restore_train_state,
    save_train_state,
)
from pipelines.training.recipe import Recipe, make_loss, make_optimizer, set_trainable

__all__ = [
    "EpochStats",
    "TrainState",
    "build_model",
    "build_train_state",
    "epoch_seed",
    "evaluate",
    "load_checkpoint",
    "resume",
    "save_checkpoint",
    "train_one_epoch",
    "train_step",
]

Batch = dict[str, torch.Tensor]


@dataclass
class TrainState:
    """What one process trains with: the model (wrapped for DDP or not), its optimizer and
    schedule (stepped once per optimizer step), the loss, bf16 autocast (off on CPU) and the
    optimizer steps taken in the run."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    autocast: torch.autocast
    channels_last: bool = False
    global_step: int = 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]


@dataclass(frozen=True)
class EpochStats:
    """One epoch of :func:`train_one_epoch`: the summed loss and images (tensors on the device,
    so that DDP ranks can sum them without a sync per step), the steps, and where the epoch's
    time went on this process's clock: until the first batch (the data source starting),
    waiting for later batches, and the steps."""

    loss_sum: torch.Tensor
    images: torch.Tensor
    steps: int
    seconds: float
    setup_s: float
    wait_s: float

    @property
    def compute_s(self) -> float:
        return self.seconds - self.setup_s - self.wait_s


def build_model(
    name: str, n_class: int, *, seed: int, backbone_weights: dict | None = None
) -> nn.Module:
    """A fresh model from :func:`fcn_models.build_model`, its random initialisation drawn from
    ``seed`` (every DDP rank builds the same weights), the backbone from ``backbone_weights``
    (a checked state_dict) when given."""
    torch.manual_seed(seed)
    opts = {} if backbone_weights is None else {"backbone_weights": backbone_weights}
    return fcn_models.build_model(name, n_class, **opts)


def build_train_state(
    model: nn.Module,
    recipe: Recipe,
    *,
    total_steps: int,
    device: torch.device | str = "cpu",
    amp: bool = False,
    wrap: Callable[[nn.Module], nn.Module] | None = None,
) -> TrainState:
    """``model`` on ``device`` ready to train with ``recipe``: the upsamplers fixed or not,
    channels_last with bf16 autocast on a GPU, ``wrap`` applied (DDP: after the parameters that
    train are known, before the optimizer takes them), the optimizer's parameter groups and the
    schedule over ``total_steps``."""
    device = torch.device(device)
    set_trainable(model, learn_upsampling=recipe.learn_upsampling)
    channels_last = amp and device.type == "cuda"
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if wrap is not None:
        model = wrap(model)
    optimizer, scheduler = make_optimizer(model, recipe, total_steps)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)
    return TrainState(model, optimizer, scheduler, make_loss(recipe), autocast, channels_last)


def train_step(state: TrainState, batch: Batch) -> torch.Tensor:
    """One optimizer step on a normalized batch, the schedule stepped after it; returns the
    (detached) loss, on the device."""
    x, y = batch["image"], batch["label"]
    if state.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with state.autocast:
        loss = state.criterion(state.model(x).float(), y)
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    state.optimizer.step()
    state.scheduler.step()
    state.global_step += 1
    return loss.detach()


def train_one_epoch(
    state: TrainState,
    batches: Iterable[Batch],
    *,
    augment: Callable[[Batch], Batch] | None = None,
    on_step: Callable[[int, int, torch.Tensor], None] | None = None,
) -> EpochStats:
    """One pass over ``batches`` in training mode, a step per batch (``augment`` first, when
    given, on the raw batch). ``on_step(step_in_epoch, images, loss)`` after each step: progress
    lines, heartbeats. No device sync per step: the loss stays a tensor."""
    state.model.train()
    loss_sum = torch.zeros((), device=state.device)
    images = torch.zeros((), device=state.device)
    t0 = time.perf_counter()
    setup_s = wait_s = 0.0
    stream, steps = iter(batches), 0
    while True:
        t_wait = time.perf_counter()
        batch = next(stream, None)
        if steps == 0:
            setup_s = time.perf_counter() - t_wait
        else:
            wait_s += time.perf_counter() - t_wait
        if batch is None:
            break
        if augment is not None:
            batch = augment(batch)
        loss = train_step(state, batch)
        n = len(batch["image"])
        loss_sum += loss * n
        images += n
        steps += 1
        if on_step is not None:
            on_step(steps, n, loss)
    return EpochStats(loss_sum, images, steps, time.perf_counter() - t0, setup_s, wait_s)


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """An independent 32-bit seed per (run seed, epoch, rank): a resumed run draws what the
    uninterrupted one would have drawn in that epoch, not epoch 0's numbers again."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def save_checkpoint(directory: str | Path, state: TrainState, spec: ModelSpec, epoch: int) -> Path:
    """The model directory (weights and spec, as registered) plus the optimizer and schedule
    state after ``epoch``: what :func:`load_checkpoint` and :func:`resume` continue from."""
    path = save_model_dir(directory, state.model, spec)
    save_train_state(path, state.optimizer, state.scheduler, epoch, state.global_step)
    return path


def load_checkpoint(directory: str | Path) -> tuple[nn.Module, dict]:
    """(model, train state) of a checkpoint, both loaded as data (``weights_only``): the model
    to build a :class:`TrainState` around, the state for :func:`resume`."""
    model, _ = load_model_dir(directory)
    return model, load_train_state(Path(directory))


def resume(state: TrainState, train_state: dict, *, new_hyperparameters: bool = False) -> int:
    """Continue ``state`` from a checkpoint's train state: momentum buffers, the schedule's
    position and the step count; returns the next epoch. ``new_hyperparameters``: keep the
    learning rate, momentum and weight decay ``state`` was built with."""
    epoch, state.global_step = restore_train_state(
        train_state, state.optimizer, state.scheduler, new_hyperparameters=new_hyperparameters
    )
    return epoch
