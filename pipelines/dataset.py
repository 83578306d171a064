"""Ray Data datasets over the ingested shards, for training, evaluation and promotion.

Decoding (JPEG/PNG) and augmentation run in Ray Data tasks, spread over the cluster's CPUs, never
in the training loop. Batches cross the object store as uint8; normalization to float happens on
the training device in :func:`torch_batches` (4x less data to move than float32).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from ray.data.collate_fn import NumpyBatchCollateFn

from pipelines.errors import UserError
from pipelines.frames import FrameTransform, decode_png_mask, decode_rgb
from pipelines.labels import IGNORE_INDEX
from pipelines.storage import resolve


class DataError(UserError):
    """A dataset location that holds no usable shards."""


def shard_files(data_uri: str, split: str) -> list[str]:
    loc = resolve(data_uri).join(split)
    return [i.path for i in loc.list_files((".parquet",))]


def read_shards(data_uri: str, split: str, columns: list[str] | None = None):
    """The raw rows of one split (``train``/``val``) as a Ray dataset, or a clear error."""
    import ray

    loc = resolve(data_uri).join(split)
    files = shard_files(data_uri, split)
    if not files:
        raise DataError(
            f"{loc.uri}: no Parquet shards (expected *.parquet written by `python -m jobs.ingest`)"
        )
    return ray.data.read_parquet(files, filesystem=loc.fs, columns=columns)


@dataclass(frozen=True)
class Augment:
    """Training augmentation. Horizontal flips keep lane semantics: a flipped dividing line is
    still a dividing line, and left/right turn arrows share the thru/turn class."""

    hflip: float = 0.5
    scale: tuple[float, float] = (0.75, 1.25)
    colour: float = 0.2  # brightness/contrast/saturation jitter amplitude

    def __call__(
        self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        h, w = label.shape
        if rng.random() < self.hflip:
            image, label = image[:, ::-1], label[:, ::-1]
        lo, hi = self.scale
        if hi > lo or lo != 1.0:
            s = rng.uniform(lo, hi)
            sw, sh = max(1, round(w * s)), max(1, round(h * s))
            image = np.asarray(
                Image.fromarray(np.ascontiguousarray(image)).resize(
                    (sw, sh), Image.Resampling.BILINEAR
                )
            )
            label = np.asarray(
                Image.fromarray(np.ascontiguousarray(label)).resize(
                    (sw, sh), Image.Resampling.NEAREST
                )
            )
            image, label = _crop_or_pad(image, label, h, w, rng)
        if self.colour > 0:
            image = _colour_jitter(image, self.colour, rng)
        return np.ascontiguousarray(image), np.ascontiguousarray(label)


def _crop_or_pad(
    image: np.ndarray, label: np.ndarray, h: int, w: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Back to (h, w): a random window when larger; padding (image 0, label ignore) when
    smaller, so padded pixels never count as background."""
    ih, iw = label.shape
    out_img = np.zeros((max(h, ih), max(w, iw), 3), dtype=np.uint8)
    out_lbl = np.full((max(h, ih), max(w, iw)), IGNORE_INDEX, dtype=np.uint8)
    oy, ox = rng.integers(0, max(h, ih) - ih + 1), rng.integers(0, max(w, iw) - iw + 1)
    out_img[oy : oy + ih, ox : ox + iw] = image
    out_lbl[oy : oy + ih, ox : ox + iw] = label
    cy, cx = rng.integers(0, out_lbl.shape[0] - h + 1), rng.integers(0, out_lbl.shape[1] - w + 1)
    return out_img[cy : cy + h, cx : cx + w], out_lbl[cy : cy + h, cx : cx + w]


def _colour_jitter(image: np.ndarray, amp: float, rng: np.random.Generator) -> np.ndarray:
    x = image.astype(np.float32)
    x *= rng.uniform(1 - amp, 1 + amp)  # brightness
    mean = x.mean()
    x = (x - mean) * rng.uniform(1 - amp, 1 + amp) + mean  # contrast
    grey = x.mean(axis=2, keepdims=True)
    x = (x - grey) * rng.uniform(1 - amp, 1 + amp) + grey  # saturation
    return np.clip(x, 0, 255).astype(np.uint8)


def decode_batch(
    batch: dict[str, np.ndarray], augment: Augment | None = None
) -> dict[str, np.ndarray]:
    """Ray Data stage: JPEG/PNG bytes -> ``image`` (N, H, W, 3) uint8, ``label`` (N, H, W) uint8."""
    rng = np.random.default_rng()
    images, label_masks = [], []
    for img_bytes, lbl_bytes in zip(batch["image"], batch["label"], strict=True):
        image = decode_rgb(img_bytes)
        label = decode_png_mask(lbl_bytes)
        if augment is not None:
            image, label = augment(image, label, rng)
        images.append(image)
        label_masks.append(label)
    return {"image": np.stack(images), "label": np.stack(label_masks)}


def build_dataset(data_uri: str, split: str, augment: Augment | None = None):
    """Decoded (and, for training, augmented) frames of one split, streamed by Ray Data."""
    return read_shards(data_uri, split, columns=["image", "label"]).map_batches(
        decode_batch, batch_size=16, batch_format="numpy", fn_kwargs={"augment": augment}
    )


class NormalizeCollate(NumpyBatchCollateFn):
    """``iter_torch_batches`` collate: uint8 numpy batch -> normalized float NCHW image and
    int64 NHW label on ``device``."""

    def __init__(self, transform: FrameTransform, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.transform = transform
        self.device = torch.device(device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        non_blocking = self.device.type == "cuda"
        # Ray hands out read-only arrays; np.require copies only those (torch warns on them).
        image = torch.from_numpy(np.require(batch["image"], requirements="CW"))
        label = torch.from_numpy(np.require(batch["label"], requirements="CW"))
        image = image.to(self.device, non_blocking=non_blocking)
        label = label.to(self.device, non_blocking=non_blocking)
        return {"image": self.transform.normalize(image), "label": label.long()}


def torch_batches(
    ds,
    batch_size: int,
    transform: FrameTransform,
    device: torch.device | str = "cpu",
    *,
    drop_last: bool = False,
    prefetch_batches: int = 2,
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of a Ray dataset or a Ray Train dataset shard as torch tensors."""
    return ds.iter_torch_batches(
        batch_size=batch_size,
        collate_fn=NormalizeCollate(transform, device),
        drop_last=drop_last,
        prefetch_batches=prefetch_batches,
    )


def split_config(train: str = "train", evaluate: tuple[str, ...] = ("val",)):
    """A Ray Train ``DataConfig``: the training set is split *equally* (every rank must take the
    same number of DDP steps, or the all-reduce hangs), evaluation sets are split *exactly*
    (``equal=False``) so every validation row is scored once, none dropped, none twice."""
    from ray.train import DataConfig

    class _Config(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            rest = {k: v for k, v in datasets.items() if k not in evaluate}
            out = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
            for name in evaluate:
                if name not in datasets:
                    continue
                ds = datasets[name]
                if ds.name is None:
                    ds.set_name(name)
                for i, it in enumerate(ds.streaming_split(world_size, equal=False)):
                    out[i][name] = it
            return out

    return _Config(datasets_to_split=[train])
