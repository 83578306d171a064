"""What a labeling run is asked to label: raw frames under a prefix, or the rows of an ingested
dataset (its current version, resolved once, or a pinned version folder).
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from pipelines.core.errors import UserError
from pipelines.core.frames import FrameTransform
from pipelines.data.versions import MANIFEST_NAME, POINTER_NAME, resolve_dataset
from pipelines.storage import resolve

RAW_SUFFIXES = (".jpg", ".jpeg", ".png")


class LabelingError(UserError):
    pass


# -- inputs -------------------------------------------------------------------------------------
@dataclass
class Inputs:
    kind: str  # "raw" or "shards"
    rows: list[dict]  # image_id, source (and shard file/row for shards)
    ignored: list[str] = field(default_factory=list)  # files under --input that are not frames
    transform: FrameTransform | None = None  # shards: the transform they were ingested with
    uri: str = ""  # shards: the dataset version folder (resolved once); raw: the prefix


def list_inputs(input_uri: str) -> Inputs:
    """Raw frames under a prefix, or the rows of an ingested dataset (its current version,
    resolved once, or a pinned version folder)."""
    root = resolve(input_uri)
    if root.join(MANIFEST_NAME).exists() or root.join(POINTER_NAME).exists():
        version = resolve_dataset(input_uri)
        manifest, root = version.manifest, version.location
        rows = []
        for info in root.list_files((".parquet",)):
            with root.fs.open_input_file(info.path) as f:
                table = pq.read_table(f, columns=["image_id", "source_image"])
            rows += [
                {"image_id": i, "source": s, "shard": info.path}
                for i, s in zip(
                    table["image_id"].to_pylist(), table["source_image"].to_pylist(), strict=True
                )
            ]
        transform = FrameTransform.from_dict(manifest["transform"])
        return Inputs("shards", rows, transform=transform, uri=version.uri)
    if not root.is_dir():
        raise LabelingError(
            f"--input {root.uri}: no such folder (expected frames or ingested shards)"
        )
    rows, ignored = [], []
    for info in root.list_files():
        uri = root.at_path(info.path).uri
        if info.path.lower().endswith(RAW_SUFFIXES):
            rows.append(
                {
                    "image_id": posixpath.splitext(root.relative(info.path))[0],
                    "source": uri,
                    "bytes": info.size if info.size is not None else -1,  # from the listing
                }
            )
        else:
            ignored.append(uri)
    return Inputs("raw", rows, ignored, uri=root.uri)
