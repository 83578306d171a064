"""The shards of a dataset version: their schema, how rows are placed in files, and the Ray
datasets that stream them into training, evaluation and labeling.

Decoding (JPEG/PNG) runs in Ray Data tasks, spread over the cluster's CPUs, in units of about
:data:`DECODE_BLOCK_BYTES` of encoded frames rather than whole shards; batches cross the
object store as uint8 (4x less than float32), and are augmented and normalized on the training
device (:mod:`pipelines.training.batches`, :mod:`pipelines.training.augment`).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import compat
from pipelines.core.errors import UserError
from pipelines.data.decode import decode_batch
from pipelines.data.versions import resolve_dataset
from pipelines.runtime import faults
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

#: Encoded bytes of frames per decode task. A ~256 MB shard is ~2,000 frames at 1024x384:
#: decoded by one task, the whole split would be decoded by as many CPUs as it has shards, and
#: a small dataset by one or two. 8 MB (~60 frames, ~0.25 s of one CPU) keeps every CPU busy
#: while the per-task overhead (~ms) stays small.
DECODE_BLOCK_BYTES = 8 << 20


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
    faults.point("ingest.shard_written", path=dest.join(name).uri)
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
    data_uri: str,
    split: str,
    columns: list[str] | None = None,
    *,
    shuffle_seed: int | None = None,
    block_bytes: int = DECODE_BLOCK_BYTES,
):
    """The raw rows of one split (``train``/``val``) as a Ray dataset, or a clear error.

    ``shuffle_seed``: read the shard files in a random order, a new one on every pass over
    the data (Ray Data reseeds with the execution index), from this seed."""
    from ray.data import FileShuffleConfig

    loc = resolve_dataset(data_uri).location.join(split)
    infos = loc.list_files((".parquet",))
    files = [i.path for i in infos]
    if not files:
        raise DataError(
            f"{loc.uri}: no Parquet shards (expected *.parquet written by `python -m jobs.ingest`)"
        )
    shuffle = None if shuffle_seed is None else FileShuffleConfig(seed=shuffle_seed)
    # One read task per shard file (Ray's own estimate merges small files into one block, which
    # streaming_split then hands whole to a single worker), its output split into blocks of
    # about `block_bytes`: asking Ray for more blocks than files splits each read's output
    # (Ray 2.60: SplitBlocks), and the decode's tasks take blocks, so they run in parallel.
    blocks_per_file = max(1, -(-max(i.size or 0 for i in infos) // max(1, block_bytes)))
    return compat.read_parquet_v1(
        files, filesystem=loc.fs, columns=columns, shuffle=shuffle,
        override_num_blocks=len(files) * blocks_per_file,
    )  # fmt: skip


def build_dataset(
    data_uri: str,
    split: str,
    *,
    shuffle_seed: int | None = None,
    block_bytes: int = DECODE_BLOCK_BYTES,
):
    """Decoded frames of one split, streamed by Ray Data; with ``shuffle_seed``, the shard
    files in a new random order on every pass."""
    columns = ["image_id", "image", "label"]
    ds = read_shards(data_uri, split, columns, shuffle_seed=shuffle_seed, block_bytes=block_bytes)
    return ds.map_batches(decode_batch, batch_size=16, batch_format="numpy")
