"""Reading labeling's output: the committed files (as Arrow's dataset discovery finds them),
the sources already labeled by a model version, every committed row, a preview picture; and
writing and reading the review lists.
"""

from __future__ import annotations

import io
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.labeling.schema import (
    LEGACY_REVIEW,
    NOVELTY_ABOVE,
    OUTPUT_SCHEMA,
    REVIEW,
    REVIEW_SCHEMA,
)
from pipelines.storage import Location, resolve


# -- output bookkeeping -------------------------------------------------------------------------
def committed_files(output: Location) -> list[str]:
    """The committed ``.parquet`` files, sorted, as Arrow's dataset discovery finds them: any
    part of the path below ``output`` that starts with ``_`` or ``.`` is skipped (``_staging/``,
    a ``_lease.json``, ``_WRITTEN``, hidden files); other files than ``.parquet`` too, so that a
    stray file never breaks a scan. A missing output has none."""
    import pyarrow.dataset as pads

    try:
        # An explicit schema: discovery lists, and reads no file to infer one.
        found = pads.dataset(
            output.path, schema=OUTPUT_SCHEMA, filesystem=output.fs, format="parquet",
            partitioning="hive", ignore_prefixes=["_", "."],
        )  # fmt: skip
    except FileNotFoundError:
        return []
    return sorted(p for p in found.files if _is_output_file(output, p))


def _is_output_file(output: Location, path: str) -> bool:
    """A committed output file: ``.parquet``, not a review list. ``OUTPUT/_review/`` is
    skipped by discovery already (its underscore); ``OUTPUT/review/``, where review lists were
    written before, is excluded here for one release (see ``LEGACY_REVIEW``)."""
    return path.lower().endswith(".parquet") and not any(
        path.startswith(output.join(folder).path.rstrip("/") + "/")
        for folder in (REVIEW, LEGACY_REVIEW)
    )


def already_labeled(output: Location, model_name: str, model_version: str) -> set[str]:
    """Sources with a row (ok or error) for this model version in the committed output.

    One scan of the ``source`` column, filtered on the version, over the files that
    :func:`committed_files` lists (same discovery, same ignore rules): Arrow reads the files in
    parallel and skips row groups whose statistics exclude the version.
    """
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    schema = pa.schema([OUTPUT_SCHEMA.field(c) for c in ("source", "model_name", "model_version")])
    try:
        found = pads.dataset(
            output.path, schema=schema, filesystem=output.fs, format="parquet",
            partitioning="hive", ignore_prefixes=["_", "."],
        )  # fmt: skip
    except FileNotFoundError:  # no output yet
        return set()
    # Discovery's fragments keep each file's size from the listing (no extra request per file
    # on S3, as a list of paths would need).
    fragments = [f for f in found.get_fragments() if _is_output_file(output, f.path)]
    dataset = pads.FileSystemDataset(fragments, schema, found.format, found.filesystem)
    wanted = (pc.field("model_name") == model_name) & (pc.field("model_version") == model_version)
    return set(dataset.to_table(columns=["source"], filter=wanted)["source"].to_pylist())


def read_output(output_uri: str) -> pa.Table:
    """All committed rows (with the ``labeled_date`` partition column)."""
    output = resolve(output_uri)
    files = committed_files(output)
    if not files:
        return OUTPUT_SCHEMA.empty_table()
    import pyarrow.dataset as pads

    # An explicit schema: files written before a column existed (confidence, ...) read as
    # nulls in it instead of failing the read.
    date = pa.schema([("labeled_date", pa.string())])
    return pads.dataset(
        files, schema=pa.unify_schemas([OUTPUT_SCHEMA, date]), filesystem=output.fs,
        format="parquet", partitioning=pads.partitioning(date, flavor="hive"),
        partition_base_dir=output.path,
    ).to_table()  # fmt: skip


def staged_scores(staging: Location) -> pa.Table:
    """The columns :func:`write_review` needs, from a chunk's staging folder (before it is
    committed: the rows of this run only, without reading any mask)."""
    columns = [*REVIEW_SCHEMA.names, "status", "labeled_at"]
    tables = []
    for info in staging.list_files((".parquet",)):
        with staging.fs.open_input_file(info.path) as f:
            tables.append(pq.read_table(f, columns=columns))
    schema = pa.schema([OUTPUT_SCHEMA.field(c) for c in columns])
    return pa.concat_tables([t.cast(schema) for t in tables]) if tables else schema.empty_table()


def write_review(
    output: Location, run: str, rows: pa.Table, below: float, novelty_above: float = NOVELTY_ABOVE
) -> tuple[str, int]:
    """The ok rows of ``rows`` (this run's) that people should look at: the model is unsure
    (``confidence`` of its lanes under ``below``, or, where no lane was predicted,
    ``pixel_confidence`` under it), or the frame is unlike the training data (``novelty``
    above ``novelty_above``: there the softmax is no guide, it is often sure and wrong).
    Written as one small Parquet file ``OUTPUT/_review/labeled_date=DATE/RUN.parquet``, which
    readers of the output skip (the underscore), so a labeling team pulls exactly those
    frames. Returns (its URI, rows)."""
    import pyarrow.compute as pc

    ok = rows.filter(pc.equal(rows["status"], "ok"))
    unsure = pc.less(pc.coalesce(ok["confidence"], ok["pixel_confidence"]), below)
    novel = pc.fill_null(pc.greater(ok["novelty"], novelty_above), False)
    picked = ok.filter(pc.or_(unsure, novel)).select(REVIEW_SCHEMA.names).cast(REVIEW_SCHEMA)
    # The date of the run's first chunk, as its rows' partition.
    first = rows["labeled_at"][0].as_py() if len(rows) else datetime.now().astimezone()
    date = first.strftime("%Y-%m-%d")
    dest = output.join(REVIEW, f"labeled_date={date}", f"{run}.parquet")
    buf = io.BytesIO()
    pq.write_table(picked, buf)
    dest.write_bytes(buf.getvalue())
    return dest.uri, picked.num_rows


def read_review(output_uri: str) -> pa.Table:
    """Every review list's rows, with the ``labeled_date`` partition column: those under
    ``OUTPUT/_review/`` and, for one release, those written before under ``OUTPUT/review/``
    (``LEGACY_REVIEW``)."""
    import pyarrow.dataset as pads

    output = resolve(output_uri)
    date = pa.schema([("labeled_date", pa.string())])
    schema = pa.unify_schemas([REVIEW_SCHEMA, date])
    tables = []
    for folder in (LEGACY_REVIEW, REVIEW):
        base = output.join(folder)
        files = [i.path for i in base.list_files((".parquet",))]
        if files:
            tables.append(pads.dataset(
                files, schema=schema, filesystem=output.fs, format="parquet",
                partitioning=pads.partitioning(date, flavor="hive"), partition_base_dir=base.path,
            ).to_table())  # fmt: skip
    return pa.concat_tables(tables) if tables else schema.empty_table()


def preview(output_uri: str, dest: Path, n: int = 4) -> Path:
    """A PNG of the first ``n`` labeled frames (by image id) with their predicted masks over
    them, tiled: what the demo shows."""
    import numpy as np
    from PIL import Image

    from pipelines.core.codecs import decode_png_mask, decode_rgb
    from pipelines.core.pictures import grid, overlay

    rows = read_output(output_uri).to_pylist()
    rows = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: r["image_id"])[:n]
    pictures = []
    for r in rows:
        frame = decode_rgb(resolve(r["source"]).read_bytes())
        pictures.append(overlay(frame, decode_png_mask(r["mask"])))
    Image.fromarray(
        grid(pictures, columns=2, width=640) if pictures else np.zeros((8, 8, 3), np.uint8)
    ).save(dest)
    return dest
