"""The one storage resolver: local paths, file:// and s3:// (against a real S3 server)."""

import errno
import logging
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pyarrow.fs as pafs
import pytest

from pipelines.storage import (
    DEFAULT_RETRY,
    ObjectTooLarge,
    Retry,
    StorageAccessError,
    StorageError,
    TransientStorageError,
    conditional,
    is_transient,
    resolve,
)
from pipelines.storage.errors import is_access_refused
from tests.support.faults import outage_server
from tests.support.helpers import ROOT


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


# -- transient vs permanent failures, retries ----------------------------------------------------
OUTAGE_S = 3.0
QUICK = Retry(attempts=2, base_delay=0.2)


@pytest.mark.parametrize("key", ["a#1.jpg", "b?x=1.jpg", "c%20d.jpg", "e%2Ff#?.jpg"])
def test_listed_s3_keys_are_read_as_the_keys_they_are(s3_prefix, key):
    """A key listed from a bucket, turned into a URI (what jobs hand to Ray workers) and
    resolved again, is the same key: '#', '?' and '%' are not a fragment, a query or escapes."""
    loc = resolve(s3_prefix)
    loc.join("frames", key).write_bytes(key.encode())
    [info] = loc.list_files()
    again = resolve(loc.at_path(info.path).uri)
    assert again.path == f"{loc.path}/frames/{key}"
    assert again.read_bytes() == key.encode()
    assert resolve(f"{s3_prefix}/frames/{key}").read_bytes() == key.encode()


def test_retry_delays_double_up_to_the_cap():
    assert DEFAULT_RETRY.delays() == (0.5, 1.0, 2.0, 4.0, 8.0)
    assert sum(DEFAULT_RETRY.delays()) > 10  # outlasts a ~10 s S3 outage
    assert Retry(attempts=4, base_delay=1, max_delay=3).delays() == (1, 2, 3)
    assert Retry(attempts=1).delays() == ()
    with pytest.raises(ValueError, match="at least 1"):
        Retry(attempts=0)


# pyarrow 25 (AWS C++ SDK) messages, recorded against a stopped port, a server that never
# answers, one that closes without answering and one answering each status; the prefix names the
# operation ("When reading information for key 'k' in bucket 'lanes': ").
PYARROW = {
    "NETWORK_CONNECTION during HeadObject operation: curlCode: 7, Could not connect to server": True,
    "NETWORK_CONNECTION during HeadObject operation: curlCode: 28, Timeout was reached": True,
    "NETWORK_CONNECTION during HeadObject operation: curlCode: 52, Server returned nothing": True,
    "UNKNOWN (HTTP status 503) during HeadObject operation: No response body.": True,
    "UNKNOWN (HTTP status 500) during HeadObject operation: No response body.": True,
    "UNKNOWN (HTTP status 429) during HeadObject operation: No response body.": True,
    "UNKNOWN (HTTP status 400) during HeadObject operation: No response body.": True,
    "SLOW_DOWN during GetObject operation: Please reduce your request rate.": True,
    "INTERNAL_FAILURE during GetObject operation: ": True,
    "ACCESS_DENIED during HeadObject operation: No response body.": False,
    "UNKNOWN (HTTP status 403) during HeadObject operation: No response body.": False,
    "UNKNOWN (HTTP status 501) during HeadObject operation: No response body.": False,
}
# S3 error codes as s3fs raises them (its own translation of botocore's ClientError).
S3FS = {
    ("SlowDown", 503): True,
    ("ServiceUnavailable", 503): True,
    ("InternalError", 500): True,
    ("TooManyRequests", 429): True,
    ("RequestTimeout", 400): True,
    ("NeverSeenBefore", 400): True,  # unknown from S3: better retried on the next run
    ("AccessDenied", 403): False,
    ("NoSuchKey", 404): False,
    ("NotImplemented", 501): False,
}


@pytest.mark.parametrize("message, transient", PYARROW.items(), ids=list(PYARROW))
def test_is_transient_pyarrow_errors(message, transient):
    prefix = "When reading information for key 'k' in bucket 'lanes': AWS Error "
    assert is_transient(OSError(prefix + message)) is transient


@pytest.mark.parametrize("code, transient", S3FS.items(), ids=[c for c, _ in S3FS])
def test_is_transient_s3fs_errors(code, transient):
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    name, status = code
    response = {
        "Error": {"Code": name, "Message": name},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    assert is_transient(translate_boto_error(ClientError(response, "GetObject"))) is transient


def test_is_transient_other_errors():
    import botocore.exceptions as b

    endpoint = "http://127.0.0.1:1/lanes/k"
    assert is_transient(b.EndpointConnectionError(endpoint_url=endpoint))
    assert is_transient(b.ConnectionClosedError(endpoint_url=endpoint))
    assert not is_transient(b.NoCredentialsError())
    assert is_transient(ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"))
    assert is_transient(TimeoutError("timed out"))
    assert not is_transient(FileNotFoundError(errno.ENOENT, "Path does not exist 'lanes/k'"))
    # Local disk: unknown errors are permanent.
    assert not is_transient(OSError(errno.EIO, "Input/output error"))
    assert not is_transient(OSError("Cannot open for reading: path '/x' is a directory"))
    assert not is_transient(StorageError("s3://b/k: no such file"))
    assert is_transient(TransientStorageError("s3://b/k: read failed"))


def test_read_and_write_ride_out_a_real_outage(caplog):
    caplog.set_level(logging.INFO, logger="pipelines.storage.retry")
    with outage_server(outage_after_gets=1, outage_seconds=OUTAGE_S) as srv:
        key = srv.location("s3://lanes/ride-out/frame.bin")
        other = srv.location("s3://lanes/ride-out/other.bin")
        key.write_bytes(b"frame")
        assert key.read_bytes() == b"frame"  # the 1st object GET: the outage starts after it
        seen = srv.wait_outage_start()
        # A write and a read, both started during the outage, ride it out together.
        with ThreadPoolExecutor(1) as pool:
            written = pool.submit(other.write_bytes, b"other")
            assert key.read_bytes() == b"frame"
            read_took = time.monotonic() - seen
            written.result()
            write_took = time.monotonic() - seen
        # The listener closed just before the start line was seen, and reopens S later.
        assert min(read_took, write_took) >= OUTAGE_S - 0.5
        assert srv.wait_outage_end()
        assert other.read_bytes() == b"other"
        for what in ("read", "write"):
            assert any(f"{what} failed (attempt 1), retrying" in r.message for r in caplog.records)


def test_outage_longer_than_the_retries_raises_transient_error():
    with outage_server(outage_seconds=60) as srv:
        key = srv.location("s3://lanes/long-outage/frame.bin")
        key.write_bytes(b"frame")
        srv.trigger()
        srv.wait_outage_start()
        start = time.monotonic()
        with pytest.raises(TransientStorageError) as e:
            key.read_bytes(retry=QUICK)
        assert time.monotonic() - start >= sum(QUICK.delays())
        message = str(e.value)
        assert message.startswith(f"{key.uri}: read failed 2 attempts")
        assert "NETWORK_CONNECTION" in message and "curlCode: 7" in message
        assert os.environ["AWS_SECRET_ACCESS_KEY"] not in message
        assert is_transient(e.value) and is_transient(e.value.__cause__)
        # The s3fs path (conditional writes) is classified alike.
        with pytest.raises(TransientStorageError, match="create failed 2 attempts.*EndpointConn"):
            conditional.create_if_absent(key, b"lease", retry=QUICK)


def test_missing_object_is_permanent_and_not_retried(s3_prefix, tmp_path):
    patient = Retry(attempts=6, base_delay=5.0)  # one retry would take 5 s
    for loc in (resolve(s3_prefix).join("missing.bin"), resolve(tmp_path / "missing.bin")):
        start = time.monotonic()
        with pytest.raises(StorageError, match="no such file") as e:
            loc.read_bytes(retry=patient)
        assert not isinstance(e.value, TransientStorageError)
        with pytest.raises(StorageError, match="no such file"):
            loc.size(retry=patient)
        assert time.monotonic() - start < 2.5
    start = time.monotonic()
    with pytest.raises(OSError, match="is a directory"):
        resolve(tmp_path).read_bytes(retry=patient)
    assert time.monotonic() - start < 2.5


@pytest.fixture(scope="module")
def s3_faults():
    """One outage server for the tests that count its requests or lose its answers."""
    with outage_server() as srv:
        yield srv


def test_large_object_is_read_in_one_get(s3_faults):
    """A model.pt-sized object comes in one GET of known length, not a stream of small ones
    (96 ranged GETs for these 24 MB before; 50x slower from the moto server for 40 MB)."""
    data = os.urandom(24 * 2**20)
    key = s3_faults.location("s3://lanes/large/model.pt")
    key.write_bytes(data)
    s3_faults.sync()
    gets = s3_faults.gets
    assert key.read_bytes() == data
    s3_faults.sync()
    assert s3_faults.gets == gets + 1


def test_max_bytes_refuses_before_reading(s3_faults, tmp_path):
    data = bytes(range(256)) * 4
    key = s3_faults.location("s3://lanes/max-bytes/frame.bin")
    key.write_bytes(data)
    assert key.size() == 1024
    s3_faults.sync()
    gets = s3_faults.gets
    with pytest.raises(ObjectTooLarge, match=r"frame.bin: 1024 bytes, over the limit of 1023"):
        key.read_bytes(max_bytes=1023)
    s3_faults.sync()
    assert s3_faults.gets == gets  # refused from the size (HEAD): not one GET
    assert key.read_bytes(max_bytes=1024) == data
    s3_faults.sync()
    assert s3_faults.gets == gets + 1

    local = resolve(tmp_path / "frame.bin")
    local.write_bytes(data)
    assert local.read_bytes(max_bytes=1024) == data
    with pytest.raises(ObjectTooLarge, match="1024 bytes, over the limit of 1000"):
        local.read_bytes(max_bytes=1000)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_max_bytes_bounds_the_read_when_the_size_lies():
    # /dev/zero says size 0 and never ends: without the bound this read would not return.
    with pytest.raises(ObjectTooLarge, match=r"over the limit of 1000 bytes \(its size said 0\)"):
        resolve("/dev/zero").read_bytes(max_bytes=1000)


# -- conditional writes ------------------------------------------------------------------------
@pytest.fixture(params=["local", "s3"])
def lease(request, tmp_path):
    if request.param == "s3":
        return resolve(request.getfixturevalue("s3_prefix")).join("lease.json")
    return resolve(tmp_path / "leases" / "lease.json")


def test_conditional_writes(lease):
    assert conditional.read_tagged(lease) is None
    assert not conditional.replace_if(lease, b"x", "no-such-tag")
    assert not conditional.delete_if(lease, "no-such-tag")
    assert conditional.create_if_absent(lease, b"owner=a")
    assert not conditional.create_if_absent(lease, b"owner=b")  # it exists: the second create loses
    data, tag = conditional.read_tagged(lease)
    assert data == b"owner=a"
    assert conditional.replace_if(lease, b"owner=a renewed", tag)
    assert not conditional.replace_if(lease, b"owner=b", tag)  # stale tag
    data, fresh = conditional.read_tagged(lease)
    assert data == b"owner=a renewed" and fresh != tag
    assert lease.read_bytes() == b"owner=a renewed"
    assert not conditional.delete_if(lease, tag)  # stale tag
    assert conditional.delete_if(lease, fresh)
    assert conditional.read_tagged(lease) is None
    assert conditional.create_if_absent(lease, b"owner=b")  # free again
    if lease.scheme == "file":  # no temp files left, readers never saw them
        assert sorted(os.listdir(os.path.dirname(lease.path))) == [".lease.json.lock", "lease.json"]


@pytest.fixture(params=["local", "s3"])
def contested(request, tmp_path):
    if request.param == "s3":  # the outage server makes conditional writes atomic, as S3 does
        return request.getfixturevalue("s3_faults").location(f"s3://lanes/{tmp_path.name}/lease")
    return resolve(tmp_path / "lease")


def test_racing_threads_exactly_one_wins(contested):
    lease = contested
    n = 12
    barrier = threading.Barrier(n)

    def create(i: int) -> bool:
        barrier.wait()
        return conditional.create_if_absent(lease, f"owner={i}".encode())

    with ThreadPoolExecutor(n) as pool:
        created = list(pool.map(create, range(n)))
    assert created.count(True) == 1
    assert lease.read_bytes() == f"owner={created.index(True)}".encode()

    _, tag = conditional.read_tagged(lease)

    def renew(i: int) -> bool:
        barrier.wait()
        return conditional.replace_if(lease, f"renewed by {i}".encode(), tag)

    with ThreadPoolExecutor(n) as pool:
        renewed = list(pool.map(renew, range(n)))
    assert renewed.count(True) == 1
    assert lease.read_bytes() == f"renewed by {renewed.index(True)}".encode()


_CONTENDER = """
import sys
from pipelines.storage import conditional, resolve
loc, who = resolve(sys.argv[1]), sys.argv[2].encode()
print("ready", flush=True)
for command in sys.stdin:  # "create" or a tag to replace; all contenders get it at once
    command = command.strip()
    if command == "create":
        print(conditional.create_if_absent(loc, who), flush=True)
    else:
        print(conditional.replace_if(loc, b"renewed by " + who, command), flush=True)
"""


def test_racing_processes_exactly_one_wins_local(tmp_path):
    lease = resolve(tmp_path / "lease.json")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CONTENDER, lease.path, f"p{i}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for i in range(4)
    ]

    def race(command: str) -> list[bool]:
        for p in procs:
            p.stdin.write(command + "\n")
            p.stdin.flush()
        return [p.stdout.readline().strip() == "True" for p in procs]

    try:
        assert [p.stdout.readline().strip() for p in procs] == ["ready"] * len(procs)
        created = race("create")
        assert created.count(True) == 1
        assert lease.read_bytes() == f"p{created.index(True)}".encode()
        renewed = race(conditional.read_tagged(lease)[1])
        assert renewed.count(True) == 1
        assert lease.read_bytes() == f"renewed by p{renewed.index(True)}".encode()
    finally:
        for p in procs:
            p.stdin.close()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def test_answer_lost_after_a_conditional_write(s3_faults):
    """The write was applied but its answer was an error: the retry is refused (412 / no such
    key) and must not be taken for someone else's change."""
    lease = s3_faults.location("s3://lanes/lost-answer/lease.json")
    s3_faults.lose_next_answer()
    assert conditional.create_if_absent(lease, b"owner=a", retry=QUICK)
    _, tag = conditional.read_tagged(lease)
    s3_faults.lose_next_answer()
    assert conditional.replace_if(lease, b"owner=a renewed", tag, retry=QUICK)
    _, tag = conditional.read_tagged(lease)
    s3_faults.lose_next_answer()
    assert conditional.delete_if(lease, tag, retry=QUICK)
    assert conditional.read_tagged(lease) is None
    assert sum(line.startswith("lost answer") for line in s3_faults.lines) == 3


def test_store_without_conditional_writes_falls_back(caplog):
    with outage_server(conditional_writes=False) as srv:
        lease = srv.location("s3://lanes/legacy/lease.json")
        srv.lose_next_answer()  # the fallback's plain put is applied, its answer lost
        assert conditional.create_if_absent(lease, b"owner=a", retry=QUICK)
        assert not conditional.create_if_absent(lease, b"owner=b")
        _, tag = conditional.read_tagged(lease)
        assert not conditional.replace_if(lease, b"owner=b", '"stale"')
        assert conditional.replace_if(lease, b"owner=a renewed", tag)
        assert lease.read_bytes() == b"owner=a renewed"
        _, tag = conditional.read_tagged(lease)
        assert not conditional.delete_if(lease, '"stale"')
        assert conditional.delete_if(lease, tag)
        assert conditional.read_tagged(lease) is None
        assert sum(line.startswith("lost answer PUT") for line in srv.lines) == 1
    warnings = [r for r in caplog.records if "does not support conditional writes" in r.message]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING


def test_patient_fs_rides_out_an_outage_after_pickling():
    """Ray Train gets the checkpoint filesystem pickled, in each worker: the patient one must
    still be patient there (pyarrow's own pickle drops the retry strategy) and carry a
    multipart upload through a 6 s outage that starts in its middle."""
    import pickle
    import threading

    from pipelines.storage import s3

    with outage_server(outage_seconds=6) as srv:
        loc = srv.location("s3://lanes/ckpt/model.pt")
        blob = pickle.dumps(loc.patient_fs)
        s3.s3_pyarrow.cache_clear()  # as in a fresh worker process
        fs = pickle.loads(blob)
        data = os.urandom(40 * 2**20)  # several 10 MB parts
        seen = len(srv.lines)
        trigger = threading.Thread(
            target=lambda: (srv.wait_write("/model.pt", after=seen), srv.trigger())
        )
        trigger.start()
        with fs.open_output_stream(loc.path) as out:
            out.write(data)
        trigger.join()
        assert srv.outages_started == 1
        srv.wait_outage_end()
        assert loc.read_bytes() == data


# -- access refused: the job's configuration, deferred, never retried or recorded as bad ---------
ACCESS = {
    "ACCESS_DENIED during HeadObject operation: No response body.": True,
    "UNKNOWN (HTTP status 403) during HeadObject operation: No response body.": True,
    "EXPIRED_TOKEN during GetObject operation: The provided token has expired.": True,
    "INVALID_ACCESS_KEY_ID during GetObject operation: ": True,
    "NO_SUCH_KEY during GetObject operation: ": False,
    "UNKNOWN (HTTP status 404) during HeadObject operation: No response body.": False,
    "UNKNOWN (HTTP status 501) during HeadObject operation: No response body.": False,
    "SLOW_DOWN during GetObject operation: Please reduce your request rate.": False,
}


@pytest.mark.parametrize("message, refused", ACCESS.items(), ids=list(ACCESS))
def test_is_access_refused_pyarrow_errors(message, refused):
    prefix = "When reading information for key 'k' in bucket 'lanes': AWS Error "
    assert is_access_refused(OSError(prefix + message)) is refused


def test_is_access_refused_other_errors():
    import botocore.exceptions as b

    assert is_access_refused(b.NoCredentialsError())
    assert is_access_refused(PermissionError(errno.EACCES, "Permission denied"))
    assert not is_access_refused(FileNotFoundError(errno.ENOENT, "No such file"))
    assert not is_access_refused(ConnectionRefusedError(errno.ECONNREFUSED, "refused"))


@pytest.fixture(scope="module")
def denying_store():
    """A real S3 endpoint that answers 403 AccessDenied to reads of ``*/denied.jpg``, with a
    readable ``frames/ok.jpg`` and a denied ``frames/denied.jpg`` (yields the server)."""
    with outage_server(deny=("/denied.jpg",)) as srv:
        for name in ("ok.jpg", "denied.jpg"):
            srv.location(f"s3://lanes/frames/{name}").write_bytes(b"\xff\xd8\xff jpeg")
        yield srv


def test_a_denied_read_is_refused_at_once_not_retried(denying_store):
    denied = denying_store.location("s3://lanes/frames/denied.jpg")
    with pytest.raises(StorageAccessError, match="storage denied this job access"):
        denied.read_bytes(retry=Retry(attempts=6, base_delay=1.0))
    assert denying_store.location("s3://lanes/frames/ok.jpg").read_bytes().startswith(b"\xff")
    # One request for the one read: a refusal is not tried again.
    denying_store.sync()
    assert sum(line.startswith("denied ") for line in denying_store.lines) == 1


def test_an_access_refusal_is_deferred_like_an_outage_not_a_permanent_error():
    refusal = StorageAccessError("s3://b/k: read refused")
    assert isinstance(refusal, TransientStorageError) and refusal.exit_code == 3
    assert not is_transient(refusal)  # deferred, but never retried within the run
