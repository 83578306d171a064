"""The streaming dataset: decoding in Ray Data, augmentation invariants, torch batches."""

import numpy as np
import pytest
import torch

from pipelines.dataset import (
    Augment,
    DataError,
    build_dataset,
    decode_batch,
    read_shards,
    torch_batches,
)
from pipelines.frames import encode_jpeg, encode_png
from pipelines.labels import IGNORE_INDEX


def test_train_batches_are_normalized_tensors(local_shards, test_transform, ray_cluster):
    ds = build_dataset(local_shards, "train", augment=Augment())
    batches = list(torch_batches(ds, 4, test_transform, drop_last=True))
    assert len(batches) == 18 // 4
    b = batches[0]
    assert b["image"].shape == (4, 3, 64, 128) and b["image"].dtype == torch.float32
    assert b["label"].shape == (4, 64, 128) and b["label"].dtype == torch.int64
    assert float(b["image"].min()) > -3 and float(b["image"].max()) < 3  # normalized range
    values = set(torch.unique(torch.cat([x["label"] for x in batches])).tolist())
    assert values <= set(range(8)) | {IGNORE_INDEX}


def test_eval_dataset_is_exactly_the_shards(local_shards, ray_cluster):
    rows = build_dataset(local_shards, "val").take_all()
    raw = read_shards(local_shards, "val").take_all()
    assert len(rows) == len(raw) == 6
    from pipelines.frames import decode_png_mask

    assert sorted(r["label"].tobytes() for r in rows) == sorted(
        decode_png_mask(r["label"]).tobytes() for r in raw
    )


def test_missing_shards_are_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no Parquet shards"):
        read_shards(str(tmp_path), "train")


def test_augment_keeps_shape_and_label_values():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 64, 3), dtype=np.uint8)
    label = rng.integers(0, 8, (32, 64), dtype=np.uint8)
    aug = Augment(hflip=0.5, scale=(0.5, 1.5), colour=0.3)
    for seed in range(20):
        img, lbl = aug(image, label, np.random.default_rng(seed))
        assert img.shape == image.shape and lbl.shape == label.shape
        assert set(np.unique(lbl)) <= set(np.unique(label)) | {IGNORE_INDEX}


def test_flip_only_mirrors_both():
    image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    label = np.array([[0, 1, 2], [3, 4, 5]], dtype=np.uint8)
    img, lbl = Augment(hflip=1.0, scale=(1.0, 1.0), colour=0.0)(
        image, label, np.random.default_rng(0)
    )
    assert np.array_equal(lbl, label[:, ::-1]) and np.array_equal(img, image[:, ::-1])


def test_shrinking_pads_label_with_ignore_not_background():
    label = np.zeros((40, 40), dtype=np.uint8)
    image = np.zeros((40, 40, 3), dtype=np.uint8)
    _, lbl = Augment(hflip=0.0, scale=(0.5, 0.5), colour=0.0)(
        image, label, np.random.default_rng(0)
    )
    assert (lbl == IGNORE_INDEX).sum() == 40 * 40 - 20 * 20


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
