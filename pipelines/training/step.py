"""One optimization step and the per-epoch seeds: plain PyTorch and NumPy, no Ray, so the
benchmarks run them on machines without Ray (the lent GPU machines) exactly as the training
loop (:mod:`pipelines.training.loop`) does."""

from __future__ import annotations

import numpy as np
import torch


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
