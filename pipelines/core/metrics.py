"""The one metrics implementation: a confusion matrix, and scores derived from it; and the
names of the per-frame scores a prediction carries.

Distributed evaluation sums confusion matrices over all ranks and computes the scores once
from the sum; averaging per-rank mIoU would weight ranks, not pixels, and be wrong. PyTorch is
imported by :func:`confusion_matrix` only: labeling's CPU tasks read the names without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from pipelines.core.labels import CLASS_NAMES, IGNORE_INDEX

if TYPE_CHECKING:
    import torch

#: The per-frame scores of a prediction
#: (:meth:`pipelines.inference.predictor.Predictor.predict_scored`), also labeling's output
#: columns: how sure the model is (three) and how unlike the training data the frame is.
SCORE_NAMES = ("confidence", "pixel_confidence", "uncertain_fraction", "novelty")


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, n_class: int, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """``conf[t, p]`` = number of pixels of true class t predicted as p (int64, on the inputs'
    device). Pixels whose target is ``ignore_index`` (or otherwise outside [0, n_class)) are
    skipped."""
    import torch

    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    target = target.long().reshape(-1)
    pred = pred.long().reshape(-1)
    keep = (target >= 0) & (target < n_class) & (target != ignore_index)
    index = target[keep] * n_class + pred[keep].clamp(0, n_class - 1)
    return torch.bincount(index, minlength=n_class * n_class).reshape(n_class, n_class)


def scores(conf: np.ndarray | torch.Tensor, class_names: tuple[str, ...] = CLASS_NAMES) -> dict:
    """Pixel accuracy, mean class accuracy, mIoU, frequency-weighted IoU and per-class IoU
    (the FCN paper's four metrics). Classes absent from both prediction and target have no
    IoU (NaN) and are left out of the means."""
    conf = np.asarray(conf.cpu() if hasattr(conf, "cpu") else conf, dtype=np.float64)
    n = conf.shape[0]
    names = class_names if len(class_names) == n else tuple(f"class_{i}" for i in range(n))
    tp = np.diag(conf)
    gt = conf.sum(axis=1)
    predicted = conf.sum(axis=0)
    union = gt + predicted - tp
    total = conf.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        class_acc = np.where(gt > 0, tp / gt, np.nan)
    freq = gt / total if total > 0 else np.zeros(n)
    valid = ~np.isnan(iou)
    return {
        "pixel_acc": float(tp.sum() / total) if total > 0 else float("nan"),
        "mean_class_acc": float(np.nanmean(class_acc)) if (gt > 0).any() else float("nan"),
        "miou": float(np.nanmean(iou)) if valid.any() else float("nan"),
        "fwiou": float((freq[valid] * iou[valid]).sum()) if total > 0 else float("nan"),
        "iou": {name: float(v) for name, v in zip(names, iou, strict=True)},
    }


def flat_metrics(result: dict, prefix: str = "val_") -> dict[str, float]:
    """Scores as a flat dict for MLflow / Ray Train reports (per-class IoU as ``iou_NAME``)."""
    out = {prefix + k: v for k, v in result.items() if k != "iou"}
    out.update({f"{prefix}iou_{name}": v for name, v in result["iou"].items()})
    return out
