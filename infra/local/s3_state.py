"""The local stack's S3 (moto keeps objects in memory) saved to disk at a stop and restored at
the next start (used by infra/local/start.sh and stop.sh; the venv's python, boto3 comes with
moto).

    s3_state.py save STATE ENDPOINT      every bucket and object of ENDPOINT into STATE/s3
    s3_state.py restore STATE ENDPOINT   STATE/s3's buckets and objects into ENDPOINT

The snapshot is content-addressed: ``STATE/s3/objects/<sha256>`` holds each distinct object
once and ``STATE/s3/index.json`` maps bucket and key to it. Keys are never turned into paths,
so no key (``a`` beside ``a/b``, ``../x``, a trailing ``/``) can collide or escape the folder.
A save replaces the index in one rename after every object it names is on disk, and deletes
objects only after that: a save that fails or is killed leaves the previous snapshot whole. An
object whose ETag and size are those the last index recorded is not downloaded again.

A restore checks every object's digest before it uploads anything: a damaged snapshot is
refused in one line and the server is left empty, never half-restored.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

FORMAT = 1
CHUNK = 8 << 20
# The local server answers at once; retries ride out a server still settling after its start.
_CONFIG = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5)


class SnapshotError(Exception):
    """A snapshot that cannot be saved or restored; the message is the one line to print."""


def _client(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint, config=_CONFIG)


def _read_index(folder: Path) -> dict | None:
    path = folder / "index.json"
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise SnapshotError(f"{path}: unreadable ({e})") from None
    if index.get("format") != FORMAT or not isinstance(index.get("buckets"), dict):
        raise SnapshotError(f"{path}: not a snapshot of format {FORMAT}")
    return index


def _write_index(folder: Path, buckets: dict[str, list[dict]], saved_at: str | None = None) -> None:
    saved_at = saved_at or time.strftime("%Y-%m-%dT%H:%M:%S%z")
    index = {"format": FORMAT, "saved_at": saved_at, "buckets": buckets}
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".index-")
    with os.fdopen(fd, "w") as f:
        json.dump(index, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / "index.json")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _download(client, bucket: str, key: str, objects: Path) -> tuple[str, str, int]:
    """Stream one object into ``objects``; returns its sha256, ETag and size as read."""
    response = client.get_object(Bucket=bucket, Key=key)
    digest, size = hashlib.sha256(), 0
    fd, tmp = tempfile.mkstemp(dir=objects, prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in response["Body"].iter_chunks(CHUNK):
                digest.update(chunk)
                f.write(chunk)
                size += len(chunk)
            f.flush()
            os.fsync(f.fileno())
        sha = digest.hexdigest()
        os.replace(tmp, objects / sha)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # The ETag of what was read (not of the listing): an object rewritten between the two is
    # recorded as the content that was saved.
    return sha, response["ETag"], size


def save(state: str, endpoint: str) -> str:
    folder = Path(state) / "s3"
    objects = folder / "objects"
    objects.mkdir(parents=True, exist_ok=True)
    previous = _read_index(folder) or {"buckets": {}}
    known = {
        (bucket, e["key"], e["etag"], e["size"]): e["sha256"]
        for bucket, entries in previous["buckets"].items()
        for e in entries
        if (objects / e["sha256"]).is_file()
    }
    client = _client(endpoint)
    buckets: dict[str, list[dict]] = {}
    downloaded = total = 0
    for b in client.list_buckets()["Buckets"]:
        entries = buckets.setdefault(b["Name"], [])
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=b["Name"]):
            for obj in page.get("Contents", []):
                sha = known.get((b["Name"], obj["Key"], obj["ETag"], obj["Size"]))
                etag, size = obj["ETag"], obj["Size"]
                if sha is None:
                    sha, etag, size = _download(client, b["Name"], obj["Key"], objects)
                    downloaded += 1
                entries.append({"key": obj["Key"], "sha256": sha, "etag": etag, "size": size})
                total += size
    _write_index(folder, buckets)
    # Only now is the previous index replaced: what it alone named can go.
    named = {e["sha256"] for entries in buckets.values() for e in entries}
    for path in objects.iterdir():
        if path.name not in named:
            path.unlink()
    count = sum(len(entries) for entries in buckets.values())
    return (f"s3: saved {count} objects ({total / 1e6:.1f} MB) in {len(buckets)} buckets to "
            f"{folder} ({downloaded} downloaded, {count - downloaded} unchanged)")  # fmt: skip


def restore(state: str, endpoint: str) -> str:
    folder = Path(state) / "s3"
    index = _read_index(folder)
    if index is None:
        return f"s3: no snapshot in {folder}; the server starts empty"
    buckets: dict[str, list[dict]] = index["buckets"]
    entries = [e for bucket_entries in buckets.values() for e in bucket_entries]
    damaged = [e for e in entries
               if not (folder / "objects" / e["sha256"]).is_file()
               or _file_sha256(folder / "objects" / e["sha256"]) != e["sha256"]]  # fmt: skip
    if damaged:
        raise SnapshotError(
            f"{folder}: {len(damaged)} of {len(entries)} objects missing or damaged (first: "
            f"{damaged[0]['key']!r} in objects/{damaged[0]['sha256']}); nothing restored: move "
            f"the folder away to start with an empty S3"
        )
    client = _client(endpoint)
    for bucket, bucket_entries in buckets.items():
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=bucket)
        for e in bucket_entries:
            with (folder / "objects" / e["sha256"]).open("rb") as f:
                # One PUT per object: its ETag is then the server's for this content, which
                # the next save compares against instead of downloading it again.
                e["etag"] = client.put_object(Bucket=bucket, Key=e["key"], Body=f)["ETag"]
    _write_index(folder, buckets, saved_at=index.get("saved_at"))
    total = sum(e["size"] for e in entries)
    return (f"s3: restored {len(entries)} objects ({total / 1e6:.1f} MB) in {len(buckets)} "
            f"buckets from {folder} (saved {index.get('saved_at', '?')})")  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("save", "restore"):
        sys.exit("usage: s3_state.py save|restore STATE ENDPOINT")
    command, state, endpoint = sys.argv[1:]
    try:
        print({"save": save, "restore": restore}[command](state, endpoint))
    except SnapshotError as e:
        sys.exit(f"error: {e}")
    except (BotoCoreError, ClientError, OSError) as e:
        # The previous snapshot is whole (see above); say which server and what it answered.
        sys.exit(f"error: s3 {command} against {endpoint} failed: {e}")
