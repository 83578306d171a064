"""The one storage resolver: local paths, ``file://`` and ``s3://`` URIs.

Everything in the project that touches storage goes through :func:`resolve`. It returns a
:class:`Location` carrying the pyarrow filesystem (what Ray Data and Ray Train are given,
explicitly: pyarrow ignores the ``AWS_ENDPOINT_URL*`` variables and would otherwise go to AWS)
and, when asked, the fsspec/s3fs filesystem configured from the same settings.

S3 settings come from the standard AWS credential chain (environment, shared config/credentials
files, instance or pod identity) plus the standard endpoint override ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL`` (MinIO, a local S3 server) and region ``AWS_REGION`` /
``AWS_DEFAULT_REGION``. Credentials are never put in URIs, printed or logged.

Failures are split in two (:func:`is_transient`): transient ones (S3 unreachable, throttling,
timeouts) are retried with a bounded backoff (:class:`Retry`) and, if they outlast it, raised as
:class:`TransientStorageError` so callers retry on a later run instead of recording good data as
bad; everything else (a missing object, access denied, a bad local file) is permanent and raised
at once.

Conditional writes (:meth:`Location.create_if_absent`, :meth:`Location.replace_if`,
:meth:`Location.delete_if`, with tags from :meth:`Location.read_tagged`) let overlapping jobs
share a small object such as a lease: S3 ``If-None-Match``/``If-Match`` requests, or a lock
file and atomic renames locally.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import posixpath
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

import pyarrow.fs as pafs

from pipelines.errors import UserError

__all__ = [
    "DEFAULT_RETRY",
    "Location",
    "ObjectTooLarge",
    "Retry",
    "StorageError",
    "TransientStorageError",
    "is_transient",
    "resolve",
    "s3_endpoint",
    "s3_region",
]

log = logging.getLogger(__name__)
_T = TypeVar("_T")


class StorageError(UserError):
    """A URI that cannot be used, or an object that is not where it was expected."""


class TransientStorageError(StorageError):
    """Storage kept failing for a reason that may pass (outage, throttling, timeouts) until the
    retries ran out: the object itself may be fine, so try again later rather than record it as
    bad."""


class ObjectTooLarge(StorageError):
    """An object over the size limit the caller set (permanent: retrying will not shrink it)."""


@dataclass(frozen=True)
class Retry:
    """How many times an operation is tried, and the pauses between tries: ``base_delay``
    doubling up to ``max_delay``. The default waits 0.5+1+2+4+8 = 15.5 s in all, enough to ride
    out a ~10 s S3 outage (a restart, a failover) without stalling a job for minutes."""

    attempts: int = 6
    base_delay: float = 0.5
    max_delay: float = 8.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"Retry.attempts must be at least 1, got {self.attempts}")

    def delays(self) -> tuple[float, ...]:
        """The pause before each retry (one fewer than ``attempts``)."""
        return tuple(min(self.base_delay * 2**i, self.max_delay) for i in range(self.attempts - 1))


DEFAULT_RETRY = Retry()

# -- transient or permanent ------------------------------------------------------------------
# S3 error codes that retrying cannot fix. Codes are compared without case or underscores, so
# one entry covers S3's own code (botocore, via s3fs: "NoSuchKey") and the AWS C++ SDK's name
# in pyarrow's messages ("AWS Error NO_SUCH_KEY during ..."); pyarrow says "UNKNOWN (HTTP status
# 403)" when the response had no body (HEAD), hence the bare statuses. Anything else from S3
# (NETWORK_CONNECTION, SLOW_DOWN, SERVICE_UNAVAILABLE, INTERNAL_FAILURE, REQUEST_TIMEOUT, 429,
# 500, 503, a 400 without a body, codes never seen before) is transient: an object wrongly
# retried on the next run costs little, one wrongly recorded as bad data is lost.
_PERMANENT_S3 = frozenset(
    code.replace("_", "").upper()
    for code in (
        # identity and permissions: a configuration problem that no wait will fix
        "AccessDenied",
        "AccountProblem",
        "AllAccessDisabled",
        "ExpiredToken",
        "RequestTimeTooSkewed",
        "IncompleteSignature",
        "InvalidAccessKeyId",
        "InvalidClientTokenId",
        "InvalidSignature",
        "InvalidToken",
        "MissingAuthenticationToken",
        "SignatureDoesNotMatch",
        "UnrecognizedClient",
        # nothing there
        "NoSuchBucket",
        "NoSuchKey",
        "NoSuchUpload",
        "NoSuchVersion",
        "ResourceNotFound",
        # archived (Glacier) objects, bad requests, unsupported features
        "InvalidObjectState",
        "ObjectNotInActiveTier",
        "InvalidArgument",
        "InvalidBucketName",
        "InvalidRange",
        "InvalidRequest",
        "KeyTooLongError",
        "MalformedQueryString",
        "MethodNotAllowed",
        "MissingParameter",
        "InvalidParameterValue",
        "InvalidParameterCombination",
        "Validation",
        "NotImplemented",
        "PreconditionFailed",
        "301",
        "403",
        "404",
        "405",
        "412",
        "416",
        "501",
    )
)
_PERMANENT_TYPES = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    FileExistsError,
)
# Client-side botocore failures that are configuration, not the network.
_PERMANENT_BOTOCORE = frozenset(
    {"NoCredentialsError", "PartialCredentialsError", "ParamValidationError", "NoRegionError"}
)
_REMOTE_MODULES = ("botocore.", "aiobotocore.", "aiohttp.", "urllib3.", "s3fs.")
# Local errnos that say "not now" rather than "never" (a network filesystem, a signal).
_TRANSIENT_ERRNOS = frozenset(
    {
        errno.EAGAIN,
        errno.EINTR,
        errno.ETIMEDOUT,
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.ENETDOWN,
        errno.ENETUNREACH,
        errno.EHOSTUNREACH,
    }
)
_AWS_ERROR = re.compile(r"AWS Error (\w+)")
_HTTP_STATUS = re.compile(r"HTTP status (\d{3})")


def _s3_codes(exc: BaseException) -> frozenset[str]:
    """The S3 error code and HTTP status that ``exc`` carries, normalized; empty when it is not
    an error answered by S3. s3fs raises builtin exceptions whose ``__cause__`` is botocore's
    ClientError (with the response); pyarrow raises OSError with the SDK's error name in the
    message."""
    for e in (exc, exc.__cause__):
        response = getattr(e, "response", None)
        if isinstance(response, dict) and "Error" in response:
            code = str(response["Error"].get("Code") or "UNKNOWN")
            status = str(response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            return frozenset({code.replace("_", "").upper(), status} - {""})
    text = str(exc)
    match = _AWS_ERROR.search(text)
    if not match:
        return frozenset()
    codes = {match.group(1).replace("_", "").upper()}
    if status := _HTTP_STATUS.search(text):
        codes.add(status.group(1))
    return frozenset(codes)


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` may pass if the operation is tried again later.

    Transient: connection refused/reset, timeouts, throttling (SlowDown, 429, 503), S3 internal
    errors (500), curl failures in pyarrow, and any other error answered by S3 or raised by its
    client libraries. Permanent: missing objects, access denied, directories, our own
    :class:`StorageError` (except :class:`TransientStorageError`), credentials missing, and
    local-disk errors other than a few network-filesystem errnos.
    """
    if isinstance(exc, StorageError):
        return isinstance(exc, TransientStorageError)
    if isinstance(exc, _PERMANENT_TYPES):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError, InterruptedError, BlockingIOError)):
        return True
    if codes := _s3_codes(exc):
        return not codes & _PERMANENT_S3
    if "curlCode" in str(exc):
        return True
    if type(exc).__module__.startswith(_REMOTE_MODULES):
        return type(exc).__name__ not in _PERMANENT_BOTOCORE
    return isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS


def _redact(text: str) -> str:
    """``text`` without credentials: URL user-info and the values of the AWS key variables
    (error messages are printed and logged). Real keys are 16+ characters; shorter values
    (placeholders) are left alone rather than blanking every occurrence of a short string."""
    text = re.sub(r"//[^/@\s]+@", "//", text)
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
        value = os.environ.get(name, "")
        if len(value) >= 16:
            text = text.replace(value, "***")
    return text


def s3_endpoint() -> str | None:
    """The S3 endpoint override from the standard AWS variables, or None for AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_region() -> str:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


# The AWS SDK's own attempts per request for long-running writers (Location.patient_fs):
# with its exponential backoff they span a short outage or a burst of throttling.
PATIENT_SDK_ATTEMPTS = 12


class _PatientS3FileSystem(pafs.S3FileSystem):
    """An S3FileSystem with a retry strategy that survives pickling: pyarrow's own pickle
    drops ``retry_strategy`` (measured: an unpickled copy on a Ray worker failed an upload
    in 2.6 s of a 10 s outage that the original rode out), so it is rebuilt from its
    arguments."""

    def __init__(self, rebuild: tuple, **kwargs) -> None:
        super().__init__(**kwargs)
        self._rebuild = rebuild  # _s3_pyarrow's arguments

    def __reduce__(self):
        return _s3_pyarrow, self._rebuild


@cache
def _s3_pyarrow(endpoint: str | None, region: str, sdk_attempts: int = 0) -> pafs.S3FileSystem:
    # Keys are left to the AWS SDK's default chain; only where to go is passed explicitly.
    kwargs: dict = {"region": region}
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        # A local endpoint (MinIO, moto) has no virtual-host bucket DNS.
        kwargs["force_virtual_addressing"] = False
        if endpoint.startswith("http://"):
            kwargs["scheme"] = "http"
    if sdk_attempts:
        kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=sdk_attempts)
        return _PatientS3FileSystem((endpoint, region, sdk_attempts), **kwargs)
    return pafs.S3FileSystem(**kwargs)


@cache
def _s3_fsspec(endpoint: str | None, region: str):
    import s3fs

    client_kwargs = {"region_name": region}
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    return s3fs.S3FileSystem(client_kwargs=client_kwargs, use_listings_cache=False)


@cache
def _s3_fsspec_single_try(endpoint: str | None, region: str):
    """s3fs for conditional requests, with botocore's and s3fs's own retries off. Their retries
    are invisible: a put that was applied but whose answer was lost is sent again and gets 412,
    and the caller would be told "not created" for its own object. Our retry loop sees every
    try, so it can tell (:meth:`Location._s3_conditional`)."""
    import s3fs

    client_kwargs = {"region_name": region}
    if endpoint:
        client_kwargs["endpoint_url"] = endpoint
    fs = s3fs.S3FileSystem(
        client_kwargs=client_kwargs,
        config_kwargs={"retries": {"total_max_attempts": 1}},
        use_listings_cache=False,
        skip_instance_cache=True,
    )
    fs.retries = 1  # s3fs's own loop around botocore (5 by default)
    return fs


def _content_tag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# Endpoints found not to support conditional requests (see Location._s3_conditional).
_UNCONDITIONAL_ENDPOINTS: set[str | None] = set()
# How long the fallback for such stores waits before re-reading what it wrote, so that a
# racing writer's put has likely landed and the loser sees it lost.
_FALLBACK_SETTLE_S = 0.5


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
    def patient_fs(self) -> pafs.FileSystem:
        """:attr:`fs` for a writer that cannot retry on its own and must ride out a short
        outage or throttling: Ray Train's checkpoint uploads (Ray issues #47939, #36690), where
        one failed request fails the worker. On S3 every request gets
        ``PATIENT_SDK_ATTEMPTS`` attempts with backoff; locally it is :attr:`fs`."""
        if self.scheme == "s3":
            return _s3_pyarrow(self.endpoint, self.region, PATIENT_SDK_ATTEMPTS)
        return self.fs

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
    def _retrying(self, what: str, op: Callable[[], _T], retry: Retry | None) -> _T:
        """``op()``, tried again after transient failures with ``retry``'s pauses; one that
        outlasts them becomes TransientStorageError. Permanent failures propagate at once."""
        delays = retry.delays() if retry is not None else ()
        start = time.monotonic()
        for attempt in range(1, len(delays) + 2):
            try:
                return op()
            except Exception as e:
                if not is_transient(e):
                    raise
                last = _redact(f"{type(e).__name__}: {e}")
                if attempt > len(delays):
                    raise TransientStorageError(
                        f"{self.uri}: {what} failed {attempt} attempts over "
                        f"{time.monotonic() - start:.1f}s for a transient reason (storage "
                        f"unreachable, throttled or timing out; the object may be fine, retry "
                        f"later); last error: {last}"
                    ) from e
                log.info("%s: %s failed (attempt %d), retrying: %s", self.uri, what, attempt, last)
                time.sleep(delays[attempt - 1])
        raise AssertionError("unreachable")

    def read_bytes(
        self, *, max_bytes: int | None = None, retry: Retry | None = DEFAULT_RETRY
    ) -> bytes:
        """The whole object. Transient failures are retried (``retry=None``: one try); a
        missing object is a permanent StorageError. With ``max_bytes``, a larger object is
        refused (ObjectTooLarge) from its size, before any of it is read, and at most
        ``max_bytes + 1`` bytes are ever read, even where the size was wrong."""
        return self._retrying("read", lambda: self._read_once(max_bytes), retry)

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

        return self._retrying("size", once, retry)

    def write_bytes(self, data: bytes, *, retry: Retry | None = DEFAULT_RETRY) -> None:
        """Write the whole object, atomically: a reader sees the old object or the new one,
        never a part (an S3 put is atomic; locally a temporary file renamed into place).
        Transient failures are retried (a put is idempotent)."""

        def once() -> None:
            if self.scheme == "file":
                self._local_write(data)
                return
            self.parent().mkdir()
            with self.fs.open_output_stream(self.path) as f:
                f.write(data)

        self._retrying("write", once, retry)

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    # -- conditional writes -------------------------------------------------------------------
    # For small objects shared by overlapping jobs (a lease). The tag is the S3 ETag, locally
    # the content's sha256: either way equal content gives an equal tag, so a tag matches when
    # the object holds what was read, not necessarily the same write.
    def read_tagged(self, *, retry: Retry | None = DEFAULT_RETRY) -> tuple[bytes, str] | None:
        """The content and its tag (for :meth:`replace_if`, :meth:`delete_if`), or None when
        the object does not exist."""
        return self._retrying("read", self._read_tagged_once, retry)

    def create_if_absent(self, data: bytes, *, retry: Retry | None = DEFAULT_RETRY) -> bool:
        """Write ``data`` only if nothing is there: True if this call created the object,
        False if it already existed. Of many racing creators exactly one gets True."""
        if self.scheme != "s3":
            return self._retrying("create", lambda: self._local_create(data), retry)

        def attempt(conditional: bool) -> bool:
            if conditional:
                self._s3("put_object", Body=data, IfNoneMatch="*")
                return True
            if self._read_tagged_once() is not None:
                return False
            return self._put_and_check(data)

        return self._s3_conditional("create", attempt, lambda: self._holds(data), retry)

    def replace_if(self, data: bytes, tag: str, *, retry: Retry | None = DEFAULT_RETRY) -> bool:
        """Compare-and-swap: write ``data`` only if the object's tag is still ``tag``. False
        when it changed or is gone."""
        if self.scheme != "s3":
            return self._retrying("replace", lambda: self._local_replace(data, tag), retry)

        def attempt(conditional: bool) -> bool:
            if conditional:
                self._s3("put_object", Body=data, IfMatch=tag)
                return True
            current = self._read_tagged_once()
            if current is None or current[1] != tag:
                return False
            return self._put_and_check(data)

        return self._s3_conditional("replace", attempt, lambda: self._holds(data), retry)

    def delete_if(self, tag: str, *, retry: Retry | None = DEFAULT_RETRY) -> bool:
        """Delete the object only if its tag is still ``tag``. False when it changed or is
        gone."""
        if self.scheme != "s3":
            return self._retrying("delete", lambda: self._local_delete(tag), retry)

        def attempt(conditional: bool) -> bool:
            if conditional:
                self._s3("delete_object", IfMatch=tag)
                return True
            current = self._read_tagged_once()
            if current is None or current[1] != tag:
                return False
            self._s3("delete_object")
            return True

        # After a lost answer, "gone" is what our own delete would have left.
        return self._s3_conditional(
            "delete", attempt, lambda: self._read_tagged_once() is None, retry
        )

    def _read_tagged_once(self) -> tuple[bytes, str] | None:
        if self.scheme == "s3":
            return self._s3_get_tagged()
        try:
            data = Path(self.path).read_bytes()
        except FileNotFoundError:
            return None
        return data, _content_tag(data)

    def _holds(self, data: bytes) -> bool:
        current = self._read_tagged_once()
        return current is not None and current[0] == data

    # S3 ------------------------------------------------------------------------------------
    def _s3(self, method: str, **kwargs) -> dict:
        bucket, _, key = self.path.partition("/")
        fs = _s3_fsspec_single_try(self.endpoint, self.region)
        return fs.call_s3(method, Bucket=bucket, Key=key, **kwargs)

    def _s3_get_tagged(self) -> tuple[bytes, str] | None:
        # One GetObject gives content and ETag together (a HEAD then a GET could pair a new
        # content with an old tag).
        import fsspec.asyn

        bucket, _, key = self.path.partition("/")
        fs = _s3_fsspec_single_try(self.endpoint, self.region)

        async def get() -> tuple[bytes, str] | None:
            try:
                response = await fs._call_s3("get_object", Bucket=bucket, Key=key)
            except FileNotFoundError as e:
                if "NOSUCHBUCKET" in _s3_codes(e):
                    raise
                return None
            body = response["Body"]
            try:
                return await body.read(), response["ETag"]
            finally:
                body.close()

        return fsspec.asyn.sync(fs.loop, get)

    def _put_and_check(self, data: bytes) -> bool:
        """Plain put, then after a pause check that the object still holds ``data``: a racing
        writer that put after us has won instead."""
        self._s3("put_object", Body=data)
        time.sleep(_FALLBACK_SETTLE_S)
        return self._holds(data)

    def _s3_conditional(
        self,
        what: str,
        attempt: Callable[[bool], bool],
        applied_by_us: Callable[[], bool],
        retry: Retry | None,
    ) -> bool:
        """``attempt(conditional)`` with retries: True (done) or False (refused: precondition
        failed, or missing). ``applied_by_us()`` decides a refusal that follows a failed try:
        that try may have been applied with its answer lost, and the refusal may be our own
        change seen from outside."""
        maybe_applied = False

        def once() -> bool:
            nonlocal maybe_applied
            try:
                done = self._attempt_or_fall_back(attempt)
            except Exception as e:
                # Refused: 412 (s3fs raises FileExistsError for If-None-Match), or NoSuchKey
                # for If-Match on a missing object. NoSuchBucket is no refusal: it propagates.
                if not (
                    isinstance(e, FileExistsError)
                    or _s3_codes(e) & {"PRECONDITIONFAILED", "NOSUCHKEY"}
                ):
                    if is_transient(e):
                        maybe_applied = True
                    raise
                done = False
            return done or (maybe_applied and applied_by_us())

        return self._retrying(what, once, retry)

    def _attempt_or_fall_back(self, attempt: Callable[[bool], bool]) -> bool:
        if self.endpoint in _UNCONDITIONAL_ENDPOINTS:
            return attempt(False)
        try:
            return attempt(True)
        except OSError as e:
            if not _s3_codes(e) & {"NOTIMPLEMENTED", "501"}:
                raise
        # Older MinIO/Ceph answer 501 to If-Match/If-None-Match: fall back to a plain write
        # checked by re-reading. Two writers racing within the pause can both believe they
        # won, so on such a store a lease is best-effort.
        if self.endpoint not in _UNCONDITIONAL_ENDPOINTS:
            _UNCONDITIONAL_ENDPOINTS.add(self.endpoint)
            log.warning(
                "S3 endpoint %s does not support conditional writes (501 NotImplemented); "
                "falling back to write-then-verify, which two writers racing within %.1fs "
                "can both pass",
                self.endpoint or "AWS",
                _FALLBACK_SETTLE_S,
            )
        return attempt(False)

    # local ---------------------------------------------------------------------------------
    def _local_temp(self, data: bytes) -> Path:
        """``data`` in a new hidden file next to this one, flushed to disk: renamed or linked
        into place, readers see the whole object or none of it."""
        target = Path(self.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def _local_write(self, data: bytes) -> None:
        """Replace this file with ``data`` atomically (a temporary file renamed into place)."""
        tmp = self._local_temp(data)
        try:
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @contextmanager
    def _local_lock(self) -> Iterator[None]:
        """An exclusive flock on a hidden sidecar (``.NAME.lock``) for the duration. The lock
        file stays: removing it while another process waits on it would let a third one lock
        a new file at the same time."""
        import fcntl

        target = Path(self.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(target.with_name(f".{target.name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _local_create(self, data: bytes) -> bool:
        tmp = self._local_temp(data)
        try:
            # link() fails if the name exists, atomically: no lock needed against creators,
            # and replace/delete only act on an existing object.
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()

    def _local_replace(self, data: bytes, tag: str) -> bool:
        with self._local_lock():
            current = self._read_tagged_once()
            if current is None or current[1] != tag:
                return False
            self._local_write(data)
            return True

    def _local_delete(self, tag: str) -> bool:
        with self._local_lock():
            current = self._read_tagged_once()
            if current is None or current[1] != tag:
                return False
            os.unlink(self.path)
            return True

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
