"""The streaming dataset: decoding in Ray Data, augmentation invariants, torch batches."""

import numpy as np
import pytest
import torch

from pipelines.core.codecs import encode_jpeg, encode_png
from pipelines.core.labels import IGNORE_INDEX
from pipelines.data.augment import Augment, decode_batch
from pipelines.data.shards import DataError, build_dataset, read_shards
from pipelines.training.batches import torch_batches
from pipelines.training.loop import epoch_seed


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


def test_augment_keeps_image_and_label_aligned():
    """After flip, scale and crop/pad, every pixel's colour still belongs to its label: the
    image is painted from the label (one colour per class, blocks several pixels wide), so a
    shift, a flip of one but not the other, or a different crop window shows as a mismatch."""
    rng = np.random.default_rng(0)
    palette = rng.integers(0, 256, (8, 3)).astype(np.uint8)
    blocks = rng.integers(0, 8, (6, 10))
    label = np.kron(blocks, np.ones((16, 16), dtype=np.int64)).astype(np.uint8)  # 96 x 160
    label[:, :3] = 7  # an asymmetric edge: a flip must move it in both
    image = palette[label]
    aug = Augment(hflip=0.5, scale=(0.6, 1.6), colour=0.0)
    flipped = scaled = 0
    for seed in range(40):
        img, lbl = aug(image, label, np.random.default_rng(seed))
        # Pixels inside a uniform 5x5 label neighbourhood: away from class boundaries (and
        # from the crop window's edge, beyond which the boundary is unknown), where bilinear
        # (image) and nearest (label) resampling legitimately differ.
        pad = np.pad(lbl.astype(np.int64), 2, constant_values=-1)
        windows = np.lib.stride_tricks.sliding_window_view(pad, (5, 5))
        inner = (windows == lbl[..., None, None]).all(axis=(-1, -2))
        painted = inner & (lbl != IGNORE_INDEX)
        assert painted.mean() > 0.1
        diff = np.abs(img[painted].astype(int) - palette[lbl[painted]].astype(int)).max()
        assert diff <= 2, (seed, diff)
        # Padding: ignore in the label, black in the image.
        assert (img[lbl == IGNORE_INDEX] == 0).all()
        flipped += bool(lbl[:, -3:].mean() == 7 and (lbl[:, :3] != 7).any())
        scaled += bool((lbl == IGNORE_INDEX).any())
    assert flipped and scaled  # the seeds exercised both


def test_crop_and_pad_take_the_same_window_of_image_and_label():
    """Exact, pixel for pixel: the window (or padding) of the image is the label's."""
    from pipelines.data.augment import _crop_or_pad

    rng = np.random.default_rng(1)
    palette = rng.integers(1, 256, (8, 3)).astype(np.uint8)  # no class is black
    for ih, iw, h, w in [(40, 70, 32, 48), (20, 30, 32, 48), (40, 30, 32, 48)]:
        label = rng.integers(0, 8, (ih, iw)).astype(np.uint8)  # every pixel its own
        for seed in range(10):
            img, lbl = _crop_or_pad(palette[label], label, h, w, np.random.default_rng(seed))
            assert img.shape == (h, w, 3) and lbl.shape == (h, w)
            valid = lbl != IGNORE_INDEX
            assert np.array_equal(img[valid], palette[lbl[valid]])
            assert (img[~valid] == 0).all()
            assert valid.sum() == min(h, ih) * min(w, iw)
