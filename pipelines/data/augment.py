"""Decoding and training augmentation of ingested frames: plain numpy and PIL, no Ray, so the
same functions run in Ray Data tasks (:mod:`pipelines.data.shards`) and anywhere else."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from pipelines.core.codecs import decode_png_mask, decode_rgb
from pipelines.core.labels import IGNORE_INDEX


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
    batch: dict[str, np.ndarray],
    augment: Augment | None = None,
    rng: np.random.Generator | None = None,
) -> dict[str, np.ndarray]:
    """Ray Data stage: JPEG/PNG bytes -> ``image`` (N, H, W, 3) uint8, ``label`` (N, H, W) uint8."""
    rng = rng or np.random.default_rng()
    images, label_masks = [], []
    for img_bytes, lbl_bytes in zip(batch["image"], batch["label"], strict=True):
        image = decode_rgb(img_bytes)
        label = decode_png_mask(lbl_bytes)
        if augment is not None:
            image, label = augment(image, label, rng)
        images.append(image)
        label_masks.append(label)
    out = {"image": np.stack(images), "label": np.stack(label_masks)}
    if "image_id" in batch:  # kept for tracing a batch back to its frames
        out["image_id"] = np.asarray(batch["image_id"])
    return out
