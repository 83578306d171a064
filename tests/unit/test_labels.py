"""The label map, checked id by id against the table of the issue, and on real Apollo files."""

import numpy as np
import pytest
from PIL import Image

from pipelines.core import labels
from pipelines.core.codecs import decode_label
from tests.support.helpers import SHARED_DATA

# Written out independently of pipelines/core/labels.py on purpose.
EXPECTED = {
    0: [
        0,
        249,
        255,
        213,
        206,
        207,
        211,
        208,
        216,
        215,
        232,
        202,
        231,
        230,
        228,
        229,
        233,
        212,
        223,
        218,
        219,
    ],
    1: [200, 204, 209],
    2: [201, 203],
    3: [217],
    4: [210],
    5: [214],
    6: [220, 221, 222, 224, 225, 226],
    7: [205, 227, 250],
}


def test_every_apollo_id():
    expected = {i: c for c, ids in EXPECTED.items() for i in ids}
    for apollo_id in range(256):
        got = int(labels.APOLLO_TO_TRAIN[apollo_id])
        assert got == expected.get(apollo_id, 255), f"Apollo id {apollo_id}"
    assert len(labels.CLASS_NAMES) == labels.N_CLASSES == 8
    assert len(labels.PALETTE) == 8 and len(set(labels.PALETTE)) == 8


def test_unknown_ids_are_ignored_and_counted():
    mask = np.array([[0, 200, 7], [7, 7, 201], [214, 254, 255]], dtype=np.uint8)
    train, unknown = labels.to_train_ids(mask)
    assert train.tolist() == [[0, 1, 255], [255, 255, 2], [5, 255, 0]]
    assert unknown == {7: 3, 254: 1}


def test_inverse_map_round_trips_train_ids():
    train = np.arange(8, dtype=np.uint8).reshape(2, 4)
    apollo = labels.to_apollo_ids(train)
    back, unknown = labels.to_train_ids(apollo)
    assert unknown == {}
    assert np.array_equal(back, train)
    assert labels.to_apollo_ids(np.array([255], dtype=np.uint8)).tolist() == [255]


def test_class_pixel_counts_exclude_ignore():
    train = np.array([0, 0, 1, 7, 255, 255], dtype=np.uint8)
    assert labels.class_pixel_counts(train) == [2, 1, 0, 0, 0, 0, 0, 1]


def test_rejects_non_uint8():
    with pytest.raises(ValueError, match="uint8"):
        labels.to_train_ids(np.zeros((2, 2), dtype=np.int32))


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data not present")
def test_real_apollo_label_files():
    files = sorted(SHARED_DATA.glob("*_bin.png"))
    assert len(files) == 3
    seen: set[int] = set()
    for f in files:
        img = Image.open(f)
        assert img.mode == "P" and img.size == (3384, 2710)
        ids = decode_label(f.read_bytes())
        seen |= set(np.unique(ids).tolist())
        # Id 255 (the ego hood) occurs only in rows 2310-2709, and covers most of them.
        rows = np.flatnonzero((ids == 255).any(axis=1))
        assert rows.min() == 2310 and rows.max() == 2709
        assert (ids[2310:] == 255).mean() > 0.5
        # Converting would corrupt the ids: dividing lines (200) read back as luminance.
        if (ids == 200).any():
            converted = np.asarray(img.convert("L"))
            assert not (converted[ids == 200] == 200).all()
        train, unknown = labels.to_train_ids(ids)
        assert unknown == {}
        assert (train[ids == 200] == 1).all() and (train[ids == 214] == 5).all()
    assert seen == {0, 200, 201, 204, 214, 217, 219, 220, 222, 224, 250, 255}
