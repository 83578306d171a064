"""The one evaluation: a model's argmax predictions over batches, summed into a confusion matrix
(:func:`pipelines.core.metrics.confusion_matrix`; scores come from it with
:func:`~pipelines.core.metrics.scores`). Plain PyTorch: the training loop validates with it on
each DDP rank's part of a split, promotion's model actors score their batches with it
(:class:`pipelines.inference.actors.Scorer`), the benchmarks and tests call it in-process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import nullcontext

import torch
from torch import nn

from pipelines.core.metrics import confusion_matrix


def evaluate(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    n_class: int,
    *,
    autocast=None,
    on_batch: Callable[[dict[str, torch.Tensor], torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """``conf[t, p]``: pixels of true class t predicted as p (int64, on the model's device)
    over ``batches`` of normalized ``image`` (N, 3, H, W) and ``label`` (N, H, W), the model in
    eval mode; ignore-index pixels are left out. ``on_batch(batch, prediction)`` after each
    batch (pictures, frame counts, progress)."""
    model.eval()
    device = next(model.parameters()).device
    conf = torch.zeros(n_class, n_class, dtype=torch.int64, device=device)
    with torch.no_grad(), autocast or nullcontext():
        for batch in batches:
            pred = model(batch["image"]).argmax(1)
            conf += confusion_matrix(pred, batch["label"].to(device), n_class)
            if on_batch is not None:
                on_batch(batch, pred)
    return conf
