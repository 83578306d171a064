"""The labeling GPU path's pieces, run on the CPU with the same functions a GPU actor calls:
the mask PNG built from the small mask's rows, the JPEG decode and resize on the model's
device, and the actor rows of both paths (same masks on the same frames; a frame the device
cannot decode is an error row, not a failed batch)."""

import struct
import zlib

import numpy as np
import pytest
import torch

from pipelines.core.codecs import (
    decode_png_mask,
    decode_rgb,
    encode_jpeg,
    encode_png,
    encode_png_rows,
)
from pipelines.core.frames import FrameTransform
from pipelines.core.labels import N_CLASSES, to_apollo_ids
from pipelines.data.sources import Limits
from pipelines.data.synthetic import render_frame
from pipelines.inference.actors import Segmenter
from pipelines.inference.model_dir import MODEL_FILE, SPEC_FILE, ModelSpec, save_model_dir
from pipelines.labeling.stages import load_frames
from pipelines.storage import resolve
from tests.support.models import make_model

PRODUCTION = "fcn8s_resnet101"


def idat(png: bytes) -> bytes:
    """The zlib stream of a PNG's (single) IDAT chunk."""
    i = png.index(b"IDAT")
    (length,) = struct.unpack(">I", png[i - 4 : i])
    return png[i + 4 : i + 4 + length]


def test_row_png_is_the_repeated_rows_and_a_valid_zlib_stream():
    rng = np.random.default_rng(0)
    for trial in range(40):
        n, w = int(rng.integers(1, 12)), int(rng.integers(1, 50))
        rows = rng.integers(0, 4, (n, w)).astype(np.uint8)
        repeats = rng.integers(0, 5, n)
        repeats[0] = max(repeats[0], 1)
        png = encode_png_rows(rows, repeats)
        assert np.array_equal(decode_png_mask(png), np.repeat(rows, repeats, axis=0)), trial
        # PIL does not check the zlib checksum; zlib does (the combined adler32).
        raw = zlib.decompress(idat(png))
        assert len(raw) == int(repeats.sum()) * (w + 1)


@pytest.mark.parametrize(
    "frame_hw, t",
    [
        ((1710, 3384), FrameTransform()),  # the production geometry
        ((855, 1692), FrameTransform(source_height=1710)),  # half size: crops scale
        ((130, 201), FrameTransform(width=50, height=20, crop_top=30, crop_bottom=7)),
        ((70, 90), FrameTransform(width=120, height=60, crop_top=3)),  # mask larger than frame
    ],
)
def test_restored_png_is_the_restored_mask(frame_hw, t):
    rng = np.random.default_rng(1)
    mask = rng.integers(0, N_CLASSES, (t.height, t.width)).astype(np.uint8)
    mask[:, : t.width // 2] = 0  # runs, as a model's masks have
    full = t.restore_mask(mask, frame_hw)
    assert np.array_equal(decode_png_mask(t.restored_png(mask, frame_hw)), full)
    apollo = t.restored_png(to_apollo_ids(mask), frame_hw)
    assert np.array_equal(decode_png_mask(apollo), to_apollo_ids(full))


def test_restored_png_is_cheaper_than_encoding_the_full_mask():
    """What the GPU path leaves to the CPU must not cost what it did (ratio, same run)."""
    import time

    t = FrameTransform()
    mask = np.zeros((t.height, t.width), np.uint8)
    mask[200:, 300:310] = 3
    frame_hw = (1710, 3384)

    def ms(fn) -> float:
        fn()
        t0 = time.perf_counter()
        for _ in range(5):
            fn()
        return time.perf_counter() - t0

    old = ms(lambda: encode_png(t.restore_mask(mask, frame_hw)))
    new = ms(lambda: t.restored_png(mask, frame_hw))
    assert new < old / 2, (old, new)


# -- the actor's two paths, on the CPU -----------------------------------------------------------
T = FrameTransform(width=128, height=48, crop_top=96, source_height=256)


@pytest.fixture(scope="module")
def frames():
    rng = np.random.default_rng(2)
    return [render_frame(rng, 512, 256)[0] for _ in range(3)]


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    """The actor's stage called in this process, its predictor on the CPU."""
    torch.set_num_threads(2)
    # The production model: the masks' agreement bound is measured on it.
    folder = save_model_dir(tmp_path_factory.mktemp("model"), make_model(name=PRODUCTION),
                            ModelSpec(PRODUCTION, 8, T))  # fmt: skip
    return Segmenter({n: (folder / n).read_bytes() for n in (MODEL_FILE, SPEC_FILE)}, device="cpu")


def loaded(tmp_path, datas: list[bytes], device_decode: bool) -> dict:
    names = []
    for i, d in enumerate(datas):
        (tmp_path / f"f{i}.jpg").write_bytes(d)
        names.append(str(tmp_path / f"f{i}.jpg"))
    batch = {
        "image_id": np.array(names, dtype=object),
        "source": np.array(names, dtype=object),
        "bytes": np.array([len(d) for d in datas]),
    }
    return load_frames(batch, kind="frames", transform=T, anchor=resolve(str(tmp_path)),
                       limits=Limits(), device_decode=device_decode)  # fmt: skip


def test_device_path_reads_only_bytes_on_the_cpu(tmp_path, frames):
    datas = [encode_jpeg(f, 90) for f in frames]
    rows = loaded(tmp_path, datas, device_decode=True)
    assert [bytes(e) for e in rows["encoded"]] == datas
    assert not rows["prepared"].any()  # nothing decoded here
    assert (rows["height"] == 256).all() and (rows["width"] == 512).all()


def test_device_path_gives_the_cpu_paths_inputs_and_masks(tmp_path, frames, segmenter):
    datas = [encode_jpeg(f, 90) for f in frames]
    cpu = loaded(tmp_path, datas, device_decode=False)
    dev = loaded(tmp_path, datas, device_decode=True)
    x, errors = segmenter.predictor.prepare_encoded(datas)
    assert errors == [""] * 3
    # Against the exact input (full decode, PIL resize): as close as the CPU path's own
    # half-size JPEG decode is (both within JPEG tolerance).
    exact = np.stack([T.prepare_image(decode_rgb(d)) for d in datas]).astype(int)
    dev_err = np.abs(x.numpy().astype(int) - exact)
    cpu_err = np.abs(cpu["prepared"].astype(int) - exact)
    assert np.percentile(dev_err, 99) <= max(4, np.percentile(cpu_err, 99))
    assert dev_err.mean() <= max(1.0, cpu_err.mean())
    a, b = segmenter(cpu), segmenter(dev)
    assert (a["small_mask"] == b["small_mask"]).mean() > 0.99
    assert list(b["error"]) == ["", "", ""]


def test_a_frame_the_device_cannot_decode_is_an_error_row(tmp_path, frames, segmenter):
    good = encode_jpeg(frames[0], 90)
    broken = good[: len(good) // 3]  # the header reads; the pixels do not
    dev = loaded(tmp_path, [good, broken, good], device_decode=True)
    assert list(dev["error"]) == ["", "", ""]  # the header check passes it on
    out = segmenter(dev)
    assert out["error"][0] == out["error"][2] == ""
    assert "not a decodable JPEG" in out["error"][1]
    assert np.isnan(out["confidence"][1]) and not np.isnan(out["pixel_confidence"][0])


def test_a_png_frame_takes_the_cpu_path(tmp_path, frames):
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frames[0]).save(buf, format="PNG")
    rows = loaded(tmp_path, [buf.getvalue()], device_decode=True)
    assert bytes(rows["encoded"][0]) == b"" and rows["prepared"].any()


def test_shard_images_are_decoded_only(segmenter, frames):
    """Ingested shard images are model inputs already: decoded on the device, not resized; an
    image of another size is an error row."""
    small = T.prepare_image(frames[0])
    x, errors = segmenter.predictor.prepare_encoded(
        [encode_jpeg(small, 95), encode_jpeg(frames[1], 95)], prepared=True
    )
    assert errors[0] == "" and "expected (48, 128)" in errors[1]
    assert np.abs(x[0].numpy().astype(int) - small.astype(int)).mean() < 2


# -- a GPU that fails mid-run: the actor stops, frames are not recorded as bad --------------------
def test_a_cuda_error_while_decoding_stops_the_actor_instead_of_making_error_rows(
    tmp_path, frames, segmenter, monkeypatch
):
    """CUDA's sticky error raised inside the device decode (injected at the fault point, as a
    GPU failing mid-run raises it) is a BrokenGpuError out of the actor's stage (one line,
    exit 7), not an error row for every frame after it."""
    from pipelines.core.errors import BrokenGpuError
    from tests.support import fault_handler

    dev = loaded(tmp_path, [encode_jpeg(f, 90) for f in frames], device_decode=True)
    monkeypatch.setattr(fault_handler, "_calls", {})
    for key, value in fault_handler.fault_env("label.device_decode=1").items():
        monkeypatch.setenv(key, value)
    with pytest.raises(BrokenGpuError, match="failed while decoding a JPEG.*illegal memory"):
        segmenter(dev)


def test_an_error_that_leaves_the_device_working_is_the_datas():
    from pipelines.core.errors import BrokenGpuError
    from pipelines.inference.device import raise_if_device_failed

    cpu = torch.device("cpu")
    raise_if_device_failed(RuntimeError("Not a JPEG file"), cpu, "decoding")  # returns
    with pytest.raises(BrokenGpuError, match="while predicting"):
        raise_if_device_failed(torch.AcceleratorError("CUDA error: launch failure"), cpu,
                               "predicting")  # fmt: skip
