"""Frames the labeling tests share: good ones and one file of every bad kind."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image

from pipelines.core.codecs import encode_jpeg
from pipelines.data.synthetic import render_frame
from tests.support.helpers import FRAME_H, FRAME_W

MAX_PIXELS = 500_000  # above the 846x428 test frames, below the "oversized" one


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def mixed_frames() -> dict[str, tuple[bytes, str]]:
    """Good frames (two sizes, JPEG and PNG) and one file of every bad kind: {relative path:
    (bytes, expected error fragment or "" for a good frame)}: labeled in-process by
    tests/unit/test_labeling_stages.py, on S3 by the job in tests/integration/test_label.py."""
    rng = np.random.default_rng(7)
    good = [render_frame(rng, FRAME_W, FRAME_H)[0] for _ in range(4)]
    other_size = render_frame(rng, 640, 360)[0]
    valid_jpeg = encode_jpeg(good[0])
    return {
        **{f"drive1/frame_{i}.jpg": (encode_jpeg(f), "") for i, f in enumerate(good)},
        "drive1/frame_png.png": (png(good[1]), ""),
        "drive2/small.jpeg": (encode_jpeg(other_size), ""),
        "bad/zero.jpg": (b"", "zero-byte"),
        "bad/truncated.jpg": (valid_jpeg[: len(valid_jpeg) // 3], "truncated"),
        "bad/corrupt.jpg": (b"\xff\xd8\xff" + os.urandom(2000), "not a readable image"),
        "bad/text.png": (b"this is not a picture\n", "not a readable image"),
        "bad/grey.png": (png(good[0][..., 0]), "must be 8-bit RGB, got PIL mode 'L'"),
        "bad/rgba.png": (
            png(np.dstack([good[0], np.full(good[0].shape[:2], 255, np.uint8)])),
            "must be 8-bit RGB, got PIL mode 'RGBA'",
        ),
        "bad/sixteen.png": (  # uint16 arrays become 16-bit greyscale PNGs
            png(good[0][..., 0].astype(np.uint16) * 257),
            "must be 8-bit RGB",
        ),
        "bad/oversized.jpg": (
            encode_jpeg(np.zeros((600, 1000, 3), np.uint8)),
            "more than the limit",
        ),
    }
