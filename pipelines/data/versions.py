"""Versioned, atomically committed datasets.

An ingest never touches what readers are reading. Each one writes a new version under its own
prefix and commits it by replacing one small pointer object, last::

    DEST/
      current.json                      {"version": "v20261126T050400Z-3f9a1c", ...}  (the commit)
      versions/v20261126T050400Z-3f9a1c/
        manifest.json                   written after every shard (a version without it is
        train/*.parquet                 incomplete: a crashed or running ingest)
        val/*.parquet

Readers call :func:`resolve_dataset` once at start and keep the version folder it returns,
so a newer version committed meanwhile never mixes into a running job. A crash at any point of
an ingest leaves ``current.json`` (and the version it names) as it was. Old versions stay until
removed on purpose (:func:`prune_versions`, ``jobs.ingest --keep-versions``).

A folder holding ``manifest.json`` itself (a version folder, or a dataset written before
versioning) resolves to itself: a pinned dataset.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import pyarrow.fs as pafs

from pipelines.core.errors import UserError
from pipelines.storage import Location, resolve

MANIFEST_NAME = "manifest.json"
POINTER_NAME = "current.json"
VERSIONS_DIR = "versions"
# Incomplete versions younger than this may still be being written by a running ingest.
STALE_INCOMPLETE = timedelta(hours=24)
# Microseconds in the name: two ingests in one second must still sort in start order, or
# pruning keeps the wrong "newest". Names without them (the first format) still parse.
_NAME_RE = re.compile(r"^v(\d{8}T\d{6})(\d{6})?Z-[0-9a-f]{6}$")


class DatasetError(UserError):
    """No dataset (or no committed version) where one was expected."""


@dataclass(frozen=True)
class DatasetVersion:
    """One committed dataset version, resolved once."""

    root: str  # what the user gave: the dataset root, or a pinned folder
    name: str  # version name; "" for a pinned folder that is not under versions/
    uri: str  # the folder holding train/, val/ and manifest.json
    manifest: dict
    manifest_sha256: str  # first 16 hex digits of the manifest file's SHA-256

    @property
    def location(self) -> Location:
        return resolve(self.uri)

    @property
    def manifest_uri(self) -> str:
        return self.location.join(MANIFEST_NAME).uri


def new_version_name(now: datetime | None = None) -> str:
    """Sortable by start time (to the microsecond); the random tail keeps two ingests on two
    machines started in the same microsecond apart."""
    now = now or datetime.now(timezone.utc)
    return f"v{now:%Y%m%dT%H%M%S%fZ}-{secrets.token_hex(3)}"


def version_location(dest: Location, name: str) -> Location:
    return dest.join(VERSIONS_DIR, name)


def _load(folder: Location, root: str, name: str) -> DatasetVersion:
    data = folder.join(MANIFEST_NAME).read_bytes()
    try:
        manifest = json.loads(data)
    except ValueError as e:
        raise DatasetError(f"{folder.join(MANIFEST_NAME).uri}: not valid JSON ({e})") from None
    return DatasetVersion(
        root=root,
        name=name or manifest.get("version", ""),
        uri=folder.uri,
        manifest=manifest,
        manifest_sha256=hashlib.sha256(data).hexdigest()[:16],
    )


def resolve_dataset(uri: str) -> DatasetVersion:
    """The committed version a reader should use: the one ``current.json`` names, or ``uri``
    itself when it holds a manifest (pinned). Call once per job and keep the result."""
    loc = resolve(uri)
    pointer = read_pointer(loc)
    if pointer is not None:
        name = pointer["version"]
        folder = version_location(loc, name)
        if not folder.join(MANIFEST_NAME).exists():
            raise DatasetError(
                f"{loc.join(POINTER_NAME).uri} names version {name}, but "
                f"{folder.join(MANIFEST_NAME).uri} is missing (removed by hand?)"
            )
        return _load(folder, loc.uri, name)
    if loc.join(MANIFEST_NAME).exists():
        return _load(loc, loc.uri, "")
    raise DatasetError(
        f"{loc.uri}: no {MANIFEST_NAME} (and no {POINTER_NAME}); expected the --dest folder of "
        "`python -m jobs.ingest`, or one of its versions/ folders"
    )


def read_pointer(dest: Location) -> dict | None:
    loc = dest.join(POINTER_NAME)
    if not loc.exists():
        return None
    try:
        pointer = json.loads(loc.read_text())
        if not _NAME_RE.match(pointer["version"]):
            raise ValueError(f"bad version name {pointer['version']!r}")
    except (ValueError, KeyError, TypeError) as e:
        raise DatasetError(f"{loc.uri}: not a dataset pointer ({e})") from None
    return pointer


def commit_version(dest: Location, name: str, manifest_sha256: str) -> None:
    """Make ``name`` the current version: one small object replaced atomically (see
    :meth:`Location.write_bytes`), so a reader sees the old pointer or the new one, never half."""
    pointer = {
        "version": name,
        "manifest_sha256": manifest_sha256,
        "committed_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    dest.join(POINTER_NAME).write_bytes(json.dumps(pointer, indent=2).encode())


@dataclass(frozen=True)
class VersionInfo:
    name: str
    complete: bool  # has its manifest (all shards written)
    current: bool


def list_versions(dest: Location) -> list[VersionInfo]:
    """Every version folder under ``dest``, oldest first."""
    pointer = read_pointer(dest)
    current = pointer["version"] if pointer else None
    base = dest.join(VERSIONS_DIR)
    # One level only: listing every shard of every version would grow with the data.
    selector = pafs.FileSelector(base.path, recursive=False, allow_not_found=True)
    names = sorted(posixpath.basename(i.path) for i in base.fs.get_file_info(selector))
    return [
        VersionInfo(n, version_location(dest, n).join(MANIFEST_NAME).exists(), n == current)
        for n in names
        if _NAME_RE.match(n)
    ]


def _started(name: str) -> datetime:
    m = _NAME_RE.match(name)
    assert m, name
    return datetime.strptime(m[1], "%Y%m%dT%H%M%S").replace(tzinfo=timezone.utc)


def prune_versions(dest: Location, keep: int, now: datetime | None = None) -> list[str]:
    """Remove committed versions older than the newest ``keep`` (never the current one) and
    incomplete versions started more than a day ago (crashed ingests). Returns the names."""
    if keep < 1:
        raise DatasetError(f"--keep-versions must be >= 1, got {keep}")
    now = now or datetime.now(timezone.utc)
    versions = list_versions(dest)
    complete = [v for v in versions if v.complete]
    kept = {v.name for v in complete[-keep:]} | {v.name for v in versions if v.current}
    removed = []
    for v in versions:
        stale = not v.complete and now - _started(v.name) > STALE_INCOMPLETE
        if (v.complete and v.name not in kept) or stale:
            version_location(dest, v.name).delete()
            removed.append(v.name)
    return removed
