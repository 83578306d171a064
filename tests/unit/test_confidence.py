"""Per-frame confidence: the scores the labeling job writes, and the review list."""

from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.inference.model_dir import ModelSpec
from pipelines.inference.predictor import Predictor
from pipelines.labeling.output import committed_files, write_review
from pipelines.labeling.schema import OUTPUT_SCHEMA, REVIEW
from pipelines.storage import resolve
from tests.support.models import TEST_MODEL, make_model


def test_scores_are_the_softmax_statistics_of_each_frame(test_transform):
    spec = ModelSpec(TEST_MODEL, 8, test_transform)
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
    background = Predictor(make_model(0), ModelSpec(TEST_MODEL, 8, test_transform), "cpu")
    _, scores = background.predict_scored(images)
    assert np.isnan(scores["confidence"]).all() and (scores["pixel_confidence"] > 0).all()


def scored_rows(image_ids: list[str], scores: dict, status: list[str] | None = None) -> pa.Table:
    """Labeled rows as write_review reads them: ids, sources s3://in/ID.jpg, the scores,
    model m v3, labeled on 2026-11-27."""
    n = len(image_ids)
    columns = {
        "image_id": image_ids,
        "source": [f"s3://in/{i}.jpg" for i in image_ids],
        **scores,
        "model_name": ["m"] * n,
        "model_version": ["3"] * n,
        "status": status or ["ok"] * n,
        "labeled_at": [datetime(2026, 11, 27, 8, tzinfo=timezone.utc)] * n,
    }
    return pa.table(columns, schema=pa.schema([OUTPUT_SCHEMA.field(c) for c in columns]))


def test_review_lists_the_unsure_ok_frames_and_is_not_read_as_output(tmp_path):
    rows = {
        "a": ("ok", 0.40, 0.90, 0.5),  # unsure about its lanes
        "b": ("ok", 0.95, 0.99, 0.5),
        "c": ("ok", None, 0.30, 0.5),  # no lane predicted: the pixel confidence decides
        "d": ("ok", None, 0.97, None),  # no BatchNorm, no novelty: the confidence decides
        "e": ("error", None, None, None),  # never predicted: not for review
        "f": ("ok", 0.98, 0.99, 25.0),  # sure, but unlike the training data
        "g": ("ok", 0.98, 0.99, 10.0),  # at the threshold: not over it
    }
    table = scored_rows(
        list(rows),
        {"confidence": [v[1] for v in rows.values()],
         "pixel_confidence": [v[2] for v in rows.values()],
         "uncertain_fraction": [0.1] * len(rows),
         "novelty": [v[3] for v in rows.values()]},
        status=[v[0] for v in rows.values()],
    )  # fmt: skip
    output = resolve(str(tmp_path / "out"))
    uri, n = write_review(output, "run-1", table, below=0.5, novelty_above=10.0)
    assert uri == output.join(REVIEW, "labeled_date=2026-11-27", "run-1.parquet").uri and n == 3
    review = pq.read_table(output.join(REVIEW, "labeled_date=2026-11-27", "run-1.parquet").path)
    assert review.column("image_id").to_pylist() == ["a", "c", "f"]
    assert review.column("source").to_pylist() == [
        "s3://in/a.jpg",
        "s3://in/c.jpg",
        "s3://in/f.jpg",
    ]
    assert review.column("novelty").to_pylist() == [0.5, 0.5, 25.0]
    # The review list lives under OUTPUT but is no output row.
    assert committed_files(output) == []


def test_novelty_is_the_median_standardized_distance_from_the_batchnorm_statistics():
    """Per frame and BatchNorm layer: mean over channels of (frame's channel mean - running
    mean)^2 / (running var + eps); then the median over layers. Computed here by hand on a
    model of three BatchNorm layers with set statistics; a model without BatchNorm has none
    (NaN)."""
    from pipelines.core.frames import FrameTransform

    transform = FrameTransform(width=64, height=32, crop_top=0)
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 1)
    bns = [torch.nn.BatchNorm2d(4) for _ in range(3)]
    stats = [([0.5, -1.0, 0.0, 2.0], [0.25, 1.0, 4.0, 0.5]),
             ([1.0, 0.0, -0.5, 0.1], [2.0, 0.1, 1.0, 3.0]),
             ([0.0, 3.0, 0.0, -2.0], [0.05, 0.2, 0.01, 0.5])]  # fmt: skip
    with torch.no_grad():
        for bn, (mean, var) in zip(bns, stats, strict=True):
            bn.running_mean.copy_(torch.tensor(mean))
            bn.running_var.copy_(torch.tensor(var))
    model = torch.nn.Sequential(conv, *bns)
    predictor = Predictor(model, ModelSpec("custom", 4, transform), "cpu")
    images = np.random.default_rng(1).integers(0, 256, (3, 32, 64, 3), np.uint8)
    _, scores = predictor.predict_scored(images)

    with torch.no_grad():
        inputs = [conv(transform.normalize(torch.from_numpy(images)))]
        for bn in bns[:-1]:
            inputs.append(bn(inputs[-1]))
    for i in range(3):
        layer = sorted(
            ((x[i].mean((1, 2)) - bn.running_mean) ** 2 / (bn.running_var + bn.eps)).mean().item()
            for x, bn in zip(inputs, bns, strict=True)
        )
        assert layer[1] != pytest.approx(sum(layer) / 3, rel=0.01)  # median, not mean
        assert scores["novelty"][i] == pytest.approx(layer[1], rel=1e-5)

    plain = Predictor(torch.nn.Sequential(conv), ModelSpec("custom", 4, transform), "cpu")
    assert np.isnan(plain.predict_scored(images)[1]["novelty"]).all()


def test_a_trained_model_is_sure_of_noise_and_only_novelty_sends_noise_to_review(tmp_path):
    """FCN-8s ResNet-101 trained (briefly, from scratch) on synthetic drive frames. On frames
    of pure noise its softmax is no guide (it is as sure as on its own training frames, or
    more), but their novelty is far above the review threshold, and the frames it was trained
    on, and new frames of the same kind, are far below it; the review list is the noise."""
    from fcn_models import build_model
    from pipelines.core.frames import FrameTransform
    from pipelines.core.labels import to_train_ids
    from pipelines.data.synthetic import render_frame
    from pipelines.labeling.schema import NOVELTY_ABOVE
    from tests.support.helpers import CROP_TOP, FRAME_H, FRAME_W

    transform = FrameTransform(width=64, height=32, crop_top=CROP_TOP)  # small: a fast test
    rng = np.random.default_rng(3)

    def frames(n: int) -> tuple[np.ndarray, np.ndarray]:
        drawn = [render_frame(rng, FRAME_W, FRAME_H) for _ in range(n)]
        return (
            np.stack([transform.prepare_image(f) for f, _ in drawn]),
            np.stack([to_train_ids(transform.prepare_label(lab))[0] for _, lab in drawn]),
        )

    images, labels = frames(16)
    torch.manual_seed(0)
    # The production model: its overconfidence on noise is what the test is about.
    model = build_model("fcn8s_resnet101", 8)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    x, y = transform.normalize(torch.from_numpy(images)), torch.from_numpy(labels).long()
    model.train()
    for _ in range(40):
        pick = torch.randint(0, len(x), (4,))
        loss = torch.nn.functional.cross_entropy(model(x[pick]), y[pick], ignore_index=255)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5  # it learned the frames

    predictor = Predictor(model, ModelSpec("fcn8s_resnet101", 8, transform), "cpu")
    noise = np.random.default_rng(9).integers(0, 256, (4, *images.shape[1:]), np.uint8)
    fresh = frames(8)[0]
    broken = np.stack([np.zeros_like(fresh[0]),  # a black frame; one 80 levels overexposed
                       np.clip(fresh[0].astype(int) + 80, 0, 255).astype(np.uint8)])  # fmt: skip
    seen, new, noisy, odd = (
        predictor.predict_scored(batch)[1] for batch in (images[:8], fresh, noise, broken)
    )
    print({name: (np.round(s["novelty"], 2).tolist(), np.round(s["pixel_confidence"], 3).tolist())
           for name, s in (("trained", seen), ("new", new), ("noise", noisy), ("black, bright", odd))})  # fmt: skip
    assert noisy["pixel_confidence"].min() > np.median(seen["pixel_confidence"])  # sure of noise
    assert max(seen["novelty"].max(), new["novelty"].max()) < NOVELTY_ABOVE
    assert min(noisy["novelty"].min(), odd["novelty"].min()) > 10 * NOVELTY_ABOVE

    ids = [f"trained-{i}" for i in range(8)] + [f"noise-{i}" for i in range(4)]
    table = scored_rows(ids, {k: pa.array(np.concatenate([seen[k], noisy[k]]), from_pandas=True)
                              for k in seen})  # fmt: skip
    output = resolve(str(tmp_path / "out"))
    uri, _ = write_review(output, "run-1", table, below=0.3)
    review = pq.read_table(resolve(uri).path)
    assert review.column("image_id").to_pylist() == [f"noise-{i}" for i in range(4)]
