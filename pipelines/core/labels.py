"""The one label map: ApolloScape lane-marking label ids -> 8 training ids.

The grouping is the one used by the ApolloScape lane-segmentation competition's solutions.
Ids marked "ignore in eval" by ApolloScape are folded into background, as those solutions do.
Any id that is not in the table is *unknown*: it maps to :data:`IGNORE_INDEX` (so the loss and
the metrics skip it) and ingest counts and reports it; it is never folded into background.

Apollo label PNGs are palette images whose *indices* are the ids: read them with
``numpy.asarray(PIL.Image.open(path))`` and never ``.convert()`` them.
"""

from __future__ import annotations

import numpy as np

IGNORE_INDEX = 255
N_CLASSES = 8

CLASS_NAMES: tuple[str, ...] = (
    "background",
    "dividing",
    "guiding",
    "stopping",
    "parking",
    "zebra",
    "thru_turn",
    "reduction_other",
)

# Apollo ids of each training id.
APOLLO_IDS: dict[int, tuple[int, ...]] = {
    0: (0, 249, 255)
    # ApolloScape's "ignore in eval" ids.
    + (213, 206, 207, 211, 208, 216, 215, 232, 202, 231, 230, 228, 229, 233, 212, 223, 218, 219),
    1: (200, 204, 209),
    2: (201, 203),
    3: (217,),
    4: (210,),
    5: (214,),
    6: (220, 221, 222, 224, 225, 226),
    7: (205, 227, 250),
}

# Colours for previews and overlays (RGB), one per training id; ignore is drawn magenta.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0),
    (255, 255, 255),
    (255, 200, 0),
    (255, 0, 0),
    (0, 160, 255),
    (0, 255, 120),
    (160, 90, 255),
    (255, 120, 0),
)
IGNORE_COLOUR = (255, 0, 255)


def _build_lut() -> np.ndarray:
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for train_id, ids in APOLLO_IDS.items():
        for apollo_id in ids:
            if lut[apollo_id] != IGNORE_INDEX:
                raise AssertionError(f"Apollo id {apollo_id} is listed twice in APOLLO_IDS")
            lut[apollo_id] = train_id
    return lut


#: ``APOLLO_TO_TRAIN[apollo_id]`` is the training id (255 for unknown ids).
APOLLO_TO_TRAIN: np.ndarray = _build_lut()
KNOWN_APOLLO_IDS: frozenset[int] = frozenset(i for ids in APOLLO_IDS.values() for i in ids)

# Exporting predictions as Apollo ids: each training id becomes its first (canonical) Apollo id
# in the table above; 255 stays 255.
TRAIN_TO_APOLLO: np.ndarray = np.full(256, IGNORE_INDEX, dtype=np.uint8)
for _train_id, _ids in APOLLO_IDS.items():
    TRAIN_TO_APOLLO[_train_id] = _ids[0]


def to_train_ids(apollo: np.ndarray) -> tuple[np.ndarray, dict[int, int]]:
    """Map an Apollo id mask (uint8) to training ids.

    Returns the mapped mask and ``{unknown_id: pixel_count}`` for ids not in the table (those
    pixels become :data:`IGNORE_INDEX`).
    """
    if apollo.dtype != np.uint8:
        raise ValueError(f"label mask must be uint8 Apollo ids, got dtype {apollo.dtype}")
    counts = np.bincount(apollo.ravel(), minlength=256)
    unknown = {
        int(i): int(counts[i]) for i in np.flatnonzero(counts) if int(i) not in KNOWN_APOLLO_IDS
    }
    return APOLLO_TO_TRAIN[apollo], unknown


def to_apollo_ids(train: np.ndarray) -> np.ndarray:
    """Map a training-id mask back to (canonical) Apollo ids."""
    return TRAIN_TO_APOLLO[train]


def class_pixel_counts(train: np.ndarray) -> list[int]:
    """Pixel count of each training id (length :data:`N_CLASSES`); ignore pixels excluded."""
    return np.bincount(train.ravel(), minlength=256)[:N_CLASSES].astype(np.int64).tolist()


def colourize(train: np.ndarray) -> np.ndarray:
    """An RGB picture (H, W, 3) of a training-id mask."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[:] = IGNORE_COLOUR
    lut[:N_CLASSES] = PALETTE
    return lut[train]
