"""benchmarks/bench_fcn_table.py (issue 26): the table runs end to end at a tiny size, the staged
FCN-16s starts from the trained FCN-32s, and the boundary band marks what is near a label edge."""

from __future__ import annotations

import math

import torch

from benchmarks import bench_fcn_table as bench
from fcn_models import build_model
from pipelines.core.labels import IGNORE_INDEX, N_CLASSES

# What FCN-16s takes from FCN-32s (copy_params_from_fcn32s): the VGG backbone and score_fr.
SHARED = ("features.", "fc6.", "fc7.", "score_fr.")


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


def test_the_table_runs_and_fcn16s_starts_from_the_trained_fcn32s(tmp_path, monkeypatch):
    seen = {}
    real_init = bench.init_model

    def recording_init(name, seed, trained, weights):
        model, start = real_init(name, seed, trained, weights)
        if name == "fcn16s":
            for key, m in (("fcn32s", trained["fcn32s"]), ("fcn16s", model)):
                state = m.state_dict()
                seen[key] = {k: v.clone() for k, v in state.items() if k.startswith(SHARED)}
            seen["start"] = start
        return model, start

    monkeypatch.setattr(bench, "init_model", recording_init)
    out = tmp_path / "table.md"
    # fcn16s needs fcn32s: asking for it trains both.
    results = bench.main(["--size", "32x32", "--frames", "8", "--steps", "1", "--batch-size",
                          "2", "--seeds", "3", "--models", "fcn16s,fcn8s_resnet101",
                          "--out", str(out)])  # fmt: skip

    assert [r["model"] for r in results] == ["fcn32s", "fcn16s", "fcn8s_resnet101"]
    text = out.read_text()
    for r in results:
        assert 0.0 <= r["miou"] <= 1.0 and 0.0 <= r["band_miou"] <= 1.0, r
        assert math.isfinite(r["images_per_s"]) and r["images_per_s"] > 0
        assert f"| {r['model']} | 3 | " in text
        assert f"| **{r['model']}** (mean ± spread) | 3 |" in text
    assert "backbone: scratch" in text and "| 1 (2) |" in text  # fcn16s: 1 step, 2 in total

    # The staged model holds the trained FCN-32s's backbone and score head...
    assert seen["start"] == "trained fcn32s"
    trained, staged = seen["fcn32s"], seen["fcn16s"]
    shared = sorted(staged)
    assert sorted(trained) == shared
    assert len(shared) == 2 * (13 + 2 + 1)  # 13 convs, fc6, fc7, score_fr: weight and bias
    for k in shared:
        assert torch.equal(staged[k], trained[k]), k
    # ... which a model built without the transfer does not: training moved score_fr off zero.
    assert trained["score_fr.weight"].abs().sum() > 0
    torch.manual_seed(3)
    fresh = build_model("fcn16s", N_CLASSES).state_dict()
    assert not all(torch.equal(fresh[k], trained[k]) for k in shared)


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


def test_a_staged_model_brings_the_stages_it_starts_from():
    p = bench.build_parser()
    assert bench.parse_models(p, "fcn8s,fcn8s_atonce") == [
        "fcn32s", "fcn16s", "fcn8s", "fcn8s_atonce"
    ]  # fmt: skip
    assert bench.parse_models(p, "fcn8s_resnet101") == ["fcn8s_resnet101"]
