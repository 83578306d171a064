"""The labeling output's bookkeeping scan (``already_labeled``, ``committed_files``,
``read_output``, ``read_review``) on a local folder and on the moto S3 server: fast, no Ray.

Outputs are written as the job leaves them: ``labeled_date=YYYY-MM-DD/*.parquet`` in
``OUTPUT_SCHEMA``, next to what must never be read as output (review lists under ``_review/``
and, written by earlier releases, ``review/``; a ``_staging/`` run, a ``_lease.json``, hidden
files, a stray non-Parquet file).
"""

from __future__ import annotations

import io
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.labeling.output import already_labeled, committed_files, read_output, read_review
from pipelines.labeling.schema import LEGACY_REVIEW, OUTPUT_SCHEMA, REVIEW, REVIEW_SCHEMA
from pipelines.storage import Location, resolve

MODEL = "lanes"
DAY1, DAY2 = "2026-11-25", "2026-11-26"


def rows(sources: list[str], version: str, model: str = MODEL, status: str = "ok") -> pa.Table:
    n = len(sources)
    ok = status == "ok"
    return pa.table(
        {
            "image_id": [s.rsplit("/", 1)[-1] for s in sources],
            "source": sources,
            "height": [4] * n,
            "width": [6] * n,
            "mask": [b"\x89PNG fake" if ok else None] * n,
            "apollo_mask": [None] * n,
            "class_pixels": [[24, 0, 0, 0, 0, 0, 0, 0] if ok else None] * n,
            "confidence": [0.8 if ok else None] * n,
            "pixel_confidence": [0.9 if ok else None] * n,
            "uncertain_fraction": [0.1 if ok else None] * n,
            "novelty": [0.05 if ok else None] * n,
            "model_name": [model] * n,
            "model_version": [version] * n,
            "status": [status] * n,
            "error": [None if ok else "could not read frame"] * n,
            "labeled_at": [datetime(2026, 11, 26, 3, tzinfo=timezone.utc)] * n,
        },
        schema=OUTPUT_SCHEMA,
    )


def review_rows(sources: list[str]) -> pa.Table:
    """A review list's rows (its own columns), as write_review leaves them."""
    return rows(sources, "1").select(REVIEW_SCHEMA.names).cast(REVIEW_SCHEMA)


def put(output: Location, rel: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    output.join(rel).write_bytes(buf.getvalue())


def src(*names: str) -> list[str]:
    return [f"s3://drive/frames/{n}.jpg" for n in names]


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path) -> Location:
    """An output location that does not exist yet. The local one sits below folders whose
    names start with ``.`` and ``_``: the ignore rules apply below the output, not above."""
    if request.param == "s3":
        return resolve(request.getfixturevalue("s3_prefix") + "/labels")
    return resolve(tmp_path / ".cache" / "_jobs" / "labels")


@pytest.fixture
def two_versions(output) -> Location:
    """Rows of model versions 1 and 2 on two dates (a file mixing both too), error rows, and
    another model's version 1."""
    put(output, f"labeled_date={DAY1}/a_000000.parquet", rows(src("a1", "a2"), "1"))
    # Written before the score columns existed: read with them as nulls.
    legacy = rows(src("bad1"), "1", status="error").drop_columns(
        ["confidence", "pixel_confidence", "uncertain_fraction", "novelty"]
    )
    put(output, f"labeled_date={DAY1}/b_000000.parquet", legacy)
    # --review-below lists: under the output, but no output rows. One where the job writes
    # them, one where earlier releases did (still excluded for one release).
    put(output, f"{REVIEW}/labeled_date={DAY2}/run-x.parquet", review_rows(src("zz")))
    put(output, f"{LEGACY_REVIEW}/labeled_date={DAY1}/run-w.parquet", review_rows(src("yy")))
    put(output, f"labeled_date={DAY2}/c_000000.parquet", rows(src("a1", "a2", "c3"), "2"))
    put(output, f"labeled_date={DAY2}/d_000000.parquet",
        pa.concat_tables([rows(src("d4"), "1"), rows(src("d5"), "2")]))  # fmt: skip
    put(output, f"labeled_date={DAY2}/e_000000.parquet", rows(src("e6"), "1", model="other"))
    return output


def test_already_labeled_returns_only_the_asked_versions_sources(two_versions):
    assert already_labeled(two_versions, MODEL, "1") == set(src("a1", "a2", "bad1", "d4"))
    assert already_labeled(two_versions, MODEL, "2") == set(src("a1", "a2", "c3", "d5"))
    assert already_labeled(two_versions, "other", "1") == set(src("e6"))
    assert already_labeled(two_versions, MODEL, "3") == set()


def test_committed_files_and_read_output_see_every_committed_row(two_versions):
    names = [p.rsplit("/", 1)[-1] for p in committed_files(two_versions)]
    assert names == [f"{k}_000000.parquet" for k in "abcde"]
    table = read_output(two_versions.uri)
    scores = {(r["source"], r["model_version"]): r["confidence"] for r in table.to_pylist()}
    assert (
        scores[(src("a1")[0], "1")] == pytest.approx(0.8) and scores[(src("bad1")[0], "1")] is None
    )
    got = sorted(
        (r["source"].split("/")[-1], r["model_name"], r["model_version"], r["labeled_date"])
        for r in table.select(["source", "model_name", "model_version", "labeled_date"]).to_pylist()
    )
    assert got == sorted(
        [("a1.jpg", MODEL, "1", DAY1), ("a2.jpg", MODEL, "1", DAY1), ("bad1.jpg", MODEL, "1", DAY1)]
        + [(f"{n}.jpg", MODEL, "2", DAY2) for n in ("a1", "a2", "c3", "d5")]
        + [("d4.jpg", MODEL, "1", DAY2), ("e6.jpg", "other", "1", DAY2)]
    )


def test_read_review_reads_both_review_locations_and_no_output_row(two_versions):
    got = sorted(
        (r["image_id"], r["labeled_date"]) for r in read_review(two_versions.uri).to_pylist()
    )
    assert got == [("yy.jpg", DAY1), ("zz.jpg", DAY2)]


def test_staging_lease_hidden_and_stray_files_are_never_read_as_output(two_versions):
    out = two_versions
    # A run that was never committed, one whose commit was cut off, and their markers.
    run = "_staging/20261126T030000-deadbeef"
    put(out, f"{run}/labeled_date={DAY2}/x_000000.parquet", rows(src("staged1"), "1"))
    put(out, f"_staging/20261126T040000-cafef00d/labeled_date={DAY2}/y_000000.parquet",
        rows(src("staged2"), "1"))  # fmt: skip
    out.join(run, "_WRITTEN").write_text('{"ok": 1, "error": 0}')
    out.join("_lease.json").write_text('{"holder": "scheduler", "until": "2026-11-26T04:00Z"}')
    put(out, f"labeled_date={DAY2}/_tmp_000000.parquet", rows(src("underscore"), "1"))
    put(out, f"labeled_date={DAY2}/.hidden_000000.parquet", rows(src("hidden"), "1"))
    put(out, f".trash/labeled_date={DAY2}/z_000000.parquet", rows(src("trashed"), "1"))
    out.join(f"labeled_date={DAY2}/notes.txt").write_text("not Parquet")

    assert already_labeled(out, MODEL, "1") == set(src("a1", "a2", "bad1", "d4"))
    assert [p.rsplit("/", 1)[-1] for p in committed_files(out)] == [
        f"{k}_000000.parquet" for k in "abcde"
    ]
    assert read_output(out.uri).num_rows == 9


def test_missing_or_empty_output_is_an_empty_set(output):
    assert already_labeled(output, MODEL, "1") == set()
    assert committed_files(output) == []
    assert read_output(output.uri).num_rows == 0
    assert read_review(output.uri).num_rows == 0

    # Only what is not output yet: a lease and a run still in staging.
    output.join("_lease.json").write_text("{}")
    put(output, f"_staging/run/labeled_date={DAY1}/a_000000.parquet", rows(src("a1"), "1"))
    assert already_labeled(output, MODEL, "1") == set()
    assert committed_files(output) == []
    assert read_output(output.uri).num_rows == 0
