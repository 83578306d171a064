"""The streaming dataset: decoding in Ray Data, in units smaller than a shard, torch batches."""

import os

import numpy as np
import pytest
import torch

from pipelines.core.codecs import encode_jpeg, encode_png
from pipelines.core.labels import IGNORE_INDEX
from pipelines.data.decode import decode_batch
from pipelines.data.shards import DataError, build_dataset, read_shards, shard_files
from pipelines.training.batches import torch_batches
from pipelines.training.engine import epoch_seed


def test_train_batches_are_normalized_tensors(local_shards, test_transform, ray_cluster):
    ds = build_dataset(local_shards, "train")
    batches = list(torch_batches(ds, 4, test_transform, drop_last=True))
    assert len(batches) == 18 // 4
    b = batches[0]
    assert b["image"].shape == (4, 3, 64, 128) and b["image"].dtype == torch.float32
    assert b["label"].shape == (4, 64, 128) and b["label"].dtype == torch.int64
    assert float(b["image"].min()) > -3 and float(b["image"].max()) < 3  # normalized range
    values = set(torch.unique(torch.cat([x["label"] for x in batches])).tolist())
    assert values <= set(range(8)) | {IGNORE_INDEX}


def _drive(image_id: str) -> str:
    return image_id.split("/")[1]  # road02/Record00N/...


def test_each_epoch_reads_a_new_order_and_batches_mix_drives(
    local_shards, test_transform, ray_cluster
):
    """As the training loop reads: file order reseeded every pass, batches drawn from a
    seeded shuffle buffer. Two epochs differ; batches mix drives (the ingested rows are
    not in drive order either)."""
    ds = build_dataset(local_shards, "train", shuffle_seed=0)
    orders, drives_per_batch = [], []
    for epoch in range(2):
        batches = list(
            torch_batches(ds, 4, test_transform, drop_last=True, shuffle_buffer=16,
                          shuffle_seed=epoch_seed(0, epoch))
        )  # fmt: skip
        orders.append([i for b in batches for i in b["image_id"]])
        drives_per_batch += [len({_drive(i) for i in b["image_id"]}) for b in batches]
        assert len(set(orders[-1])) == len(orders[-1]) == 16  # 18 frames, 4 full batches
    assert orders[0] != orders[1]
    drives = {_drive(i) for i in orders[0] + orders[1]}
    assert len(drives) >= 3
    # Four frames drawn at random from 3 drives of 6 frames span 2.5 drives on average;
    # frames in drive order would span 1.5.
    assert np.mean(drives_per_batch) >= 2.0, drives_per_batch


def test_ingested_rows_are_not_in_drive_order(local_shards, ray_cluster):
    ids = [r["image_id"] for r in read_shards(local_shards, "train", ["image_id"]).take_all()]
    runs = sum(_drive(a) != _drive(b) for a, b in zip(ids, ids[1:], strict=False))
    assert runs >= len(ids) // 2, ids  # sorted ids would change drive only twice


def test_eval_dataset_is_exactly_the_shards(local_shards, ray_cluster):
    rows = build_dataset(local_shards, "val").take_all()
    raw = read_shards(local_shards, "val").take_all()
    assert len(rows) == len(raw) == 6
    from pipelines.core.codecs import decode_png_mask

    assert sorted(r["label"].tobytes() for r in rows) == sorted(
        decode_png_mask(r["label"]).tobytes() for r in raw
    )


def test_missing_shards_are_a_clear_error(tmp_path):
    from pipelines.data.versions import DatasetError

    with pytest.raises(DatasetError, match="no manifest.json"):
        read_shards(str(tmp_path), "train")  # not a dataset at all
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(DataError, match="train: no Parquet shards"):
        read_shards(str(tmp_path), "train")  # a dataset without that split


def test_decode_batch_without_ray():
    image = np.full((8, 16, 3), 90, dtype=np.uint8)
    label = np.eye(8, 16, dtype=np.uint8)
    out = decode_batch(
        {
            "image": np.array([encode_jpeg(image)], dtype=object),
            "label": np.array([encode_png(label)], dtype=object),
        }
    )
    assert out["image"].shape == (1, 8, 16, 3) and np.array_equal(out["label"][0], label)


def test_shards_are_decoded_in_blocks_smaller_than_a_file(local_shards, ray_cluster):
    """A shard file's rows are split into blocks of about ``block_bytes`` of encoded frames and
    decoded by an operator of its own (its tasks take blocks, not whole ~256 MB files), every
    row once; a file within ``block_bytes`` is one block."""
    files = shard_files(local_shards, "train")
    whole = build_dataset(local_shards, "train").materialize()
    assert whole.num_blocks() == len(files)
    biggest = max(os.path.getsize(f) for f in files)
    read = read_shards(local_shards, "train", block_bytes=biggest // 3).materialize()
    assert read.num_blocks() >= 3 * len(files)
    split = build_dataset(local_shards, "train", block_bytes=biggest // 3).materialize()
    stats = split.stats()
    assert "ReadParquet->SplitBlocks" in stats and "Operator 2 MapBatches(decode_batch)" in stats
    assert sorted(r["image_id"] for r in split.take_all()) == sorted(
        r["image_id"] for r in whole.take_all()
    )
