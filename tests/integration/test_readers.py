"""The documented readers of labeling's output read exactly its rows: one per labeled frame,
none from the review list, none twice; on a local folder and on an S3-compatible endpoint (the
moto server on 127.0.0.1, reached through ``AWS_ENDPOINT_URL`` as on the local stack).

One real labeling run (``jobs.label`` on synthetic frames, ``--review-below 1`` so that every
frame is in the review list too: a reader that takes it for output reads each frame twice),
shared by the module; its output is copied, as it is, to the S3 server for the S3 readers.

Each reader is a snippet, a module-level string run here with ``OUTPUT`` bound (a folder, or
an ``s3://`` URI) that leaves the rows in ``frames``; the manual quotes these strings verbatim.
"""

from __future__ import annotations

import contextlib
import io
import re
import secrets
from dataclasses import dataclass

import numpy as np
import pytest

from jobs import label as label_job
from pipelines.core.codecs import encode_jpeg
from pipelines.data.synthetic import render_frame
from pipelines.labeling.output import read_review
from pipelines.labeling.schema import REVIEW_SCHEMA
from pipelines.storage import resolve
from tests.support.helpers import FRAME_H, FRAME_W, ROOT

MODEL = "lanes-readers-test"
SUMMARY = re.compile(r"label: found (\d+) frames, labeled (\d+), errors (\d+), skipped (\d+)")

# -- the snippets: on a local folder ----------------------------------------------------------
PANDAS = """\
import pandas as pd

frames = pd.read_parquet(OUTPUT)
"""

PYARROW = """\
import pyarrow.dataset as ds

frames = ds.dataset(OUTPUT, format="parquet", partitioning="hive").to_table()
"""

# Not OUTPUT/**/*.parquet: DuckDB's globs skip no folder, so that one reads _review/ too.
DUCKDB = """\
import duckdb

frames = duckdb.sql(
    f"SELECT * FROM read_parquet('{OUTPUT}/labeled_date=*/*.parquet', hive_partitioning=true)"
).df()
"""

# Not pl.scan_parquet(OUTPUT): polars skips no folder either (and refuses a folder holding a
# run's _lease.json).
POLARS = """\
import polars as pl

frames = pl.scan_parquet(f"{OUTPUT}/labeled_date=*/*.parquet", hive_partitioning=True).collect()
"""

RAY = """\
import ray

frames = ray.data.read_parquet(OUTPUT)
"""

REVIEW_LIST = """\
import pyarrow.dataset as ds

frames = ds.dataset(f"{OUTPUT}/_review", format="parquet", partitioning="hive").to_table()
"""

# -- the snippets: on an S3-compatible endpoint (AWS_ENDPOINT_URL, e.g. http://127.0.0.1:9000) -
S3_PANDAS = """\
import os

import pandas as pd

frames = pd.read_parquet(OUTPUT, storage_options={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
"""

# pyarrow's own S3 filesystem ignores AWS_ENDPOINT_URL: it is given the endpoint.
S3_PYARROW = """\
import os

import pyarrow.dataset as ds
import pyarrow.fs as pafs

s3 = pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"])
frames = ds.dataset(
    OUTPUT.removeprefix("s3://"), filesystem=s3, format="parquet", partitioning="hive"
).to_table()
"""

# Through s3fs: DuckDB's own S3 support (the httpfs extension) is a download.
S3_DUCKDB = """\
import os

import duckdb
import s3fs

con = duckdb.connect()
con.register_filesystem(s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"]))
frames = con.sql(
    f"SELECT * FROM read_parquet('{OUTPUT}/labeled_date=*/*.parquet', hive_partitioning=true)"
).df()
"""

S3_POLARS = """\
import os

import polars as pl

frames = pl.scan_parquet(
    f"{OUTPUT}/labeled_date=*/*.parquet",
    hive_partitioning=True,
    storage_options={"aws_endpoint_url": os.environ["AWS_ENDPOINT_URL"]},
).collect()
"""

S3_RAY = """\
import os

import pyarrow.fs as pafs
import ray

s3 = pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"])
frames = ray.data.read_parquet(OUTPUT.removeprefix("s3://"), filesystem=s3)
"""

S3_REVIEW_LIST = """\
import os

import pyarrow.dataset as ds
import pyarrow.fs as pafs

s3 = pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"])
frames = ds.dataset(
    f"{OUTPUT.removeprefix('s3://')}/_review",
    filesystem=s3,
    format="parquet",
    partitioning="hive",
).to_table()
"""


def run_snippet(snippet: str, output: str):
    """What ``snippet`` leaves in ``frames``, run with ``OUTPUT`` bound to ``output``."""
    names = {"OUTPUT": output}
    exec(snippet, names)  # noqa: S102 - the tests' own snippets
    return names["frames"]


# -- one labeling run ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Labeled:
    output: str  # the output folder
    ids: list[str]  # the labeled frames' image ids, sorted
    review_ids: list[str]  # the review list's, sorted
    log: str  # what the job printed


def write_frames(folder) -> list[str]:
    """Synthetic frames in two drives; their image ids (paths without extension), sorted."""
    rng = np.random.default_rng(3)
    ids = [f"drive{d}/frame_{i}" for d in (1, 2) for i in range(3)]
    for image_id in ids:
        frame = render_frame(rng, FRAME_W, FRAME_H)[0]
        (folder / image_id).parent.mkdir(parents=True, exist_ok=True)
        (folder / f"{image_id}.jpg").write_bytes(encode_jpeg(frame))
    return sorted(ids)


@pytest.fixture(scope="module")
def labeled(tmp_path_factory, ray_cluster, test_transform) -> Labeled:
    """The real job's output for 6 frames (2 commits, 3 files, the review list), with a model
    registered as jobs.train does in a store of the module's own (``register_version`` is one
    test's)."""
    import mlflow

    from pipelines.core import labels
    from pipelines.inference.model_dir import ModelSpec, save_model_dir
    from pipelines.registry.pyfunc import register_model_dir
    from pipelines.runtime import tracking
    from tests.support.models import TEST_MODEL, make_model

    root = tmp_path_factory.mktemp("readers")
    store = f"sqlite:///{root / 'mlflow.db'}"
    before = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", store)
        mlflow.set_tracking_uri(store)
        mlflow.set_registry_uri(store)
        try:
            spec = ModelSpec(TEST_MODEL, 8, test_transform, labels.CLASS_NAMES)
            model_dir = save_model_dir(root / "model", make_model(), spec)
            experiment = tracking.ensure_experiment("registered-by-tests", store)
            with mlflow.start_run(experiment_id=experiment, run_name="register-readers"):
                version = register_model_dir(model_dir, MODEL, {"made_by": "tests"}).version
            ids = write_frames(root / "incoming")
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                status = label_job.main(
                    ["--input", str(root / "incoming"), "--output", str(root / "labeled"),
                     "--model", f"models:/{MODEL}/{version}", "--chunk-frames", "3",
                     "--rows-per-file", "2", "--review-below", "1"]
                )  # fmt: skip
        finally:
            mlflow.set_tracking_uri(before[0])
            mlflow.set_registry_uri(before[1])
    text = out.getvalue()
    m = SUMMARY.search(text)
    assert status == 0 and m and tuple(map(int, m.groups())) == (6, 6, 0, 0), text
    review_ids = sorted(read_review(str(root / "labeled"))["image_id"].to_pylist())
    assert review_ids == ids  # every frame is in the review list too
    return Labeled(str(root / "labeled"), ids, review_ids, text)


@pytest.fixture(scope="module")
def s3_output(labeled, s3_server) -> str:
    """The same output, every file of it (review list and all), on the S3 server."""
    local = resolve(labeled.output)
    dest = resolve(f"s3://lanes/readers-{secrets.token_hex(4)}/labeled")
    for info in local.list_files():
        dest.join(local.relative(info.path)).write_bytes(local.at_path(info.path).read_bytes())
    return dest.uri


@pytest.fixture
def endpoint(s3_server, monkeypatch) -> str:
    """``AWS_ENDPOINT_URL``, the variable the S3 snippets read, naming the S3 server."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    return s3_server


# -- local folder -------------------------------------------------------------------------------
def test_the_review_list_is_written_under_an_underscore_folder(labeled):
    [line] = [x for x in labeled.log.splitlines() if x.startswith("review: ")]
    where = re.escape(resolve(labeled.output).uri)
    assert re.search(rf"-> {where}/_review/labeled_date=[\d-]+/[^/]+\.parquet$", line), line


def image_ids(frames) -> list[str]:
    """The sorted ``image_id`` column of whatever a reader returned (pandas, pyarrow or polars
    frame, a Ray dataset)."""
    if hasattr(frames, "select_columns") and hasattr(frames, "take_all"):  # Ray Data
        return sorted(r["image_id"] for r in frames.select_columns(["image_id"]).take_all())
    column = frames["image_id"]
    for to_list in ("to_pylist", "to_list"):  # pyarrow, polars
        if hasattr(column, to_list):
            return sorted(getattr(column, to_list)())
    return sorted(column)  # pandas


READERS = {"pandas": (PANDAS, S3_PANDAS), "pyarrow": (PYARROW, S3_PYARROW),
           "duckdb": (DUCKDB, S3_DUCKDB), "polars": (POLARS, S3_POLARS), "ray": (RAY, S3_RAY)}  # fmt: skip


@pytest.mark.parametrize("reader", READERS)
def test_a_reader_reads_one_row_per_labeled_frame(reader, labeled):
    assert image_ids(run_snippet(READERS[reader][0], labeled.output)) == labeled.ids


def test_the_review_list_reads_as_its_own_rows(labeled):
    frames = run_snippet(REVIEW_LIST, labeled.output)
    assert sorted(frames.column_names) == sorted([*REVIEW_SCHEMA.names, "labeled_date"])
    assert image_ids(frames) == labeled.review_ids


# -- S3-compatible endpoint ---------------------------------------------------------------------
@pytest.mark.parametrize("reader", READERS)
def test_a_reader_on_s3_reads_one_row_per_labeled_frame(reader, labeled, s3_output, endpoint):
    assert image_ids(run_snippet(READERS[reader][1], s3_output)) == labeled.ids


def test_the_review_list_on_s3_reads_as_its_own_rows(labeled, s3_output, endpoint):
    frames = run_snippet(S3_REVIEW_LIST, s3_output)
    assert image_ids(frames) == labeled.review_ids


def test_the_docs_quote_the_tested_snippets():
    """docs/reading-output.md shows users exactly the snippets these tests run."""
    page = (ROOT / "docs" / "reading-output.md").read_text()
    snippets = {f"{reader} {where}": code for reader, pair in READERS.items()
                for where, code in zip(("local", "s3"), pair, strict=True)}  # fmt: skip
    snippets.update({"review list local": REVIEW_LIST, "review list s3": S3_REVIEW_LIST})
    assert len(snippets) == 12
    missing = [k for k, v in snippets.items() if f"```python\n{v}```" not in page]
    assert not missing, missing
