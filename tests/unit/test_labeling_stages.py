"""Labeling's stages on a batch of frames, in this process and without Ray (the job runs the same
functions as Ray Data stages: tests/integration/test_label.py): every kind of bad file becomes an
error row with its reason, good frames get masks at their own size that are the model's own
prediction, with the counts, Apollo ids and scores the output promises; frames of the same
camera at lower resolution lose the same fraction of rows to the crop; shard frames are labeled
at the shards' size."""

from __future__ import annotations

import io
from dataclasses import replace
from datetime import datetime, timezone

import numpy as np
import pytest
from PIL import Image

from pipelines.core import labels
from pipelines.core.codecs import decode_png_mask
from pipelines.data.sources import Limits
from pipelines.data.synthetic import render_frame
from pipelines.inference.actors import Segmenter
from pipelines.inference.model_dir import MODEL_FILE, SPEC_FILE, ModelSpec, save_model_dir
from pipelines.inference.predictor import Predictor
from pipelines.labeling.inputs import list_inputs
from pipelines.labeling.stages import LabelStages
from pipelines.storage import resolve
from tests.support.frames import MAX_PIXELS, mixed_frames, png
from tests.support.helpers import CROP_TOP, FRAME_H, FRAME_W
from tests.support.models import TEST_MODEL, make_model

NOW = datetime(2026, 12, 7, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def labeled(tmp_path_factory, test_transform):
    """The mixed frames labeled in this process: (expected, output rows by relative path,
    predictor of the same files)."""
    folder = tmp_path_factory.mktemp("incoming")
    expected = {}
    for rel, (data, why) in mixed_frames().items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
        expected[rel] = why
    model = tmp_path_factory.mktemp("model")
    save_model_dir(model, make_model(seed=1), ModelSpec(TEST_MODEL, 8, test_transform))
    files = {n: (model / n).read_bytes() for n in (MODEL_FILE, SPEC_FILE)}
    inputs = list_inputs(str(folder))
    stages = LabelStages(kind=inputs.kind, anchor=resolve(inputs.uri), transform=test_transform,
                         model_name="m", model_version="3", limits=Limits(max_pixels=MAX_PIXELS),
                         apollo_ids=True)  # fmt: skip
    table = stages.label(inputs.rows, Segmenter(files, device="cpu"), NOW)
    rows = {r["source"].removeprefix(inputs.uri + "/"): r for r in table.to_pylist()}
    return expected, rows, Predictor.from_files(files, "cpu"), folder


def test_one_row_per_input_none_twice(labeled):
    expected, rows, _, _ = labeled
    assert sorted(rows) == sorted(expected)


def test_every_bad_file_is_an_error_row_with_its_reason(labeled):
    expected, rows, _, _ = labeled
    for rel, why in expected.items():
        row = rows[rel]
        if why:
            assert row["status"] == "error" and why in row["error"], (rel, row["error"])
            assert row["mask"] is None and row["class_pixels"] is None
        else:
            assert row["status"] == "ok" and row["error"] is None, (rel, row["error"])


def test_rows_carry_the_model_version_and_time(labeled):
    _, rows, _, _ = labeled
    assert {(r["model_name"], r["model_version"], r["labeled_at"]) for r in rows.values()} == {
        ("m", "3", NOW)
    }


def good_rows(labeled):
    expected, rows, predictor, folder = labeled
    for rel, why in expected.items():
        if not why:
            data = (folder / rel).read_bytes()
            yield rows[rel], data, np.asarray(Image.open(io.BytesIO(data))), predictor


def test_masks_are_at_the_frames_size_with_the_sky_as_background(labeled):
    for row, _, frame, _ in good_rows(labeled):
        mask = decode_png_mask(row["mask"])
        assert mask.shape == frame.shape[:2] == (row["height"], row["width"])
        top = round(CROP_TOP * frame.shape[0] / FRAME_H)  # the crop's share of the rows
        assert (mask[:top] == 0).all()


def test_class_pixels_and_apollo_masks_are_the_masks(labeled):
    for row, *_ in good_rows(labeled):
        mask = decode_png_mask(row["mask"])
        assert sum(row["class_pixels"]) == mask.size
        assert row["class_pixels"] == labels.class_pixel_counts(mask)
        np.testing.assert_array_equal(
            decode_png_mask(row["apollo_mask"]), labels.to_apollo_ids(mask)
        )


def test_masks_and_scores_are_the_models_own(labeled):
    """The same model called directly on the same model input (the frame's bytes decoded as
    labeling does): the stages add nothing. (Batches differ, so float summation order may
    differ: a few tie flips.)"""
    masks = set()
    for row, data, frame, predictor in good_rows(labeled):
        t = predictor.transform
        small, scores = predictor.predict_scored(t.load_image(data)[0][None])
        direct = t.restore_mask(small[0], frame.shape[:2])
        assert (direct == decode_png_mask(row["mask"])).mean() > 0.999
        for k in ("confidence", "pixel_confidence", "uncertain_fraction"):
            assert row[k] == pytest.approx(float(scores[k][0]), abs=1e-4), k
        assert row["novelty"] == pytest.approx(float(scores["novelty"][0]), rel=1e-3)
        masks.add(row["mask"])
    assert len(masks) > 1  # not a constant model


def test_frames_at_half_and_quarter_resolution_are_cropped_by_the_same_fraction(
    tmp_path, test_transform
):
    """A model ingested from FRAME_H-row frames labels the same camera's frames at 1x, 0.5x
    and 0.25x: each loses the same fraction of its rows to the sky crop (not CROP_TOP rows,
    which would leave a quarter-size frame nothing), and each mask is the model's prediction
    on that frame at its own size."""
    transform = replace(test_transform, source_height=FRAME_H)
    save_model_dir(tmp_path / "m", make_model(seed=1), ModelSpec(TEST_MODEL, 8, transform))
    files = {n: (tmp_path / "m" / n).read_bytes() for n in (MODEL_FILE, SPEC_FILE)}
    frame = render_frame(np.random.default_rng(11), FRAME_W, FRAME_H)[0]
    sizes = {}
    for f in (1, 2, 4):
        w, h = FRAME_W // f, FRAME_H // f
        small = np.asarray(Image.fromarray(frame).resize((w, h), Image.Resampling.BILINEAR))
        (tmp_path / "cam").mkdir(exist_ok=True)
        (tmp_path / "cam" / f"x{f}.png").write_bytes(png(small))
        sizes[f"x{f}"] = (h, w, small)
    inputs = list_inputs(str(tmp_path / "cam"))
    stages = LabelStages(kind=inputs.kind, anchor=resolve(inputs.uri), transform=transform,
                         model_name="m", model_version="1", limits=Limits())  # fmt: skip
    table = stages.label(inputs.rows, Segmenter(files, device="cpu"), NOW)
    predictor = Predictor.from_files(files, "cpu")
    assert table.num_rows == 3
    for row in table.to_pylist():
        h, w, small = sizes[row["image_id"]]
        mask = decode_png_mask(row["mask"])
        assert row["status"] == "ok" and mask.shape == (h, w)
        assert (mask[: round(CROP_TOP * h / FRAME_H)] == 0).all()
        assert (mask == predictor.predict([small])[0]).mean() > 0.999


def test_shard_frames_are_labeled_at_the_shards_size(local_shards, tmp_path):
    """An ingested dataset's frames are model inputs already: one ok row per frame, its mask at
    the shards' size."""
    inputs = list_inputs(local_shards)
    t = inputs.transform
    save_model_dir(tmp_path / "m", make_model(seed=1), ModelSpec(TEST_MODEL, 8, t))
    files = {n: (tmp_path / "m" / n).read_bytes() for n in (MODEL_FILE, SPEC_FILE)}
    stages = LabelStages(kind=inputs.kind, anchor=resolve(inputs.uri), transform=t, model_name="m",
                         model_version="1", limits=Limits())  # fmt: skip
    rows = inputs.rows[:6]
    segment = Segmenter(files, device="cpu", inputs_prepared=True)
    table = stages.label(rows, segment, NOW).to_pylist()
    assert [r["source"] for r in table] == [r["source"] for r in rows]
    for r in table:
        assert r["status"] == "ok"
        assert decode_png_mask(r["mask"]).shape == (r["height"], r["width"]) == (t.height, t.width)


def test_a_frame_the_store_refuses_to_read_is_deferred_not_an_error_row(
    tmp_path, test_transform, monkeypatch
):
    """A real S3 endpoint answering 403 AccessDenied for one frame (the job's role may not read
    it): that frame is deferred with the store's refusal as its reason (no row is written for
    it; the next run tries again), the readable frame is labeled."""
    from pipelines.labeling.stages import DEFERRED
    from tests.support.faults import outage_server

    rng = np.random.default_rng(4)
    jpeg = io.BytesIO()
    Image.fromarray(render_frame(rng, FRAME_W, FRAME_H)[0]).save(jpeg, format="JPEG")
    save_model_dir(tmp_path / "m", make_model(seed=1), ModelSpec(TEST_MODEL, 8, test_transform))
    files = {n: (tmp_path / "m" / n).read_bytes() for n in (MODEL_FILE, SPEC_FILE)}
    with outage_server(deny=("/denied.jpg",)) as srv:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", srv.endpoint)
        for name in ("ok.jpg", "denied.jpg"):
            srv.location(f"s3://lanes/refused/{name}").write_bytes(jpeg.getvalue())
        inputs = list_inputs("s3://lanes/refused")
        stages = LabelStages(kind=inputs.kind, anchor=resolve(inputs.uri),
                             transform=test_transform, model_name="m", model_version="1",
                             limits=Limits())  # fmt: skip
        table = stages.label(inputs.rows, Segmenter(files, device="cpu"), NOW).to_pylist()
    rows = {r["image_id"]: r for r in table}
    assert rows["ok"]["status"] == "ok"
    assert rows["denied"]["status"] == DEFERRED, rows["denied"]
    assert "storage denied this job access" in rows["denied"]["error"]
