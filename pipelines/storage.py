"""The one storage resolver: local paths, ``file://`` and ``s3://`` URIs.

Everything in the project that touches storage goes through :func:`resolve`. It returns a
:class:`Location` carrying the pyarrow filesystem (what Ray Data and Ray Train are given,
explicitly: pyarrow ignores the ``AWS_ENDPOINT_URL*`` variables and would otherwise go to AWS)
and, when asked, the fsspec/s3fs filesystem configured from the same settings.

S3 settings come from the standard AWS credential chain (environment, shared config/credentials
files, instance or pod identity) plus the standard endpoint override ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL`` (MinIO, a local S3 server) and region ``AWS_REGION`` /
``AWS_DEFAULT_REGION``. Credentials are never put in URIs, printed or logged.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from pipelines.errors import UserError

__all__ = ["Location", "StorageError", "resolve", "s3_endpoint", "s3_region"]


class StorageError(UserError):
    """A URI that cannot be used, or an object that is not where it was expected."""


def s3_endpoint() -> str | None:
    """The S3 endpoint override from the standard AWS variables, or None for AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


@cache
def _s3_pyarrow(endpoint: str | None, region: str) -> pafs.S3FileSystem:
    # Keys are left to the AWS SDK's default chain; only where to go is passed explicitly.
    kwargs: dict = {"region": region}
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        # A local endpoint (MinIO, moto) has no virtual-host bucket DNS.
        kwargs["force_virtual_addressing"] = False
        if endpoint.startswith("http://"):
            kwargs["scheme"] = "http"
    return pafs.S3FileSystem(**kwargs)


@cache
def _s3_fsspec(endpoint: str | None, region: str):
    import s3fs

    client_kwargs = {"region_name": region}
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    return s3fs.S3FileSystem(client_kwargs=client_kwargs, use_listings_cache=False)


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
            return _s3_pyarrow(self.endpoint, self.region)
        return pafs.LocalFileSystem()

    @property
    def fsspec(self):
        if self.scheme == "s3":
            return _s3_fsspec(self.endpoint, self.region)
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
    def read_bytes(self) -> bytes:
        try:
            with self.fs.open_input_stream(self.path) as f:
                return f.read()
        except FileNotFoundError as e:
            raise StorageError(f"{self.uri}: no such file") from e

    def write_bytes(self, data: bytes) -> None:
        self.parent().mkdir()
        with self.fs.open_output_stream(self.path) as f:
            f.write(data)

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
        if "@" in parsed.netloc:
            raise StorageError(
                "credentials in S3 URIs are not accepted (they would end up in logs); use the "
                "AWS credential chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile or "
                "an instance/pod role)"
            )
        if not parsed.netloc:
            raise StorageError(f"{text!r}: an S3 URI needs a bucket (s3://BUCKET/prefix)")
        path = (parsed.netloc + "/" + parsed.path.lstrip("/")).rstrip("/")
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
