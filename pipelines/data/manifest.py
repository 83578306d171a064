"""The manifest of a dataset version: what was found, what went where, and why every record
that is not in a shard is not (``found == valid + rejected + unreadable``).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from pipelines.core import labels
from pipelines.core.frames import FrameTransform
from pipelines.data.shards import SPLITS


@dataclass
class IngestResult:
    manifest: dict
    dest: str  # the dataset root
    version: str
    version_uri: str
    committed: bool  # current.json now names this version
    pruned: list[str] = field(default_factory=list)

    @property
    def valid(self) -> int:
        return self.manifest["counts"]["valid"]

    @property
    def unreadable(self) -> int:
        return self.manifest["counts"]["unreadable"]

    def summary(self) -> str:
        c = self.manifest["counts"]
        unknown = self.manifest["unknown_ids"]
        return (
            f"ingest: found {c['found']} records, wrote {c['train']} train + {c['val']} val "
            f"frames, rejected {c['rejected']}, unreadable {c['unreadable']}"
            + (f", unknown label ids {sorted(int(k) for k in unknown)}" if unknown else "")
            + f" -> {self.version_uri}"
            + (" (committed: the current version)" if self.committed else " (NOT committed)")
        )


def build_manifest(
    *,
    source: str,
    transform: FrameTransform,
    meta: pd.DataFrame,
    splits: dict[str, str],
    ignored_files: list[str],
    val_fraction: float,
    seed: int,
    rows_per_file: int,
    seconds: float,
) -> dict:
    ok = meta["reason"] == ""
    unreadable = meta.loc[~ok & meta["unreadable"]].sort_values("image_id")
    rejected = meta.loc[~ok & ~meta["unreadable"]].sort_values("image_id")
    unknown: Counter[int] = Counter()
    unknown_frames: Counter[int] = Counter()
    for text in meta.loc[ok, "unknown_ids"]:
        for k, v in json.loads(text).items():
            unknown[int(k)] += v
            unknown_frames[int(k)] += 1
    class_pixels = {}
    for split in SPLITS:
        rows = meta.loc[ok & (meta["split"] == split), "class_pixels"]
        total = (
            np.sum(np.stack(rows.to_list()), axis=0) if len(rows) else np.zeros(labels.N_CLASSES)
        )
        class_pixels[split] = {
            name: int(v) for name, v in zip(labels.CLASS_NAMES, total, strict=True)
        }
    train_total = sum(class_pixels["train"].values())
    counts = {
        "found": int(len(meta)),
        "valid": int(ok.sum()),
        "rejected": len(rejected),
        "unreadable": len(unreadable),
        "train": int((ok & (meta["split"] == "train")).sum()),
        "val": int((ok & (meta["split"] == "val")).sum()),
        "ignored_files": len(ignored_files),
    }
    return {
        "format": "lane-shards/1",
        "source": source,
        "transform": transform.to_dict(),
        "n_class": labels.N_CLASSES,
        "class_names": list(labels.CLASS_NAMES),
        "val_fraction": val_fraction,
        "seed": seed,
        "rows_per_file": rows_per_file,
        "counts": counts,
        "drives": {s: sorted(d for d, v in splits.items() if v == s) for s in SPLITS},
        "class_pixels": class_pixels,
        "class_frequency": {
            name: (v / train_total if train_total else 0.0)
            for name, v in class_pixels["train"].items()
        },
        "ignore_pixels": int(meta.loc[ok, "ignore_pixels"].sum()),
        "unknown_ids": {
            str(k): {"pixels": v, "frames": unknown_frames[k]} for k, v in sorted(unknown.items())
        },
        "rejected": _records(rejected),
        # Storage failed after retries: not bad data; a re-run reads them again.
        "unreadable": _records(unreadable),
        "ignored_files": ignored_files,
        "seconds": round(seconds, 2),
    }


def _records(frame: pd.DataFrame) -> list[dict]:
    return [
        {"image_id": r.image_id, "image": r.source_image, "label": r.source_label,
         "reason": r.reason}
        for r in frame.itertuples()
    ]  # fmt: skip
