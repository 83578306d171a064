"""The local stack's S3 server (moto, objects in memory) keeps its data across a stop and a
start: stop.sh saves every object to STATE/s3 (infra/local/s3_state.py), start.sh restores
them. Against real moto servers on 127.0.0.1, one per "start"."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import boto3
import pytest

from tests.support.helpers import ROOT, free_port, moto_server, stack_env, stale_http_server

S3_STATE = ROOT / "infra/local/s3_state.py"
START, STOP = ROOT / "infra/local/start.sh", ROOT / "infra/local/stop.sh"

# Keys a path-per-key snapshot would get wrong: a file beside a folder of the same name, a
# folder marker, a parent reference, spaces and non-ASCII; the same bytes under two keys.
OBJECTS = {
    ("lanes", "a"): b"file beside a folder",
    ("lanes", "a/b"): b"inside the folder",
    ("lanes", "dir/"): b"",
    ("lanes", "x/../y"): b"not a parent",
    ("lanes", "drive 1/frame é.png"): b"\x89PNG" + bytes(range(256)) * 4,
    ("other", "copy-of-a/b"): b"inside the folder",
}
BIG = ("lanes", "shards/v1/part-0.parquet")  # over boto3's multipart threshold (8 MiB)


def fill(endpoint: str, big: bytes) -> None:
    client = boto3.client("s3", endpoint_url=endpoint)
    for bucket in {b for b, _ in OBJECTS}:
        client.create_bucket(Bucket=bucket)
    for (bucket, key), body in OBJECTS.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)
    with tempfile.NamedTemporaryFile() as f:
        f.write(big)
        f.flush()
        client.upload_file(f.name, *BIG)  # multipart: its ETag is not the content's MD5


def contents(endpoint: str) -> dict[tuple[str, str], bytes]:
    client = boto3.client("s3", endpoint_url=endpoint)
    found = {}
    for b in client.list_buckets()["Buckets"]:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=b["Name"]):
            for obj in page.get("Contents", []):
                body = client.get_object(Bucket=b["Name"], Key=obj["Key"])["Body"].read()
                found[(b["Name"], obj["Key"])] = body
    return found


def s3_state(command: str, state: Path, endpoint: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(S3_STATE), command, str(state), endpoint],
                          capture_output=True, text=True, timeout=120)  # fmt: skip


@pytest.fixture(scope="module")
def big() -> bytes:
    return os.urandom(9 << 20)


@pytest.fixture
def saved(tmp_path, big) -> Path:
    """A state folder holding the snapshot of a server filled with OBJECTS and BIG."""
    with moto_server() as (_, endpoint):
        fill(endpoint, big)
        result = s3_state("save", tmp_path, endpoint)
        assert result.returncode == 0, result.stderr
    return tmp_path


def test_a_restored_server_holds_every_saved_object_byte_for_byte(saved, big):
    with moto_server() as (_, endpoint):
        result = s3_state("restore", saved, endpoint)
        assert result.returncode == 0, result.stderr
        assert contents(endpoint) == {**OBJECTS, BIG: big}


def test_a_save_downloads_only_what_changed_and_drops_what_was_deleted(saved, big):
    with moto_server() as (_, endpoint):
        assert s3_state("restore", saved, endpoint).returncode == 0
        client = boto3.client("s3", endpoint_url=endpoint)
        client.put_object(Bucket="lanes", Key="a", Body=b"rewritten")
        client.delete_object(Bucket="lanes", Key="x/../y")
        result = s3_state("save", saved, endpoint)
    assert result.returncode == 0, result.stderr
    # The rewritten object alone is downloaded, the multipart one included in "unchanged".
    kept = {k: v for k, v in OBJECTS.items() if k != ("lanes", "x/../y")}
    size = len(big) + len(b"rewritten") + sum(len(v) for k, v in kept.items() if k[1] != "a")
    assert f"s3: saved 6 objects ({size / 1e6:.1f} MB) in 2 buckets" in result.stdout
    assert "(1 downloaded, 5 unchanged)" in result.stdout
    index = json.loads((saved / "s3/index.json").read_text())
    named = {e["sha256"] for entries in index["buckets"].values() for e in entries}
    assert {p.name for p in (saved / "s3/objects").iterdir()} == named  # old "a", "x/../y" gone


def test_a_damaged_snapshot_is_refused_in_one_line_and_nothing_restored(saved):
    index = json.loads((saved / "s3/index.json").read_text())
    [entry] = [e for e in index["buckets"]["lanes"] if e["key"] == "a/b"]
    (saved / "s3/objects" / entry["sha256"]).write_bytes(b"bit rot")
    with moto_server() as (_, endpoint):
        result = s3_state("restore", saved, endpoint)
        assert result.returncode == 1
        # "a/b" and "copy-of-a/b" are one stored object: both are damaged.
        assert result.stderr.startswith(f"error: {saved / 's3'}: 2 of 7 objects missing or damaged")
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert contents(endpoint) == {}  # not half-restored


def test_a_failed_save_keeps_the_previous_snapshot(saved, big):
    before = (saved / "s3/index.json").read_text()
    result = s3_state("save", saved, f"http://127.0.0.1:{free_port()}")  # nothing listens
    assert result.returncode == 1
    assert "error: s3 save against http://127.0.0.1:" in result.stderr
    assert (saved / "s3/index.json").read_text() == before
    with moto_server() as (_, endpoint):
        assert s3_state("restore", saved, endpoint).returncode == 0
        assert contents(endpoint) == {**OBJECTS, BIG: big}


# -- stop.sh and start.sh --------------------------------------------------------------------
def record_as_stack_s3(state: Path, proc: subprocess.Popen) -> None:
    """``proc`` recorded as the stack's S3 server, as start.sh does."""
    subprocess.run([sys.executable, str(ROOT / "infra/local/proc.py"), "record", str(state),
                    "s3", str(proc.pid)], check=True)  # fmt: skip


def test_stop_saves_the_servers_objects_before_it_stops_it(tmp_path, big):
    with moto_server() as (proc, endpoint):
        fill(endpoint, big)
        record_as_stack_s3(tmp_path, proc)
        (tmp_path / "s3.endpoint").write_text(endpoint + "\n")  # start.sh restored it
        out = subprocess.run([str(STOP)], env=stack_env(tmp_path), capture_output=True,
                             text=True, timeout=120)  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
        assert proc.wait(timeout=10) is not None
    assert "s3: saved 7 objects" in out.stdout and f"stopped s3 (pid {proc.pid})" in out.stdout
    assert not (tmp_path / "s3.endpoint").exists()
    with moto_server() as (_, endpoint):
        assert s3_state("restore", tmp_path, endpoint).returncode == 0
        assert contents(endpoint) == {**OBJECTS, BIG: big}


def test_stop_never_saves_a_server_that_start_did_not_restore(saved):
    """A start that failed before its restore finished leaves no s3.endpoint: the snapshot is
    not replaced by that (empty) server's."""
    before = (saved / "s3/index.json").read_text()
    with moto_server() as (proc, _):
        record_as_stack_s3(saved, proc)
        out = subprocess.run([str(STOP)], env=stack_env(saved), capture_output=True,
                             text=True, timeout=120)  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
    assert "s3: saved" not in out.stdout
    assert (saved / "s3/index.json").read_text() == before


def test_start_restores_the_snapshot_into_its_s3_server(saved):
    """start.sh --s3 restores before anything else starts. Here its MLflow port is taken, so
    the start fails right after, and its clean-up (stop.sh) saves the server it restored: the
    snapshot still names every object only if they were really in that server."""
    keys = sorted((b, e["key"]) for b, entries in json.loads(
        (saved / "s3/index.json").read_text())["buckets"].items() for e in entries)  # fmt: skip
    # A short path: start.sh's state folder also holds Ray's sockets in a full start.
    state = Path(tempfile.mkdtemp(prefix="ls-", dir="/tmp"))
    shutil.copytree(saved / "s3", state / "s3")
    with stale_http_server() as stale_port:
        env = stack_env(state, MLFLOW_PORT=stale_port, S3_PORT=free_port(),
                        RAY_GCS_PORT=free_port(), RAY_DASHBOARD_PORT=free_port())  # fmt: skip
        try:
            start = subprocess.run([str(START), "--s3", "--sqlite"], env=env,
                                   capture_output=True, text=True, timeout=300)  # fmt: skip
            assert start.returncode == 1, start.stdout + start.stderr
            assert "s3: restored 7 objects (9.4 MB) in 2 buckets" in start.stdout, start.stdout
            index = json.loads((state / "s3/index.json").read_text())
            after = sorted((b, e["key"]) for b, entries in index["buckets"].items()
                           for e in entries)  # fmt: skip
            assert after == keys
        finally:
            subprocess.run([str(STOP)], env=env, capture_output=True, timeout=120)
            shutil.rmtree(state, ignore_errors=True)
