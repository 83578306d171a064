"""The one storage resolver: local paths, ``file://`` and ``s3://`` URIs.

Everything in the project that touches storage goes through :func:`resolve`. It returns a
:class:`Location` carrying the pyarrow filesystem (what Ray Data and Ray Train are given) and,
when asked, the fsspec/s3fs filesystem configured from the same settings
(:mod:`pipelines.storage.s3`). Reads and writes retry transient failures
(:mod:`pipelines.storage.retry`) and raise permanent ones at once
(:mod:`pipelines.storage.errors`).
"""

from __future__ import annotations

import os
import posixpath
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from pipelines.storage.errors import ObjectTooLarge, StorageError
from pipelines.storage.retry import DEFAULT_RETRY, Retry, retrying
from pipelines.storage.s3 import (
    PATIENT_SDK_ATTEMPTS,
    s3_endpoint,
    s3_fsspec,
    s3_pyarrow,
    s3_region,
)


@dataclass(frozen=True)
class Location:
    """A resolved place in storage: ``uri`` as the user wrote it (normalized), and the
    ``path`` to use with ``fs`` (bucket/key for S3, an absolute path locally)."""

    uri: str
    scheme: str  # "file" or "s3"
    path: str
    # Where S3 is, captured from the resolving (driver) process so that Ray workers started
    # with another environment still reach the same server. Keys are never captured.
    endpoint: str | None = None
    region: str = "us-east-1"

    # -- filesystems --------------------------------------------------------------------------
    @property
    def fs(self) -> pafs.FileSystem:
        if self.scheme == "s3":
            return s3_pyarrow(self.endpoint, self.region)
        return pafs.LocalFileSystem()

    @property
    def patient_fs(self) -> pafs.FileSystem:
        """:attr:`fs` for a writer that cannot retry on its own and must ride out a short
        outage or throttling: Ray Train's checkpoint uploads (Ray issues #47939, #36690), where
        one failed request fails the worker. On S3 every request gets
        ``PATIENT_SDK_ATTEMPTS`` attempts with backoff; locally it is :attr:`fs`."""
        if self.scheme == "s3":
            return s3_pyarrow(self.endpoint, self.region, PATIENT_SDK_ATTEMPTS)
        return self.fs

    @property
    def fsspec(self):
        if self.scheme == "s3":
            return s3_fsspec(self.endpoint, self.region)
        import fsspec

        return fsspec.filesystem("file")

    # -- navigation ---------------------------------------------------------------------------
    def _at(self, path: str) -> Location:
        uri = f"s3://{path}" if self.scheme == "s3" else path
        return replace(self, uri=uri, path=path)

    def join(self, *parts: str) -> Location:
        return self._at(posixpath.join(self.path, *parts))

    def at_uri(self, uri: str) -> Location:
        """Resolve ``uri`` with this location's S3 settings (used in Ray workers, whose
        environment may not carry the driver's endpoint)."""
        loc = resolve(uri)
        if loc.scheme == "s3" and self.scheme == "s3":
            return replace(loc, endpoint=self.endpoint, region=self.region)
        return loc

    def at_path(self, full_path: str) -> Location:
        """The location of ``full_path`` (as returned by listing) on the same storage."""
        return self._at(full_path)

    def relative(self, full_path: str) -> str:
        """``full_path`` (as returned by listing) relative to this location."""
        return posixpath.relpath(full_path, self.path)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path.rstrip("/"))

    def __str__(self) -> str:
        return self.uri

    # -- queries ------------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self.fs.get_file_info(self.path).type == pafs.FileType.Directory

    def list_files(self, suffixes: Iterable[str] | None = None) -> list[pafs.FileInfo]:
        """All files below this location (recursive), sorted by path. ``suffixes`` filters
        case-insensitively. A missing location lists nothing."""
        if not self.exists():
            return []
        selector = pafs.FileSelector(self.path, recursive=True, allow_not_found=True)
        infos = [i for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.File]
        if suffixes is not None:
            wanted = tuple(s.lower() for s in suffixes)
            infos = [i for i in infos if i.path.lower().endswith(wanted)]
        return sorted(infos, key=lambda i: i.path)

    # -- bytes --------------------------------------------------------------------------------
    def read_bytes(
        self, *, max_bytes: int | None = None, retry: Retry | None = DEFAULT_RETRY
    ) -> bytes:
        """The whole object. Transient failures are retried (``retry=None``: one try); a
        missing object is a permanent StorageError. With ``max_bytes``, a larger object is
        refused (ObjectTooLarge) from its size, before any of it is read, and at most
        ``max_bytes + 1`` bytes are ever read, even where the size was wrong."""
        return retrying(self.uri, "read", lambda: self._read_once(max_bytes), retry)

    def _read_once(self, max_bytes: int | None) -> bytes:
        try:
            # A random-access open learns the size first (S3: HEAD, no GET yet; locally fstat):
            # the limit check costs no extra request, and the object then comes in one GET of
            # known length. (A stream's read() of unknown length pulls small chunks: 50x slower
            # from S3 for a 40 MB model.pt, measured.)
            with self.fs.open_input_file(self.path) as f:
                if max_bytes is None:
                    return f.read()
                size = f.size()
                if size > max_bytes:
                    raise ObjectTooLarge(
                        f"{self.uri}: {size} bytes, over the limit of {max_bytes} bytes"
                    )
                # One byte over the limit tells a too-large object whose size lied (a device,
                # a file still growing) without reading it whole.
                data = f.read(max_bytes + 1)
        except FileNotFoundError as e:
            raise StorageError(f"{self.uri}: no such file") from e
        if len(data) > max_bytes:
            raise ObjectTooLarge(
                f"{self.uri}: over the limit of {max_bytes} bytes (its size said {size})"
            )
        return data

    def size(self, *, retry: Retry | None = DEFAULT_RETRY) -> int:
        """The object's size in bytes; StorageError when missing or not a regular file."""

        def once() -> int:
            info = self.fs.get_file_info(self.path)
            if info.type == pafs.FileType.NotFound:
                raise StorageError(f"{self.uri}: no such file")
            if info.type != pafs.FileType.File or info.size is None:
                raise StorageError(f"{self.uri}: not a regular file ({info.type.name})")
            return info.size

        return retrying(self.uri, "size", once, retry)

    def write_bytes(self, data: bytes, *, retry: Retry | None = DEFAULT_RETRY) -> None:
        """Write the whole object, atomically: a reader sees the old object or the new one,
        never a part (an S3 put is atomic; locally a temporary file renamed into place).
        Transient failures are retried (a put is idempotent)."""

        def once() -> None:
            if self.scheme == "file":
                local_write(Path(self.path), data)
                return
            self.parent().mkdir()
            with self.fs.open_output_stream(self.path) as f:
                f.write(data)

        retrying(self.uri, "write", once, retry)

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def parent(self) -> Location:
        return self._at(posixpath.dirname(self.path.rstrip("/")))

    def mkdir(self) -> None:
        if self.scheme == "file":
            Path(self.path).mkdir(parents=True, exist_ok=True)
        elif "/" not in self.path.strip("/") and not self.exists():
            # The bucket itself: create it when missing (the local S3 server starts empty).
            self.fs.create_dir(self.path)
        # S3 has no directories below the bucket: writing a key creates its "parents".

    def delete(self) -> None:
        """Remove a file or a whole directory tree; missing is fine."""
        info = self.fs.get_file_info(self.path)
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path)

    def move_to(self, dest: Location) -> None:
        """Move one file. Local moves are atomic renames; on S3 it is copy-then-delete, so
        callers that need atomicity check for the destination first (see labeling commit)."""
        dest.parent().mkdir()
        self.fs.move(self.path, dest.path)

    def walk_dirs(self) -> Iterator[str]:
        selector = pafs.FileSelector(self.path, recursive=True, allow_not_found=True)
        for info in self.fs.get_file_info(selector):
            if info.type == pafs.FileType.Directory:
                yield info.path


def resolve(uri: str | os.PathLike) -> Location:
    """Resolve a local path, ``file://`` URI or ``s3://bucket/key`` URI.

    Local paths are made absolute, so a Ray worker whose working directory differs from the
    driver's (``ray job submit --working-dir``) still finds them.
    """
    text = os.fspath(uri).strip()
    if not text:
        raise StorageError("empty storage URI (expected a local path, file:// or s3:// URI)")
    parsed = urlparse(text)
    scheme = parsed.scheme.lower()
    if scheme in ("s3", "s3a"):
        # An S3 key is taken as it is: '#', '?' and '%' are characters of the key, not a
        # fragment, a query or escapes (urlparse would cut "a#1.jpg" to "a").
        netloc, _, key = text.split("://", 1)[1].partition("/")
        if "@" in netloc:
            raise StorageError(
                "credentials in S3 URIs are not accepted (they would end up in logs); use the "
                "AWS credential chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile or "
                "an instance/pod role)"
            )
        if not netloc:
            raise StorageError(f"{text!r}: an S3 URI needs a bucket (s3://BUCKET/prefix)")
        path = (netloc + "/" + key.lstrip("/")).rstrip("/")
        return Location(
            uri=f"s3://{path}", scheme="s3", path=path, endpoint=s3_endpoint(), region=s3_region()
        )
    if scheme == "file":
        local = parsed.path
    elif scheme == "" or (len(scheme) == 1 and os.name == "nt"):
        local = text
    else:
        raise StorageError(
            f"{text!r}: unsupported storage scheme {scheme!r} (expected a local path, "
            "file:// or s3://)"
        )
    path = os.path.abspath(os.path.expanduser(local))
    return Location(uri=path, scheme="file", path=path)


def local_temp(target: Path, data: bytes) -> Path:
    """``data`` in a new hidden file next to ``target``, flushed to disk: renamed or linked
    into place, readers see the whole object or none of it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def local_write(target: Path, data: bytes) -> None:
    """Replace ``target`` with ``data`` atomically (a temporary file renamed into place)."""
    tmp = local_temp(target, data)
    try:
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
