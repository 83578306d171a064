"""Dataset versions without Ray: the pointer, pinned folders, listing and pruning, on a local
folder and on the real S3 server."""

import json
from datetime import datetime, timedelta, timezone

import pytest

from pipelines.data.versions import (
    MANIFEST_NAME,
    POINTER_NAME,
    DatasetError,
    commit_version,
    list_versions,
    new_version_name,
    prune_versions,
    resolve_dataset,
    version_location,
)
from pipelines.storage import resolve

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=timezone.utc)


def make_version(dest, started: datetime, complete: bool = True) -> str:
    """A version folder with one shard (and a manifest when complete)."""
    name = new_version_name(started)
    loc = version_location(dest, name)
    loc.join("train", "train-00000.parquet").write_bytes(b"rows")
    if complete:
        loc.join(MANIFEST_NAME).write_text(json.dumps({"version": name, "counts": {}}))
    return name


@pytest.fixture(params=["local", "s3"])
def dest(request, tmp_path):
    if request.param == "local":
        return resolve(tmp_path / "data")
    return resolve(request.getfixturevalue("s3_prefix"))


def test_pointer_decides_what_readers_get(dest):
    old = make_version(dest, NOW - timedelta(hours=2))
    new = make_version(dest, NOW - timedelta(hours=1))
    with pytest.raises(DatasetError, match=r"no manifest\.json \(and no current\.json\)"):
        resolve_dataset(dest.uri)  # complete versions, none committed: nothing to read
    commit_version(dest, old, "sha")
    pinned = resolve_dataset(dest.uri)
    assert (pinned.name, pinned.root) == (old, dest.uri)
    assert pinned.uri == version_location(dest, old).uri
    commit_version(dest, new, "sha")
    assert resolve_dataset(dest.uri).name == new
    # The handle a job resolved earlier still names the old folder, and a version folder
    # given directly resolves to itself.
    assert resolve_dataset(pinned.uri).uri == pinned.uri
    assert resolve_dataset(pinned.uri).manifest_sha256 == pinned.manifest_sha256


def test_bad_pointers_are_named(dest):
    dest.join(POINTER_NAME).write_text("{not json")
    with pytest.raises(DatasetError, match=r"current\.json: not a dataset pointer"):
        resolve_dataset(dest.uri)
    dest.join(POINTER_NAME).write_text(json.dumps({"version": "../../etc"}))
    with pytest.raises(DatasetError, match="bad version name"):
        resolve_dataset(dest.uri)
    name = new_version_name(NOW)
    commit_version(dest, name, "sha")
    with pytest.raises(DatasetError, match=f"names version {name}, but .* is missing"):
        resolve_dataset(dest.uri)


def test_prune_keeps_newest_current_and_running(dest):
    crashed = make_version(dest, NOW - timedelta(days=3), complete=False)
    a = make_version(dest, NOW - timedelta(days=2))
    b = make_version(dest, NOW - timedelta(days=1))
    c = make_version(dest, NOW - timedelta(hours=3))
    running = make_version(dest, NOW - timedelta(minutes=5), complete=False)
    commit_version(dest, a, "sha")  # rolled back to an old one on purpose: never removed
    listed = list_versions(dest)
    assert [v.name for v in listed] == [crashed, a, b, c, running]
    assert [v.complete for v in listed] == [False, True, True, True, False]
    assert [v.current for v in listed] == [False, True, False, False, False]

    removed = prune_versions(dest, keep=1, now=NOW)
    assert removed == [crashed, b]
    assert [v.name for v in list_versions(dest)] == [a, c, running]
    assert resolve_dataset(dest.uri).name == a
    with pytest.raises(DatasetError, match="keep-versions must be >= 1"):
        prune_versions(dest, keep=0)


def test_local_commit_leaves_no_temporary_files(tmp_path):
    dest = resolve(tmp_path / "data")
    name = make_version(dest, NOW)
    commit_version(dest, name, "abc")
    commit_version(dest, name, "abc")
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [POINTER_NAME, "versions"]
    assert json.loads((tmp_path / "data" / POINTER_NAME).read_text())["version"] == name


def test_versions_started_in_one_second_keep_start_order(dest):
    """Ingests run back to back (a scheduled re-ingest, a test) start within one second: the
    names must still sort in start order, or pruning removes the newest and keeps an older one."""
    started = [NOW + timedelta(microseconds=100_000 * i) for i in range(6)]
    names = [make_version(dest, t) for t in started]
    assert [v.name for v in list_versions(dest)] == names
    commit_version(dest, names[-1], "sha")
    assert prune_versions(dest, keep=2, now=NOW) == names[:4]
    assert [v.name for v in list_versions(dest)] == names[4:]
