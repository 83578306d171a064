"""The one way frames and masks are decoded and encoded (PIL and numpy only).

Every decoder checks what it is given and raises :class:`FrameError` with the reason (empty,
not an image, truncated, wrong mode, over the pixel limit) instead of PIL's own exceptions, so
that a bad file becomes a reported record, never a crash.
"""

from __future__ import annotations

import io
import struct
import zlib
from functools import lru_cache

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


def encode_png_rows(rows: np.ndarray, repeats: np.ndarray) -> bytes:
    """A greyscale PNG of ``repeats.sum()`` rows in which row ``i`` of ``rows`` ((n, W) uint8)
    appears ``repeats[i]`` times in a row (0: not at all): a nearest-upsampled mask without
    building it. Any PNG reader gets the full mask.

    Why by hand: Pillow exposes no PNG row filter, and zlib spends ~10-17 ms a 3384x1710
    mask scanning the millions of bytes of rows that only repeat the one above
    (benchmarks/RESULTS.md). Here each distinct row is compressed once (PNG filter "Sub":
    runs of one id become zeros), and each run of repeats (filter "Up": all zeros) is a
    deflate segment compressed once per (width, count) and reused. Segments end on a zlib
    full flush, so none refers back into another and they concatenate into one valid
    stream; the zlib checksum is combined from the segments' (``_adler_combine``).
    """
    rows = np.ascontiguousarray(rows, dtype=np.uint8)
    repeats = np.asarray(repeats, dtype=np.int64)
    if rows.ndim != 2 or len(rows) != len(repeats) or (repeats < 0).any():
        raise ValueError(
            f"rows (n, W) and n repeats >= 0 expected, got {rows.shape}, {repeats.shape}"
        )
    keep = repeats > 0
    rows, repeats = rows[keep], repeats[keep]
    height, width = int(repeats.sum()), rows.shape[1]
    filtered = np.empty((len(rows), width + 1), np.uint8)  # Sub filter: a pixel minus its left
    filtered[:, 0] = 1
    filtered[:, 1] = rows[:, 0]
    np.subtract(rows[:, 1:], rows[:, :-1], out=filtered[:, 2:])
    z = zlib.compressobj(1, zlib.DEFLATED, -15, 1, zlib.Z_RLE)  # raw deflate, small hash
    parts, adler = [], 1
    for row, k in zip(filtered, repeats.tolist(), strict=True):
        data = row.tobytes()
        parts.append(z.compress(data) + z.flush(zlib.Z_FULL_FLUSH))
        adler = _adler_combine(adler, zlib.adler32(data), len(data))
        if k > 1:
            seg, seg_adler = _repeat_segment(width, k - 1)
            parts.append(seg)
            adler = _adler_combine(adler, seg_adler, (k - 1) * (width + 1))
    parts.append(z.flush(zlib.Z_FINISH))
    idat = b"\x78\x01" + b"".join(parts) + struct.pack(">I", adler)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


@lru_cache(maxsize=256)
def _repeat_segment(width: int, count: int) -> tuple[bytes, int]:
    """``count`` rows of ``width`` pixels, each the same as the row above (filter "Up", all
    zeros), as a self-contained deflate segment, and the zlib checksum of its bytes."""
    data = (b"\x02" + bytes(width)) * count
    z = zlib.compressobj(1, zlib.DEFLATED, -15, 1, zlib.Z_RLE)
    return z.compress(data) + z.flush(zlib.Z_FULL_FLUSH), zlib.adler32(data)


def _adler_combine(a1: int, a2: int, len2: int) -> int:
    """adler32(A + B) from adler32(A), adler32(B) and len(B) (zlib's adler32_combine, which
    Python does not expose)."""
    base = 65521
    rem = len2 % base
    s1 = a1 & 0xFFFF
    s2 = rem * s1 % base
    s1 = (s1 + (a2 & 0xFFFF) + base - 1) % base
    s2 = (s2 + (a1 >> 16) + (a2 >> 16) + base - rem) % base
    return s1 | (s2 << 16)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


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
