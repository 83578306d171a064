"""Training and validation batches as torch tensors on the training device: Ray Data hands
over uint8 frames (4x less than float32 to move through the object store), normalized (and for
training augmented) on the device (:meth:`~pipelines.core.frames.FrameTransform.normalize`);
and how Ray Train splits the datasets over the workers.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from pipelines import compat
from pipelines.core.frames import FrameTransform


class NormalizeCollate(NumpyBatchCollateFn):
    """``iter_torch_batches`` collate: uint8 numpy batch -> normalized float NCHW image and
    int64 NHW label on ``device``; with ``normalize=False`` the uint8 NHWC image and label,
    moved only (training augments them first: :func:`~pipelines.training.augment.augment_batch`,
    in the loop's thread, since Ray calls this in a pool of threads)."""

    def __init__(
        self, transform: FrameTransform, device: torch.device | str = "cpu", normalize: bool = True
    ) -> None:
        super().__init__()
        self.transform = transform
        self.device = torch.device(device)
        self.normalize = normalize

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        cuda = self.device.type == "cuda"
        # Ray hands out read-only arrays; np.require copies only those (torch warns on them).
        image = torch.from_numpy(np.require(batch["image"], requirements="CW"))
        label = torch.from_numpy(np.require(batch["label"], requirements="CW"))
        if cuda:
            # Ray calls this in its prefetch threads: pinning here, then an asynchronous copy,
            # keeps the host-to-device transfer off the training step (a copy from pageable
            # memory would block the step that waits for it).
            image, label = image.pin_memory(), label.pin_memory()
        image = image.to(self.device, non_blocking=cuda)
        label = label.to(self.device, non_blocking=cuda)
        if self.normalize:
            out = {"image": self.transform.normalize(image), "label": label.long()}
        else:
            out = {"image": image, "label": label}
        if "image_id" in batch:
            out["image_id"] = [str(i) for i in batch["image_id"]]
        return out


def torch_batches(
    ds,
    batch_size: int,
    transform: FrameTransform,
    device: torch.device | str = "cpu",
    *,
    drop_last: bool = False,
    prefetch_batches: int = 2,
    shuffle_buffer: int = 0,
    shuffle_seed: int | None = None,
    normalize: bool = True,
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of a Ray dataset or a Ray Train dataset shard as torch tensors.

    ``shuffle_buffer`` > 0: each batch is drawn at random from a buffer of that many frames
    (Ray Data's local shuffle, seeded by ``shuffle_seed``), so a batch mixes the blocks that
    stream in instead of taking consecutive frames of one drive."""
    return ds.iter_torch_batches(
        batch_size=batch_size,
        collate_fn=NormalizeCollate(transform, device, normalize),
        drop_last=drop_last,
        prefetch_batches=prefetch_batches,
        local_shuffle_buffer_size=shuffle_buffer or None,
        local_shuffle_seed=shuffle_seed if shuffle_buffer else None,
    )


def split_config(train: str = "train", evaluate: tuple[str, ...] = ("val",)):
    """A Ray Train ``DataConfig``: the training set is split *equally* (every rank must take the
    same number of DDP steps, or the all-reduce hangs), evaluation sets are split *exactly*
    (``equal=False``) so every validation row is scored once, none dropped, none twice."""
    return compat.exact_eval_split_config(train, evaluate)
