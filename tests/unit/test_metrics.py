"""The one metrics implementation against a direct numpy computation."""

import numpy as np
import pytest
import torch

from pipelines.core.metrics import confusion_matrix, flat_metrics, scores


def numpy_reference(pred: np.ndarray, target: np.ndarray, n: int) -> dict:
    """Direct per-class pixel counting, no confusion matrix."""
    keep = target != 255
    p, t = pred[keep], target[keep]
    ious, accs, freqs = [], [], []
    for c in range(n):
        inter = np.sum((p == c) & (t == c))
        union = np.sum((p == c) | (t == c))
        ious.append(inter / union if union else np.nan)
        accs.append(inter / np.sum(t == c) if np.sum(t == c) else np.nan)
        freqs.append(np.sum(t == c) / t.size)
    ious = np.array(ious)
    valid = ~np.isnan(ious)
    return {
        "pixel_acc": np.mean(p == t),
        "mean_class_acc": np.nanmean(accs),
        "miou": np.nanmean(ious),
        "fwiou": np.sum(np.array(freqs)[valid] * ious[valid]),
        "iou": ious,
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scores_equal_direct_numpy_computation(seed):
    rng = np.random.default_rng(seed)
    n = 8
    target = rng.integers(0, n, (4, 37, 53))
    target[rng.random(target.shape) < 0.1] = 255
    target[target == 3] = 0  # one class absent from the ground truth
    pred = np.where(rng.random(target.shape) < 0.7, target, rng.integers(0, n, target.shape))
    pred[pred == 255] = 0
    conf = confusion_matrix(torch.from_numpy(pred), torch.from_numpy(target), n)
    assert int(conf.sum()) == int((target != 255).sum())
    got, ref = scores(conf), numpy_reference(pred, target, n)
    for key in ("pixel_acc", "mean_class_acc", "miou", "fwiou"):
        assert got[key] == pytest.approx(ref[key], rel=1e-12), key
    np.testing.assert_allclose(list(got["iou"].values()), ref["iou"], rtol=1e-12)


def test_summed_confusion_is_not_mean_of_per_rank_miou():
    """Ranks see different pixels: summing matrices is right, averaging mIoU is not."""
    t1, p1 = torch.tensor([0, 0, 0, 1]), torch.tensor([0, 0, 0, 0])
    t2, p2 = torch.tensor([1, 1, 1, 1, 1, 1, 1, 1]), torch.tensor([1, 1, 1, 1, 1, 1, 1, 1])
    c1, c2 = confusion_matrix(p1, t1, 2), confusion_matrix(p2, t2, 2)
    whole = confusion_matrix(torch.cat([p1, p2]), torch.cat([t1, t2]), 2)
    assert torch.equal(c1 + c2, whole)
    averaged = (scores(c1)["miou"] + scores(c2)["miou"]) / 2
    assert scores(whole)["miou"] != pytest.approx(averaged)
    assert scores(whole)["miou"] == pytest.approx((3 / 4 + 8 / 9) / 2)


def test_ignore_index_and_shape_mismatch():
    conf = confusion_matrix(torch.tensor([1, 0, 1]), torch.tensor([1, 255, 0]), 2)
    assert conf.tolist() == [[0, 1], [0, 1]]
    with pytest.raises(ValueError, match="pred shape"):
        confusion_matrix(torch.zeros(2, 3), torch.zeros(3, 2), 2)


def test_flat_metrics_names():
    flat = flat_metrics(scores(np.eye(8, dtype=np.int64)))
    assert flat["val_miou"] == 1.0 and flat["val_iou_zebra"] == 1.0
    assert set(flat) >= {"val_pixel_acc", "val_mean_class_acc", "val_fwiou", "val_iou_background"}
