"""A lease on an output prefix, so that scheduled runs that overlap never destroy each other.

One small JSON object (``OUTPUT/_lease.json``; the leading underscore keeps Parquet readers
away) names the run that may write under the prefix and until when. It is taken and renewed
with compare-and-swap writes (S3 conditional puts, ``If-None-Match`` / ``If-Match``; locally a
locked replace, see :mod:`pipelines.storage.conditional`), so of two runs started together exactly one
gets it. The holder renews it from a background thread (the heartbeat); a run that was killed
stops renewing, and once its lease has expired the next run takes it over and cleans up
after it. A holder that could not renew in time (paused, cut off from storage) has lost the
lease: :meth:`Lease.check` raises before it writes anything that counts.

Expiry compares wall clocks of different machines: keep ``ttl`` far above their skew and
above the longest pause between two heartbeats.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass

from pipelines.core.errors import UserError
from pipelines.storage import conditional
from pipelines.storage.errors import StorageError
from pipelines.storage.location import Location

LEASE_NAME = "_lease.json"
log = logging.getLogger(__name__)


class LeaseHeld(UserError):
    """Another run holds the lease."""

    def __init__(self, holder: LeaseInfo, where: str) -> None:
        self.holder = holder
        left = max(0.0, holder.expires_at - time.time())
        super().__init__(
            f"{where} is held by run {holder.run} (host {holder.host}, pid {holder.pid}"
            + (f", Ray job {holder.ray_job}" if holder.ray_job else "")
            + f"), heartbeat {time.time() - holder.heartbeat_at:.0f}s ago, expires in "
            f"{left:.0f}s unless renewed"
        )


class LeaseLost(RuntimeError):
    """This run's lease expired or was taken over: it must stop before writing more."""


@dataclass(frozen=True)
class LeaseInfo:
    run: str
    host: str
    pid: int
    ray_job: str
    acquired_at: float  # epoch seconds
    heartbeat_at: float
    expires_at: float

    @classmethod
    def parse(cls, data: bytes) -> LeaseInfo | None:
        try:
            return cls(**json.loads(data))
        except (ValueError, TypeError):
            return None  # garbage (hand-edited, a store that mangled it): treated as expired


class Lease:
    """``with Lease(output.join(LEASE_NAME), run) as lease: ...`` holds it for the block,
    renewing every ``ttl / 3`` seconds; ``lease.check()`` before every write that counts."""

    def __init__(self, loc: Location, run: str, ttl: float = 600.0) -> None:
        if ttl <= 0:
            raise ValueError(f"lease ttl must be > 0, got {ttl}")
        self.loc, self.run, self.ttl = loc, run, ttl
        self.tag: str | None = None
        self.info: LeaseInfo | None = None
        self.took_over: LeaseInfo | None = None  # the expired holder this run replaced
        self._lost: str | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # -- taking it --------------------------------------------------------------------------
    def _fresh(self, acquired_at: float | None = None) -> LeaseInfo:
        now = time.time()
        return LeaseInfo(
            run=self.run,
            host=socket.gethostname(),
            pid=os.getpid(),
            ray_job=os.environ.get("RAY_JOB_SUBMISSION_ID", "") or _ray_job_id(),
            acquired_at=acquired_at or now,
            heartbeat_at=now,
            expires_at=now + self.ttl,
        )

    def try_acquire(self) -> None:
        """Take the lease now, or raise :class:`LeaseHeld` naming the holder."""
        for _ in range(10):  # only loops when another run changed the object in between
            current = conditional.read_tagged(self.loc)
            info = self._fresh()
            data = json.dumps(asdict(info)).encode()
            if current is None:
                if conditional.create_if_absent(self.loc, data):
                    return self._won(info)
                continue
            body, tag = current
            holder = LeaseInfo.parse(body)
            if holder is not None and holder.expires_at > time.time():
                raise LeaseHeld(holder, self.loc.uri)
            if conditional.replace_if(self.loc, data, tag):
                self.took_over = holder
                return self._won(info)
        raise StorageError(f"{self.loc.uri}: the lease kept changing while taking it")

    def acquire(self, wait: float = 0.0, poll: float = 5.0) -> None:
        """:meth:`try_acquire`, retried for up to ``wait`` seconds while another run holds it."""
        deadline = time.monotonic() + wait
        while True:
            try:
                return self.try_acquire()
            except LeaseHeld:
                if time.monotonic() + poll > deadline:
                    raise
                time.sleep(poll)

    def _won(self, info: LeaseInfo) -> None:
        got = conditional.read_tagged(self.loc)
        if got is None or LeaseInfo.parse(got[0]) != info:
            raise StorageError(f"{self.loc.uri}: lease written but not read back")
        self.info, self.tag = info, got[1]
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()

    # -- keeping it -------------------------------------------------------------------------
    def renew(self) -> None:
        """Extend the lease (compare-and-swap on the tag this run last wrote)."""
        with self._lock:
            if self._lost or self.info is None:
                return
            info = self._fresh(self.info.acquired_at)
            data = json.dumps(asdict(info)).encode()
            if not conditional.replace_if(self.loc, data, self.tag):
                self._lost = "another run took the lease over (it had expired)"
                return
            got = conditional.read_tagged(self.loc)
            if got is None or LeaseInfo.parse(got[0]) != info:
                self._lost = "the lease object changed right after renewing"
                return
            self.info, self.tag = info, got[1]

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.renew()
            except Exception as e:  # storage trouble: keep trying until the lease runs out
                log.warning("lease heartbeat failed (%s: %s); retrying", type(e).__name__, e)
            if self._lost:
                return

    def check(self) -> None:
        """Raise :class:`LeaseLost` unless this run still holds an unexpired lease; renews
        first, so a check right before a commit leaves a whole ``ttl`` for it."""
        self.renew()
        if self._lost:
            raise LeaseLost(f"{self.loc.uri}: {self._lost}")
        if self.info is None or self.info.expires_at <= time.time():
            raise LeaseLost(f"{self.loc.uri}: lease expired before it could be renewed")

    # -- giving it back ---------------------------------------------------------------------
    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            if self.tag is not None and not self._lost:
                conditional.delete_if(self.loc, self.tag)  # only if still ours
            self.tag = None

    def __enter__(self) -> Lease:
        self.try_acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _ray_job_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_job_id() if ray.is_initialized() else ""
    except Exception:
        return ""


def new_run_id() -> str:
    from datetime import datetime, timezone

    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
