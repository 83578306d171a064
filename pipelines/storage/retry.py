"""Bounded retries of storage operations: transient failures (:func:`is_transient`) are tried
again with a doubling pause; one that outlasts them becomes :class:`TransientStorageError`, so
the caller can defer the work to a later run instead of recording good data as bad. Access
refused (:func:`is_access_refused`) is not retried: it becomes :class:`StorageAccessError` at
once, deferred the same way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from pipelines.storage.errors import (
    StorageAccessError,
    TransientStorageError,
    is_access_refused,
    is_transient,
    redact_credentials,
)

log = logging.getLogger(__name__)
_T = TypeVar("_T")


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


def retrying(uri: str, what: str, op: Callable[[], _T], retry: Retry | None) -> _T:
    """``op()``, tried again after transient failures with ``retry``'s pauses (None: once); one
    that outlasts them becomes TransientStorageError. Access refused becomes
    StorageAccessError at once; other permanent failures propagate at once."""
    delays = retry.delays() if retry is not None else ()
    start = time.monotonic()
    for attempt in range(1, len(delays) + 2):
        try:
            return op()
        except Exception as e:
            last = redact_credentials(f"{type(e).__name__}: {e}")
            if not is_transient(e):
                if is_access_refused(e) and not isinstance(e, StorageAccessError):
                    raise StorageAccessError(
                        f"{uri}: {what} refused: storage denied this job access (the job's "
                        f"credentials or the bucket's permissions; the object may be fine, "
                        f"retry once they are fixed); {last}"
                    ) from e
                raise
            if attempt > len(delays):
                raise TransientStorageError(
                    f"{uri}: {what} failed {attempt} attempts over "
                    f"{time.monotonic() - start:.1f}s for a transient reason (storage "
                    f"unreachable, throttled or timing out; the object may be fine, retry "
                    f"later); last error: {last}"
                ) from e
            log.info("%s: %s failed (attempt %d), retrying: %s", uri, what, attempt, last)
            time.sleep(delays[attempt - 1])
    raise AssertionError("unreachable")
