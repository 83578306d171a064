"""Pictures for people: prediction overlays and confusion matrices (MLflow, demo preview)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from pipelines.core.labels import CLASS_NAMES, colourize


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.6) -> np.ndarray:
    """(H, W, 3) uint8 frame with the lane classes of ``mask`` (H, W) painted over it;
    background pixels are left as they are."""
    if image.shape[:2] != mask.shape:
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape} differ in size")
    colour = colourize(mask).astype(np.float32)
    out = image.astype(np.float32)
    lanes = (mask != 0)[..., None]
    out = np.where(lanes, (1 - alpha) * out + alpha * colour, out)
    return out.astype(np.uint8)


def grid(pictures: list[np.ndarray], columns: int = 2, width: int = 640) -> np.ndarray:
    """Pictures resized to ``width`` and tiled into one RGB image."""
    if not pictures:
        raise ValueError("no pictures to tile")
    tiles = []
    for p in pictures:
        h = max(1, round(p.shape[0] * width / p.shape[1]))
        tiles.append(np.asarray(Image.fromarray(p).resize((width, h), Image.Resampling.BILINEAR)))
    tile_h = max(t.shape[0] for t in tiles)
    rows = (len(tiles) + columns - 1) // columns
    out = np.zeros((rows * tile_h, columns * width, 3), dtype=np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, columns)
        out[r * tile_h : r * tile_h + t.shape[0], c * width : (c + 1) * width] = t
    return out


def png(picture: np.ndarray) -> bytes:
    """An (H, W, 3) uint8 picture as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(picture).save(buf, format="PNG")
    return buf.getvalue()


def confusion_png(conf: np.ndarray, class_names: tuple[str, ...] = CLASS_NAMES) -> bytes:
    """A row-normalized confusion matrix (true class per row) as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conf = np.asarray(conf, dtype=np.float64)
    rows = conf.sum(axis=1, keepdims=True)
    norm = np.divide(conf, rows, out=np.zeros_like(conf), where=rows > 0)
    fig, ax = plt.subplots(figsize=(6.5, 5.5), dpi=100)
    im = ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), v in np.ndenumerate(norm):
        if conf[i].sum() > 0:
            ax.text(
                j,
                i,
                f"{v:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if v > 0.5 else "black",
            )
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
