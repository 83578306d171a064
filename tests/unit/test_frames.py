"""The one frame transform and the codecs: shapes, inverse, and every kind of bad frame."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.core.codecs import (
    FrameError,
    decode_label,
    decode_png_mask,
    decode_rgb,
    encode_jpeg,
    encode_png,
)
from pipelines.core.frames import FrameTransform


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


@pytest.mark.parametrize("height", [64, 70])
def test_too_few_rows_is_a_frame_error(height):
    t = FrameTransform(width=8, height=8, crop_top=60, crop_bottom=10)  # absolute crops
    with pytest.raises(FrameError, match=f"frame height {height} leaves no rows"):
        t.prepare_image(np.zeros((height, 80, 3), dtype=np.uint8))


@pytest.mark.parametrize("shape", [(63, 100), (100, 63), (10, 10)])
def test_frames_under_64_pixels_a_side_are_refused(shape):
    t = FrameTransform(width=8, height=8, crop_top=4, source_height=100)
    with pytest.raises(FrameError, match=rf"frame {shape[1]}x{shape[0]} is smaller than 64x64"):
        t.prepare_image(np.zeros((*shape, 3), dtype=np.uint8))
    t.prepare_image(np.zeros((64, 64, 3), dtype=np.uint8))  # the smallest accepted


def test_crops_scale_with_the_frame_height_when_the_source_height_is_known():
    """The same camera at 1x, 0.5x and 0.25x: each loses the same fraction of its rows, and
    the model input is the same picture (within resampling); an old transform without a
    source height keeps its absolute rows."""
    from pipelines.data.synthetic import render_frame

    t = FrameTransform(width=128, height=48, crop_top=280, crop_bottom=40, source_height=768)
    full, _ = render_frame(np.random.default_rng(2), 1536, 768)
    assert t.crop_rows(768) == (280, 728)
    assert t.crop_rows(384) == (140, 364)
    assert t.crop_rows(192) == (70, 182)
    reference = t.prepare_image(full).astype(int)
    for f in (2, 4):
        small = np.asarray(Image.fromarray(full).resize((1536 // f, 768 // f), Image.BILINEAR))
        x = t.prepare_image(small).astype(int)
        assert x.shape == reference.shape and np.abs(x - reference).mean() < 3, f
        mask = t.restore_mask(np.ones((48, 128), np.uint8), (768 // f, 1536 // f))
        rows = np.flatnonzero(mask.any(axis=1))
        assert (rows[0], rows[-1] + 1) == (280 // f, 728 // f)
    legacy = FrameTransform(width=128, height=48, crop_top=280, crop_bottom=40)
    assert legacy.crop_rows(384) == (280, 344)


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
    # The reduced-size decode of labeling and ingest refuses the same files for the same
    # reasons (a 64x64 frame is not reduced; the half-size JPEG path is covered below).
    with pytest.raises(FrameError, match=reason):
        FrameTransform(width=8, height=8, crop_top=0).load_image(data, what="image")
    with pytest.raises(FrameError, match=reason):
        FrameTransform(width=16, height=16, crop_top=0).load_image(data, what="image")


def test_load_image_rejects_a_truncated_jpeg_at_half_size():
    t = FrameTransform(width=16, height=16, crop_top=0)
    assert t.draft_scale(64, 64) == 2
    with pytest.raises(FrameError, match="truncated or corrupt"):
        t.load_image(GOOD_JPEG[: len(GOOD_JPEG) // 2])


@pytest.fixture(scope="module")
def full_frame() -> np.ndarray:
    from pipelines.data.synthetic import render_frame

    return render_frame(np.random.default_rng(1), 3384, 1710)[0]


@pytest.mark.parametrize(
    "frame_size, crop_top, size",
    [
        ((3384, 1710), 690, (1024, 384)),  # production: the Apollo recipe
        ((3384, 1710), 690, (512, 192)),
        ((1692, 855), 345, (256, 96)),  # an odd height: the last half-size row is partial
    ],
)
def test_half_size_jpeg_decode_stays_within_jpeg_tolerance(full_frame, frame_size, crop_top, size):
    """Labeling and ingest decode a JPEG at 1/2 where that still covers the model input. The
    model input must differ from the full decode's only as much as JPEG coding itself moves
    it (measured against the frame before encoding)."""
    w, h = frame_size
    frame = (
        full_frame
        if frame_size == (3384, 1710)
        else np.asarray(Image.fromarray(full_frame).resize(frame_size, Image.Resampling.BILINEAR))
    )
    t = FrameTransform(width=size[0], height=size[1], crop_top=crop_top)
    assert t.draft_scale(w, h) == 2
    data = encode_jpeg(frame, quality=90)
    truth = t.prepare_image(frame).astype(int)
    full = t.prepare_image(decode_rgb(data)).astype(int)
    half, frame_hw = t.load_image(data)
    assert half.shape == (size[1], size[0], 3) and half.dtype == np.uint8
    assert frame_hw == (h, w)
    jpeg_err, half_err = np.abs(full - truth), np.abs(half.astype(int) - truth)
    assert half_err.mean() <= jpeg_err.mean() + 0.3
    assert np.percentile(half_err, 99) <= np.percentile(jpeg_err, 99) + 2
    assert np.abs(half.astype(int) - full).mean() < 1.0


def test_load_image_without_reduction_matches_prepare_image():
    rng = np.random.default_rng(4)
    frame = rng.integers(0, 256, (130, 200, 3), dtype=np.uint8)
    t = FrameTransform(width=120, height=60, crop_top=30, crop_bottom=4)
    assert t.draft_scale(200, 130) == 1
    for data in (png(frame), encode_jpeg(frame)):
        got, frame_hw = t.load_image(data)
        assert frame_hw == (130, 200)
        assert np.array_equal(got, t.prepare_image(decode_rgb(data)))


@pytest.mark.parametrize(
    "mask_hw, frame_hw, crop_top, crop_bottom",
    [((192, 512), (1710, 3384), 690, 0), ((20, 50), (130, 200), 30, 7), ((37, 61), (67, 64), 0, 0)],
)
def test_restored_pixel_counts_equal_counting_the_restored_mask(
    mask_hw, frame_hw, crop_top, crop_bottom
):
    from pipelines.core.labels import N_CLASSES, class_pixel_counts

    t = FrameTransform(width=mask_hw[1], height=mask_hw[0], crop_top=crop_top,
                       crop_bottom=crop_bottom)  # fmt: skip
    mask = np.random.default_rng(5).integers(0, N_CLASSES, mask_hw, dtype=np.uint8)
    counts = t.restored_pixel_counts(mask, frame_hw)
    assert counts == class_pixel_counts(t.restore_mask(mask, frame_hw))
    assert sum(counts) == frame_hw[0] * frame_hw[1]


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
