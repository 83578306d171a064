"""The shards of a dataset version: their schema, how rows are placed in files, and the Ray
datasets that stream them into training, evaluation and labeling.

Decoding (JPEG/PNG) and augmentation run in Ray Data tasks, spread over the cluster's CPUs, never
in the training loop; batches cross the object store as uint8 (4x less than float32), and are
normalized on the training device (:mod:`pipelines.training.batches`).
"""

from __future__ import annotations

import hashlib
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import compat
from pipelines.core.errors import UserError
from pipelines.data.augment import Augment, decode_batch
from pipelines.data.versions import resolve_dataset
from pipelines.ops import faults
from pipelines.storage import Location

SPLITS = ("train", "val")
SHARD_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("image", pa.binary()),  # JPEG, model input size
        ("label", pa.binary()),  # PNG, training ids
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("source_image", pa.string()),
        ("source_label", pa.string()),
        ("drive", pa.string()),
    ]
)
SHARD_COLUMNS = tuple(SHARD_SCHEMA.names)


class DataError(UserError):
    """A dataset location that holds no usable shards."""


def shard_order_key(image_id: str, seed: int) -> str:
    """The position of a row in its split's shards: a seeded hash of its id, so consecutive
    rows come from different drives, and a re-run puts every row where it was."""
    return hashlib.sha256(f"{seed}/{image_id}".encode()).hexdigest()


def write_shard(group: pa.Table, dest: Location, seed: int) -> pa.Table:
    """Ray Data stage: write the rows of one shard file, in :func:`shard_order_key` order."""
    name = group["file"][0].as_py()
    keys = [shard_order_key(i, seed) for i in group["image_id"].to_pylist()]
    table = group.take(np.argsort(keys, kind="stable")).select(list(SHARD_COLUMNS))
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    dest.join(name).write_bytes(buf.getvalue().to_pybytes())  # one put, retried on outages
    if pause := faults.armed("ingest.pause_after_shard"):
        time.sleep(float(pause))
    return pa.table({"file": [name], "rows": [table.num_rows]})


def count_rows(loc: Location) -> int:
    """Rows in the Parquet files below ``loc``, from their footers."""
    total = 0
    for info in loc.list_files((".parquet",)):
        with loc.fs.open_input_file(info.path) as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total


def shard_files(data_uri: str, split: str) -> list[str]:
    """The shard files of one split of a dataset version. Jobs pass the version folder they
    resolved once at start; a dataset root resolves to its current version here."""
    loc = resolve_dataset(data_uri).location.join(split)
    return [i.path for i in loc.list_files((".parquet",))]


def read_shards(
    data_uri: str, split: str, columns: list[str] | None = None, *, shuffle_seed: int | None = None
):
    """The raw rows of one split (``train``/``val``) as a Ray dataset, or a clear error.

    ``shuffle_seed``: read the shard files in a random order, a new one on every pass over
    the data (Ray Data reseeds with the execution index), from this seed."""
    from ray.data import FileShuffleConfig

    loc = resolve_dataset(data_uri).location.join(split)
    files = [i.path for i in loc.list_files((".parquet",))]
    if not files:
        raise DataError(
            f"{loc.uri}: no Parquet shards (expected *.parquet written by `python -m jobs.ingest`)"
        )
    shuffle = None if shuffle_seed is None else FileShuffleConfig(seed=shuffle_seed)
    # One read task (one block) per shard file: ingest sizes the files (~256 MB), and Ray's own
    # estimate merges small files into one block, which streaming_split then hands whole to a
    # single worker.
    return compat.read_parquet_v1(
        files, filesystem=loc.fs, columns=columns, shuffle=shuffle, override_num_blocks=len(files)
    )


def build_dataset(
    data_uri: str, split: str, augment: Augment | None = None, *, shuffle_seed: int | None = None
):
    """Decoded (and, for training, augmented) frames of one split, streamed by Ray Data;
    with ``shuffle_seed``, the shard files in a new random order on every pass."""
    columns = ["image_id", "image", "label"]
    return read_shards(data_uri, split, columns, shuffle_seed=shuffle_seed).map_batches(
        decode_batch, batch_size=16, batch_format="numpy", fn_kwargs={"augment": augment}
    )
