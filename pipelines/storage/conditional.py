"""Conditional writes to one small object shared by overlapping jobs (the labeling lease):
create it only if absent, replace or delete it only if it still holds what was read.

The tag is the S3 ETag (``If-None-Match`` / ``If-Match`` requests), locally the content's
sha256 (a lock file and atomic renames): either way equal content gives an equal tag, so a tag
matches when the object holds what was read, not necessarily the same write. Of many racing
writers exactly one wins, also when the answer to a write that was applied is lost (the next
try sees its own change and says so). Stores without conditional requests (older MinIO/Ceph
answer 501) fall back to write-then-verify, which is best-effort.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pipelines.storage.errors import is_transient, s3_codes
from pipelines.storage.location import Location, local_temp, local_write
from pipelines.storage.retry import DEFAULT_RETRY, Retry, retrying
from pipelines.storage.s3 import s3_fsspec_single_try

log = logging.getLogger(__name__)

# Endpoints found not to support conditional requests (see _attempt_or_fall_back).
_UNCONDITIONAL_ENDPOINTS: set[str | None] = set()
# How long the fallback for such stores waits before re-reading what it wrote, so that a
# racing writer's put has likely landed and the loser sees it lost.
_FALLBACK_SETTLE_S = 0.5


def _content_tag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_tagged(loc: Location, *, retry: Retry | None = DEFAULT_RETRY) -> tuple[bytes, str] | None:
    """The content and its tag (for :meth:`replace_if`, :meth:`delete_if`), or None when
    the object does not exist."""
    return retrying(loc.uri, "read", lambda: _read_tagged_once(loc), retry)


def create_if_absent(loc: Location, data: bytes, *, retry: Retry | None = DEFAULT_RETRY) -> bool:
    """Write ``data`` only if nothing is there: True if this call created the object,
    False if it already existed. Of many racing creators exactly one gets True."""
    if loc.scheme != "s3":
        return retrying(loc.uri, "create", lambda: _local_create(loc, data), retry)

    def attempt(conditional: bool) -> bool:
        if conditional:
            _s3(loc, "put_object", Body=data, IfNoneMatch="*")
            return True
        if _read_tagged_once(loc) is not None:
            return False
        return _put_and_check(loc, data)

    return _s3_conditional(loc, "create", attempt, lambda: _holds(loc, data), retry)


def replace_if(
    loc: Location, data: bytes, tag: str, *, retry: Retry | None = DEFAULT_RETRY
) -> bool:
    """Compare-and-swap: write ``data`` only if the object's tag is still ``tag``. False
    when it changed or is gone."""
    if loc.scheme != "s3":
        return retrying(loc.uri, "replace", lambda: _local_replace(loc, data, tag), retry)

    def attempt(conditional: bool) -> bool:
        if conditional:
            _s3(loc, "put_object", Body=data, IfMatch=tag)
            return True
        current = _read_tagged_once(loc)
        if current is None or current[1] != tag:
            return False
        return _put_and_check(loc, data)

    return _s3_conditional(loc, "replace", attempt, lambda: _holds(loc, data), retry)


def delete_if(loc: Location, tag: str, *, retry: Retry | None = DEFAULT_RETRY) -> bool:
    """Delete the object only if its tag is still ``tag``. False when it changed or is
    gone."""
    if loc.scheme != "s3":
        return retrying(loc.uri, "delete", lambda: _local_delete(loc, tag), retry)

    def attempt(conditional: bool) -> bool:
        if conditional:
            _s3(loc, "delete_object", IfMatch=tag)
            return True
        current = _read_tagged_once(loc)
        if current is None or current[1] != tag:
            return False
        _s3(loc, "delete_object")
        return True

    # After a lost answer, "gone" is what our own delete would have left.
    return _s3_conditional(loc, "delete", attempt, lambda: _read_tagged_once(loc) is None, retry)


def _read_tagged_once(loc: Location) -> tuple[bytes, str] | None:
    if loc.scheme == "s3":
        return _s3_get_tagged(loc)
    try:
        data = Path(loc.path).read_bytes()
    except FileNotFoundError:
        return None
    return data, _content_tag(data)


def _holds(loc: Location, data: bytes) -> bool:
    current = _read_tagged_once(loc)
    return current is not None and current[0] == data


# -- S3 ----------------------------------------------------------------------------------------
def _s3(loc: Location, method: str, **kwargs) -> dict:
    bucket, _, key = loc.path.partition("/")
    fs = s3_fsspec_single_try(loc.endpoint, loc.region)
    return fs.call_s3(method, Bucket=bucket, Key=key, **kwargs)


def _s3_get_tagged(loc: Location) -> tuple[bytes, str] | None:
    # One GetObject gives content and ETag together (a HEAD then a GET could pair a new
    # content with an old tag).
    import fsspec.asyn

    bucket, _, key = loc.path.partition("/")
    fs = s3_fsspec_single_try(loc.endpoint, loc.region)

    async def get() -> tuple[bytes, str] | None:
        try:
            response = await fs._call_s3("get_object", Bucket=bucket, Key=key)
        except FileNotFoundError as e:
            if "NOSUCHBUCKET" in s3_codes(e):
                raise
            return None
        body = response["Body"]
        try:
            return await body.read(), response["ETag"]
        finally:
            body.close()

    return fsspec.asyn.sync(fs.loop, get)


def _put_and_check(loc: Location, data: bytes) -> bool:
    """Plain put, then after a pause check that the object still holds ``data``: a racing
    writer that put after us has won instead."""
    _s3(loc, "put_object", Body=data)
    time.sleep(_FALLBACK_SETTLE_S)
    return _holds(loc, data)


def _s3_conditional(
    loc: Location,
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
            done = _attempt_or_fall_back(loc, attempt)
        except Exception as e:
            # Refused: 412 (s3fs raises FileExistsError for If-None-Match), or NoSuchKey
            # for If-Match on a missing object. NoSuchBucket is no refusal: it propagates.
            if not (
                isinstance(e, FileExistsError) or s3_codes(e) & {"PRECONDITIONFAILED", "NOSUCHKEY"}
            ):
                if is_transient(e):
                    maybe_applied = True
                raise
            done = False
        return done or (maybe_applied and applied_by_us())

    return retrying(loc.uri, what, once, retry)


def _attempt_or_fall_back(loc: Location, attempt: Callable[[bool], bool]) -> bool:
    if loc.endpoint in _UNCONDITIONAL_ENDPOINTS:
        return attempt(False)
    try:
        return attempt(True)
    except OSError as e:
        if not s3_codes(e) & {"NOTIMPLEMENTED", "501"}:
            raise
    # Older MinIO/Ceph answer 501 to If-Match/If-None-Match: fall back to a plain write
    # checked by re-reading. Two writers racing within the pause can both believe they
    # won, so on such a store a lease is best-effort.
    if loc.endpoint not in _UNCONDITIONAL_ENDPOINTS:
        _UNCONDITIONAL_ENDPOINTS.add(loc.endpoint)
        log.warning(
            "S3 endpoint %s does not support conditional writes (501 NotImplemented); "
            "falling back to write-then-verify, which two writers racing within %.1fs "
            "can both pass",
            loc.endpoint or "AWS",
            _FALLBACK_SETTLE_S,
        )
    return attempt(False)


# -- local -------------------------------------------------------------------------------------
@contextmanager
def _local_lock(loc: Location) -> Iterator[None]:
    """An exclusive flock on a hidden sidecar (``.NAME.lock``) for the duration. The lock
    file stays: removing it while another process waits on it would let a third one lock
    a new file at the same time."""
    import fcntl

    target = Path(loc.path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target.with_name(f".{target.name}.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _local_create(loc: Location, data: bytes) -> bool:
    tmp = local_temp(Path(loc.path), data)
    try:
        # link() fails if the name exists, atomically: no lock needed against creators,
        # and replace/delete only act on an existing object.
        os.link(tmp, loc.path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink()


def _local_replace(loc: Location, data: bytes, tag: str) -> bool:
    with _local_lock(loc):
        current = _read_tagged_once(loc)
        if current is None or current[1] != tag:
            return False
        local_write(Path(loc.path), data)
        return True


def _local_delete(loc: Location, tag: str) -> bool:
    with _local_lock(loc):
        current = _read_tagged_once(loc)
        if current is None or current[1] != tag:
            return False
        os.unlink(loc.path)
        return True
