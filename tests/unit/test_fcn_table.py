"""benchmarks/bench_fcn_table.py (issue 26): the table runs end to end at a tiny size, through
the training engine, the staged FCN-16s starts from the trained FCN-32s, and the boundary band
marks what is near a label edge. One run of the table (module fixture) serves every test of it."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from benchmarks import bench_fcn_table as bench
from pipelines.core.frames import FrameTransform
from pipelines.core.labels import IGNORE_INDEX, N_CLASSES
from pipelines.training import engine

# What FCN-16s takes from FCN-32s (copy_params_from_fcn32s): the VGG backbone and score_fr.
SHARED = ("features.", "fc6.", "fc7.", "score_fr.")
SEED = 3


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """(results, the written table, what the run recorded): fcn16s, which brings fcn32s, from
    one seed, one step of one frame each, scored on one val frame (a VGG FCN costs seconds a
    frame on CPU whatever the input size: conv1_1 pads it by 100 px)."""
    seen: dict = {"train_one_epoch": 0, "evaluate": 0}
    real = bench.init_model, engine.train_one_epoch, engine.evaluate, bench.load_demo

    def two_and_one(*args):  # the demo's smallest split is 4 + 4 frames
        train, val = real[3](*args)
        return {k: v[:2] for k, v in train.items()}, {k: v[:1] for k, v in val.items()}

    def recording_init(name, seed, trained, weights):
        model, start = real[0](name, seed, trained, weights)
        if name == "fcn16s":
            for key, m in (("fcn32s", trained["fcn32s"]), ("fcn16s", model)):
                state = m.state_dict()
                seen[key] = {k: v.clone() for k, v in state.items() if k.startswith(SHARED)}
            seen["start"] = start
        return model, start

    def counting(name, fn):
        def call(*args, **kwargs):
            seen[name] += 1
            return fn(*args, **kwargs)

        return call

    out = tmp_path_factory.mktemp("fcn_table") / "table.md"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bench, "init_model", recording_init)
        mp.setattr(bench, "load_demo", two_and_one)
        mp.setattr(engine, "train_one_epoch", counting("train_one_epoch", real[1]))
        mp.setattr(engine, "evaluate", counting("evaluate", real[2]))
        results = bench.main(["--size", "32x32", "--frame-size", "256x128", "--crop-top", "32",
                              "--frames", "8", "--steps", "1", "--batch-size", "1", "--seeds",
                              str(SEED), "--models", "fcn16s", "--out", str(out)])  # fmt: skip
    return results, out.read_text(), seen


def test_band_marks_pixels_near_a_label_edge_and_not_far_ones():
    label = torch.zeros(1, 12, 16, dtype=torch.long)
    label[:, :, 8:] = 1  # a vertical edge between columns 7 and 8
    label[:, 0:2, 0:2] = IGNORE_INDEX  # ignore, far from the edge: no band around it
    band = bench.boundary_band(label, 2)
    expected = torch.zeros_like(band)
    expected[:, :, 6:10] = True  # within 2 px of the other class, on either side
    assert torch.equal(band, expected)
    # Ignore pixels next to the edge are not in the band (they are never scored).
    label[:, 5, 7] = IGNORE_INDEX
    band = bench.boundary_band(label, 2)
    assert not band[0, 5, 7] and band[0, 5, 6] and band[0, 5, 8]
    # A wider band reaches further.
    assert bench.boundary_band(label, 3)[0, 0, 5] and not bench.boundary_band(label, 3)[0, 0, 4]


def test_a_staged_model_brings_the_stages_it_starts_from():
    p = bench.build_parser()
    assert bench.parse_models(p, "fcn8s,fcn8s_atonce") == [
        "fcn32s", "fcn16s", "fcn8s", "fcn8s_atonce"
    ]  # fmt: skip
    assert bench.parse_models(p, "fcn8s_resnet101") == ["fcn8s_resnet101"]


def test_the_ordering_line_reads_the_mean_over_seeds():
    def rows(**miou):
        return [{"model": m, "miou": v} for m, vs in miou.items() for v in vs]

    names = ["fcn32s", "fcn16s", "fcn8s"]
    [line] = bench.verdict_lines(
        rows(fcn32s=[0.2, 0.3], fcn16s=[0.3, 0.3], fcn8s=[0.4, 0.3]), names
    )
    assert line == "ordering fcn32s<fcn16s<fcn8s: yes (mIoU 0.250 / 0.300 / 0.350)"
    [line] = bench.verdict_lines(rows(fcn32s=[0.3], fcn16s=[0.3], fcn8s=[0.4]), names)
    assert line.startswith("ordering fcn32s<fcn16s<fcn8s: no (")


def test_every_model_asked_for_and_the_stage_before_it_is_trained(table):
    results, _, _ = table
    assert [(r["model"], r["seed"]) for r in results] == [("fcn32s", SEED), ("fcn16s", SEED)]


def test_the_table_has_a_row_and_a_mean_row_per_model(table):
    results, text, _ = table
    for r in results:
        assert f"| {r['model']} | {SEED} | " in text
        assert f"| **{r['model']}** (mean ± spread) | {SEED} |" in text
    assert "backbone: scratch" in text and "| 1 (2) |" in text  # fcn16s: 1 step, 2 in total


def test_scores_are_fractions(table):
    for r in table[0]:
        assert 0.0 <= r["miou"] <= 1.0 and 0.0 <= r["band_miou"] <= 1.0, r


def test_images_per_s_needs_a_step_after_the_warm_up_one(table):
    assert all(math.isnan(r["images_per_s"]) for r in table[0])  # one step each
    assert "| - | - |" in table[1]  # images/s and peak GPU memory (on CPU)


def test_images_per_s_counts_the_steps_after_the_first():
    frames = {
        "image": torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8),
        "label": torch.randint(0, N_CLASSES, (4, 32, 32), dtype=torch.uint8),
    }
    args = argparse.Namespace(steps=3, batch_size=2, recipe="default", lr=None)
    model = torch.nn.Conv2d(3, N_CLASSES, 1)  # the clock, not the model, is what is tested
    transform = FrameTransform(width=32, height=32)
    state, timing = bench.train(model, "fcn8s_resnet18", frames, args, transform, seed=0)
    assert state.global_step == 3
    assert math.isfinite(timing["images_per_s"]) and timing["images_per_s"] > 0
    assert math.isfinite(timing["loss"]) and timing["peak_mib"] is None


def test_training_and_scoring_go_through_the_engine(table):
    _, _, seen = table
    assert seen["evaluate"] == 4  # per model: all val pixels, then those in the band
    assert seen["train_one_epoch"] == 2  # one step: one epoch per model


def test_fcn16s_starts_from_the_trained_fcn32s(table):
    _, _, seen = table
    assert seen["start"] == "trained fcn32s"
    trained, staged = seen["fcn32s"], seen["fcn16s"]
    assert sorted(staged) == sorted(trained)
    assert len(staged) == 2 * (13 + 2 + 1)  # 13 convs, fc6, fc7, score_fr: weight and bias
    for k in staged:
        assert torch.equal(staged[k], trained[k]), k


def test_the_trained_fcn32s_is_not_the_one_it_started_as(table):
    # Training moved score_fr off its zero start and the weights off the seed's initialisation:
    # the transfer above copies something a model built without it would not have.
    trained = table[2]["fcn32s"]
    assert trained["score_fr.weight"].abs().sum() > 0
    start = engine.build_model("fcn32s", N_CLASSES, seed=SEED).state_dict()
    assert not all(torch.equal(start[k], trained[k]) for k in trained)
