"""A training checkpoint: a model directory (:mod:`pipelines.inference.model_dir`) plus the
optimizer and schedule state, the epoch's metrics and the epoch's MLflow record (its pictures),
so that a resumed run continues the schedule and momentum, and re-sends whatever of its last
epoch's record never reached the tracking server.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipelines.inference.model_dir import load_tensors

TRAIN_STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.json"  # the epoch's metrics, validation confusion matrix, frames by rank
# The epoch's pictures as sent to MLflow, kept in its checkpoint too: a resumed run re-sends
# whatever of its last checkpoint's record never reached the run (the worker that was sending
# it died with its node, or with the whole job).
RECORD_DIR = "mlflow_record"


def checkpoint_due(epoch: int, epochs: int, every: int) -> bool:
    """Whether epoch ``epoch`` (0-based) of ``epochs`` is checkpointed: every ``every``-th
    epoch counted from the run's start (so a resumed run keeps the schedule), and always the
    last one, which the driver registers."""
    return (epoch + 1) % every == 0 or epoch == epochs - 1


def save_train_state(directory: Path, optimizer, scheduler, epoch: int, step: int) -> None:
    import torch

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


def restore_train_state(
    state: dict, optimizer, scheduler, *, new_hyperparameters: bool = False
) -> tuple[int, int]:
    """Optimizer (momentum buffers) and schedule position from :func:`load_train_state`;
    returns the (next epoch, global step). ``new_hyperparameters``: keep the learning rate,
    momentum and weight decay ``optimizer`` and ``scheduler`` were built with (a resume the
    user allowed to change them) and only continue the schedule's position; by default the
    checkpoint's values are restored as they were."""
    fresh = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if new_hyperparameters:
        for group, values in zip(optimizer.param_groups, fresh, strict=True):
            group.update(values)
        scheduler.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
        # The rate at the schedule's position, from the new base rates (LambdaLR's formula).
        for group, base, at in zip(optimizer.param_groups, scheduler.base_lrs,
                                   scheduler.lr_lambdas, strict=True):  # fmt: skip
            group["lr"] = base * at(scheduler.last_epoch)
    return state["epoch"] + 1, state["global_step"]


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
