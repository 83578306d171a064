"""The one reader of source files under limits, shared by ingest and labeling.

A delivery holds files of every kind of broken: zero bytes, truncated, huge, missing by the
time they are read, unreadable for lack of permission. Each read decides once what a failure
means: the *record* is bad (:class:`~pipelines.core.codecs.FrameError`, with the reason: the
job reports it and goes on) or *storage* is in trouble
(:class:`~pipelines.storage.TransientStorageError` after bounded retries: the record may be
fine, and is tried again on a later run, never recorded as bad).
"""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.core.codecs import FrameError
from pipelines.core.options import option
from pipelines.storage import DEFAULT_RETRY, Location, ObjectTooLarge, Retry, TransientStorageError

# A 3384x2710 Apollo frame is 9.2 MP and its JPEG 1-3 MB: anything far larger is a mistake, and
# decoding it would run a worker out of memory.
DEFAULT_MAX_PIXELS = 60_000_000
DEFAULT_MAX_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Limits:
    """What one source file may be: checked from the listing (bytes) and the image header
    (pixels) before anything large is read or decoded; how often a read is retried."""

    max_bytes: int = DEFAULT_MAX_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS
    retry: Retry = DEFAULT_RETRY


def read_source(anchor: Location, uri: str, what: str, listed_size: int, limits: Limits) -> bytes:
    """The bytes of one source file (``what``: "image", "label", "frame", named in reasons).

    Over ``limits.max_bytes`` by its listed size (-1: not listed) it is refused unread; read,
    at most that many bytes are ever taken. Raises :class:`FrameError` when the record is bad
    (too large, missing), :class:`TransientStorageError` when storage still failed after
    ``limits.retry`` or refused this job access (:class:`StorageAccessError`: deferred too). ``anchor``: a location of the same store, whose S3 settings
    the read uses (a Ray worker's environment may not carry them)."""
    if listed_size > limits.max_bytes:
        raise FrameError(
            f"{what} is {listed_size} bytes, over the --max-bytes limit {limits.max_bytes}"
        )
    try:
        return anchor.at_uri(uri).read_bytes(max_bytes=limits.max_bytes, retry=limits.retry)
    except ObjectTooLarge as e:
        raise FrameError(f"{what}: {e}") from None
    except TransientStorageError:
        raise
    except Exception as e:  # missing, unreadable: the record is bad, the job goes on
        raise FrameError(f"{what} could not be read ({type(e).__name__}: {e})") from None


@dataclass(frozen=True, kw_only=True)
class SourceLimitOptions:
    """``--max-bytes``, ``--max-pixels`` and ``--read-retries`` of the jobs that read source
    files (ingest, labeling)."""

    max_bytes: int = option(
        DEFAULT_MAX_BYTES,
        "larger source files are rejected with that reason, from the listing, before they are read",
        min=1,
        group="source files",
    )
    max_pixels: int = option(
        DEFAULT_MAX_PIXELS,
        "larger images/labels are rejected, from their header, before they are decoded",
        min=1,
        group="source files",
    )
    read_retries: int = option(
        DEFAULT_RETRY.attempts,
        "attempts per source file on storage errors (backoff 0.5 s doubling to 8 s); a file "
        "still failing is not recorded as bad (ingest does not commit, labeling defers it to "
        "the next run)",
        min=1,
        group="source files",
    )

    @property
    def limits(self) -> Limits:
        return Limits(self.max_bytes, self.max_pixels, Retry(attempts=self.read_retries))
