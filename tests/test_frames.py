"""The one frame transform and the codecs: shapes, inverse, and every kind of bad frame."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.frames import (
    FrameError,
    FrameTransform,
    decode_label,
    decode_png_mask,
    decode_rgb,
    encode_jpeg,
    encode_png,
)


def png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def test_prepare_crops_then_resizes():
    t = FrameTransform(width=64, height=16, crop_top=40, crop_bottom=8)
    frame = np.zeros((120, 200, 3), dtype=np.uint8)
    frame[:40] = 255  # sky: must be cropped away entirely
    frame[-8:] = 255  # hood
    out = t.prepare_image(frame)
    assert out.shape == (16, 64, 3) and out.max() == 0
    label = np.zeros((120, 200), dtype=np.uint8)
    label[40:, 100:] = 7
    small = t.prepare_label(label)
    assert small.shape == (16, 64)
    assert set(np.unique(small)) == {0, 7}  # nearest: no blended ids


def test_restore_mask_is_inverse_geometry():
    t = FrameTransform(width=50, height=20, crop_top=30)
    mask = np.zeros((20, 50), dtype=np.uint8)
    mask[:, 25:] = 3
    full = t.restore_mask(mask, (130, 200))
    assert full.shape == (130, 200)
    assert (full[:30] == 0).all()  # cropped rows are background
    assert (full[30:, :100] == 0).all() and (full[30:, 100:] == 3).all()
    # Round trip through prepare_label gives the same small mask back.
    assert np.array_equal(t.prepare_label(full), mask)


def test_normalize_matches_formula():
    t = FrameTransform(width=4, height=2)
    images = torch.randint(0, 256, (3, 2, 4, 3), dtype=torch.uint8)
    x = t.normalize(images)
    assert x.shape == (3, 3, 2, 4) and x.dtype == torch.float32
    c = 1
    expected = (images[..., c].float() / 255 - t.mean[c]) / t.std[c]
    assert torch.allclose(x[:, c], expected, atol=1e-5)


def test_transform_round_trips_through_dict():
    t = FrameTransform(width=320, height=96, crop_top=10, crop_bottom=3)
    assert FrameTransform.from_dict(t.to_dict()) == t


@pytest.mark.parametrize("height", [10, 40])
def test_too_few_rows_is_a_frame_error(height):
    t = FrameTransform(width=8, height=8, crop_top=30, crop_bottom=10)
    with pytest.raises(FrameError, match=f"frame height {height} leaves no rows"):
        t.prepare_image(np.zeros((height, 20, 3), dtype=np.uint8))


def test_codecs_round_trip():
    mask = np.random.default_rng(0).integers(0, 8, (30, 40), dtype=np.uint8)
    assert np.array_equal(decode_png_mask(encode_png(mask)), mask)
    image = np.full((30, 40, 3), 128, dtype=np.uint8)
    assert np.abs(decode_rgb(encode_jpeg(image)).astype(int) - 128).max() <= 2


def rgb16_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), dtype=np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


GOOD_JPEG = encode_jpeg(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty \\(zero-byte\\)"),
        (b"this is not an image at all", "not a readable image"),
        (GOOD_JPEG[: len(GOOD_JPEG) // 2], "truncated or corrupt"),
        (png(np.zeros((8, 8), dtype=np.uint8)), "must be 8-bit RGB, got PIL mode 'L'"),
        (png(np.zeros((8, 8, 4), dtype=np.uint8)), "mode 'RGBA'"),
        (rgb16_png(), "mode 'I;16'"),
    ],
    ids=["zero-byte", "not-image", "truncated", "grayscale", "rgba", "16-bit"],
)
def test_decode_rgb_rejects(data, reason):
    with pytest.raises(FrameError, match=reason):
        decode_rgb(data, what="image")


def test_decode_rgb_rejects_oversized_before_decoding():
    with pytest.raises(FrameError, match="64x64 = 4096 pixels, more than the limit 1000"):
        decode_rgb(GOOD_JPEG, max_pixels=1000)


def test_decode_label_keeps_palette_indices():
    ids = np.array([[0, 200], [214, 255]], dtype=np.uint8)
    img = Image.fromarray(ids, mode="P")
    img.putpalette([v for i in range(256) for v in (i // 2, 255 - i, i)])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    assert decode_label(buf.getvalue()).tolist() == ids.tolist()
    with pytest.raises(FrameError, match="single-channel 8-bit"):
        decode_label(png(np.zeros((4, 4, 3), dtype=np.uint8)))
