"""Decoding of ingested frames: plain NumPy and PIL, no Ray or torch, so the same function runs
in Ray Data tasks (:mod:`pipelines.data.shards`) and anywhere else. Augmentation runs on the
training device (:mod:`pipelines.training.augment`): on the data path's CPUs it cost more than
the decode itself."""

from __future__ import annotations

import numpy as np

from pipelines.core.codecs import decode_png_mask, decode_rgb


def decode_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data stage: JPEG/PNG bytes -> ``image`` (N, H, W, 3) uint8, ``label`` (N, H, W) uint8."""
    out = {
        "image": np.stack([decode_rgb(b) for b in batch["image"]]),
        "label": np.stack([decode_png_mask(b) for b in batch["label"]]),
    }
    if "image_id" in batch:  # kept for tracing a batch back to its frames
        out["image_id"] = np.asarray(batch["image_id"])
    return out
