"""Per-frame confidence: the scores the labeling job writes, and the review list."""

from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.labeling import OUTPUT_SCHEMA, REVIEW, committed_files, write_review
from pipelines.predictor import ModelSpec, Predictor
from pipelines.storage import resolve

from .conftest import make_model


def test_scores_are_the_softmax_statistics_of_each_frame(test_transform):
    spec = ModelSpec("fcn8s_resnet101", 8, test_transform)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, test_transform.height, test_transform.width, 3), np.uint8)
    model = make_model(None, seed=4)
    with torch.no_grad():  # raise background until it wins about half the pixels
        logits = Predictor(model, spec, "cpu").logits(torch.from_numpy(images))
        model.score_layer4.bias[0] += (logits[:, 1:].max(1).values - logits[:, 0]).median()
    predictor = Predictor(model, spec, "cpu")
    p, pred = predictor.logits(torch.from_numpy(images)).softmax(1).max(1)
    threshold = p.median().item()  # about half the pixels uncertain
    masks, scores = predictor.predict_scored(images, uncertain_below=threshold)
    np.testing.assert_array_equal(masks, predictor.predict_prepared(images))
    for i in range(3):
        lane = pred[i] > 0
        assert lane.any() and not lane.all()  # both kinds of pixel: a real check
        assert scores["confidence"][i] == pytest.approx(p[i][lane].mean().item(), rel=1e-5)
        assert scores["pixel_confidence"][i] == pytest.approx(p[i].mean().item(), rel=1e-5)
        assert scores["uncertain_fraction"][i] == pytest.approx(
            (p[i] < threshold).float().mean().item()
        )
    assert scores["uncertain_fraction"].min() > 0 and scores["uncertain_fraction"].max() < 1

    # A model that predicts background everywhere has no lane confidence (NaN -> null).
    background = Predictor(make_model(0), ModelSpec("fcn8s_resnet101", 8, test_transform), "cpu")
    _, scores = background.predict_scored(images)
    assert np.isnan(scores["confidence"]).all() and (scores["pixel_confidence"] > 0).all()


def test_review_lists_the_unsure_ok_frames_and_is_not_read_as_output(tmp_path):
    at = datetime(2026, 11, 27, 8, tzinfo=timezone.utc)
    rows = {
        "a": ("ok", 0.40, 0.90),  # unsure about its lanes
        "b": ("ok", 0.95, 0.99),
        "c": ("ok", None, 0.30),  # no lane predicted: the pixel confidence decides
        "d": ("ok", None, 0.97),
        "e": ("error", None, None),  # never predicted: not for review
    }
    table = pa.table(
        {
            "image_id": list(rows),
            "source": [f"s3://in/{k}.jpg" for k in rows],
            "confidence": [v[1] for v in rows.values()],
            "pixel_confidence": [v[2] for v in rows.values()],
            "uncertain_fraction": [0.1] * len(rows),
            "model_name": ["m"] * len(rows),
            "model_version": ["3"] * len(rows),
            "status": [v[0] for v in rows.values()],
            "labeled_at": [at] * len(rows),
        },
        schema=pa.schema([OUTPUT_SCHEMA.field(c) for c in (
            "image_id", "source", "confidence", "pixel_confidence", "uncertain_fraction",
            "model_name", "model_version", "status", "labeled_at")]),
    )  # fmt: skip
    output = resolve(str(tmp_path / "out"))
    uri, n = write_review(output, "run-1", table, below=0.5)
    assert uri == output.join(REVIEW, "labeled_date=2026-11-27", "run-1.parquet").uri and n == 2
    review = pq.read_table(output.join(REVIEW, "labeled_date=2026-11-27", "run-1.parquet").path)
    assert review.column("image_id").to_pylist() == ["a", "c"]
    assert review.column("source").to_pylist() == ["s3://in/a.jpg", "s3://in/c.jpg"]
    # The review list lives under OUTPUT but is no output row.
    assert committed_files(output) == []
