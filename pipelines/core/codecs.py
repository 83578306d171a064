"""The one way frames and masks are decoded and encoded (PIL and numpy only).

Every decoder checks what it is given and raises :class:`FrameError` with the reason (empty,
not an image, truncated, wrong mode, over the pixel limit) instead of PIL's own exceptions, so
that a bad file becomes a reported record, never a crash.
"""

from __future__ import annotations

import io
import zlib

import numpy as np
from PIL import Image

from pipelines.core.errors import UserError


class FrameError(UserError):
    """A frame or label that cannot be used (the message says why, for reports)."""


# -- codecs: the one way frames and masks are decoded / encoded -------------------------------
def encode_jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def encode_png(mask: np.ndarray) -> bytes:
    # zlib's run-length strategy suits masks (long runs of one id): as fast as level 1's
    # default strategy, a quarter of the bytes at 3384x1710 (benchmarks/RESULTS.md).
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8), mode="L").save(
        buf, format="PNG", compress_level=1, compress_type=zlib.Z_RLE
    )
    return buf.getvalue()


def decode_png_mask(data: bytes) -> np.ndarray:
    """A single-channel mask PNG (as written by :func:`encode_png`) -> (H, W) uint8."""
    return np.asarray(Image.open(io.BytesIO(data)))


def open_rgb(data: bytes, *, max_pixels: int | None, what: str) -> Image.Image:
    """An 8-bit RGB image opened (header read, pixels not yet decoded), or :class:`FrameError`
    saying why not (empty, not an image, wrong mode, too large)."""
    if not data:
        raise FrameError(f"{what} is an empty (zero-byte) file")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise FrameError(f"{what} is too large to decode safely ({e})") from None
    except Exception as e:  # PIL raises several types for unrecognized data
        raise FrameError(f"{what} is not a readable image ({type(e).__name__})") from None
    w, h = img.size
    if max_pixels is not None and w * h > max_pixels:
        raise FrameError(f"{what} is {w}x{h} = {w * h} pixels, more than the limit {max_pixels}")
    if img.mode != "RGB":
        raise FrameError(f"{what} must be 8-bit RGB, got PIL mode {img.mode!r}")
    return img


def load_pixels(img: Image.Image, what: str) -> None:
    try:
        img.load()
    except Exception as e:
        raise FrameError(f"{what} is truncated or corrupt ({type(e).__name__}: {e})") from None


def decode_rgb(data: bytes, *, max_pixels: int | None = None, what: str = "image") -> np.ndarray:
    """JPEG/PNG bytes of an 8-bit RGB frame -> (H, W, 3) uint8, or :class:`FrameError` saying
    why not (empty, not an image, truncated, wrong mode, too large)."""
    img = open_rgb(data, max_pixels=max_pixels, what=what)
    load_pixels(img, what)
    return np.asarray(img)


def decode_label(data: bytes, *, max_pixels: int | None = None, what: str = "label") -> np.ndarray:
    """Apollo label PNG bytes -> (H, W) uint8 ids.

    The ids are the palette *indices* of a ``P`` image (or the values of an ``L`` image); they
    are read as they are, never converted (``convert('L')`` would replace id 200 by its
    palette luminance 160).
    """
    if not data:
        raise FrameError(f"{what} is an empty (zero-byte) file")
    try:
        img = Image.open(io.BytesIO(data))
    except Exception as e:
        raise FrameError(f"{what} is not a readable PNG ({type(e).__name__})") from None
    w, h = img.size  # from the header: checked before the pixels are decoded
    if max_pixels is not None and w * h > max_pixels:
        raise FrameError(f"{what} is {w}x{h} = {w * h} pixels, more than the limit {max_pixels}")
    try:
        img.load()
    except Exception as e:
        raise FrameError(f"{what} is not a readable PNG ({type(e).__name__})") from None
    if img.mode not in ("P", "L"):
        raise FrameError(
            f"{what} must be single-channel 8-bit (palette 'P' or 'L' ids), got PIL mode "
            f"{img.mode!r}"
        )
    return np.asarray(img)
