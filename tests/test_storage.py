"""The one storage resolver: local paths, file:// and s3:// (against a real S3 server)."""

import os

import pyarrow.fs as pafs
import pytest

from pipelines.storage import StorageError, resolve


def test_local_paths_are_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loc = resolve("data/shards")
    assert loc.scheme == "file"
    assert loc.path == str(tmp_path / "data" / "shards")
    assert resolve(f"file://{tmp_path}/x").path == str(tmp_path / "x")
    assert isinstance(loc.fs, pafs.LocalFileSystem)


def test_s3_uri_parsing():
    loc = resolve("s3://bucket/some/prefix/")
    assert (loc.scheme, loc.path, loc.uri) == (
        "s3",
        "bucket/some/prefix",
        "s3://bucket/some/prefix",
    )
    assert loc.join("train", "a.parquet").uri == "s3://bucket/some/prefix/train/a.parquet"
    assert loc.parent().uri == "s3://bucket/some"


@pytest.mark.parametrize(
    "uri, message",
    [
        ("s3://AKIAXXXX:secret@bucket/x", "credentials in S3 URIs"),
        ("s3:///no-bucket", "needs a bucket"),
        ("gs://bucket/x", "unsupported storage scheme 'gs'"),
        ("  ", "empty storage URI"),
    ],
)
def test_bad_uris_are_named(uri, message):
    with pytest.raises(StorageError, match=message):
        resolve(uri)


def test_secret_never_in_error_message():
    with pytest.raises(StorageError) as e:
        resolve("s3://AKIAXXXX:supersecret@bucket/x")
    assert "supersecret" not in str(e.value)


def test_local_round_trip_list_move_delete(tmp_path):
    root = resolve(tmp_path / "store")
    root.join("a", "one.txt").write_text("1")
    root.join("b", "two.TXT").write_text("22")
    root.join("c.bin").write_bytes(b"\x00")
    listed = [root.relative(i.path) for i in root.list_files((".txt",))]
    assert listed == ["a/one.txt", "b/two.TXT"]
    root.join("a", "one.txt").move_to(root.join("moved", "one.txt"))
    assert root.join("moved", "one.txt").read_text() == "1"
    assert not root.join("a", "one.txt").exists()
    root.join("moved").delete()
    assert not root.join("moved").exists()
    with pytest.raises(StorageError, match="no such file"):
        root.join("missing").read_bytes()
    assert resolve(tmp_path / "nope").list_files() == []


def test_s3_round_trip_pyarrow_and_s3fs_agree(s3_prefix):
    """Both filesystems honour AWS_ENDPOINT_URL_S3: what one writes the other reads."""
    loc = resolve(s3_prefix)
    assert loc.endpoint == os.environ["AWS_ENDPOINT_URL_S3"]
    loc.join("x", "via-pyarrow.bin").write_bytes(b"hello")
    assert loc.fsspec.cat(loc.join("x", "via-pyarrow.bin").path) == b"hello"
    loc.fsspec.pipe(loc.join("y", "via-s3fs.bin").path, b"world")
    assert loc.join("y", "via-s3fs.bin").read_bytes() == b"world"
    assert [loc.relative(i.path) for i in loc.list_files()] == [
        "x/via-pyarrow.bin",
        "y/via-s3fs.bin",
    ]
    loc.join("x", "via-pyarrow.bin").move_to(loc.join("z", "moved.bin"))
    assert loc.join("z", "moved.bin").read_bytes() == b"hello"
    assert not loc.join("x", "via-pyarrow.bin").exists()
    loc.delete()
    assert loc.list_files() == []


def test_s3_settings_captured_for_workers(s3_prefix, monkeypatch):
    """A Location carries the resolving process's endpoint, so a worker with another
    environment still reaches the same server."""
    loc = resolve(s3_prefix)
    loc.join("k").write_bytes(b"v")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3")
    assert loc.join("k").read_bytes() == b"v"
    assert loc.at_uri(f"{s3_prefix}/k").read_bytes() == b"v"
