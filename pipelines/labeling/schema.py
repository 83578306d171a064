"""What labeling writes: the output schema (documented in docs/label.md), the per-frame scores and
the review list's columns.

``OUTPUT/labeled_date=YYYY-MM-DD/*.parquet`` holds one row per input frame and model version;
``OUTPUT/_review/labeled_date=.../RUN.parquet`` the frames a run found unsure or novel (the
leading underscore keeps Arrow's dataset discovery from taking them for output rows).
"""

from __future__ import annotations

import pyarrow as pa

from pipelines.core.metrics import SCORE_NAMES

#: The output schema (also documented in docs/label.md).
OUTPUT_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),  # input path relative to --input, without extension
        ("source", pa.string()),  # full URI of the input frame
        ("height", pa.int32()),  # size of the frame (and of the masks)
        ("width", pa.int32()),
        ("mask", pa.binary()),  # PNG, training ids, frame size; null on error
        ("apollo_mask", pa.binary()),  # PNG, Apollo ids (inverse map); null unless asked for
        ("class_pixels", pa.list_(pa.int64())),  # pixels per training class; null on error
        # How sure the model is (softmax's largest probability p per pixel, at model input
        # size); null on error: mean p over pixels predicted as lanes (null: none predicted),
        # mean p over all pixels, share of pixels with p under --uncertain-below.
        ("confidence", pa.float32()),
        ("pixel_confidence", pa.float32()),
        ("uncertain_fraction", pa.float32()),
        # How unlike the training data the frame is (median over one in three of the model's
        # BatchNorm layers of the squared standardized distance of its feature means); null
        # without BatchNorm.
        ("novelty", pa.float32()),
        ("model_name", pa.string()),
        ("model_version", pa.string()),
        ("status", pa.string()),  # "ok" or "error"
        ("error", pa.string()),  # the reason; null when ok
        ("labeled_at", pa.timestamp("us", tz="UTC")),
    ]
)

#: ``OUTPUT/_review/labeled_date=.../RUN.parquet``: frames for people to review. Under ``_``,
#: which Arrow's dataset discovery (pandas, pyarrow, Ray Data) skips: ``read_parquet(OUTPUT)``
#: reads output rows only.
REVIEW = "_review"
#: Where review lists were written before (``OUTPUT/review/``), which those readers do take
#: for output. Kept for one release: still excluded from the committed output and still read
#: by :func:`pipelines.labeling.output.read_review`; remove it in the release after.
LEGACY_REVIEW = "review"
REVIEW_SCHEMA = pa.schema(
    [OUTPUT_SCHEMA.field(c) for c in ("image_id", "source", *SCORE_NAMES, "model_name",
                                      "model_version")]
)  # fmt: skip
#: Default of ``--review-novelty-above``: frames like the training data score under 0.1 in
#: tests/unit/test_confidence, noise, black or blown-out frames hundreds to thousands; 10 leaves
#: room both ways.
NOVELTY_ABOVE = 10.0
