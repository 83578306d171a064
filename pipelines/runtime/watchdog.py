"""Turning "no progress for N minutes" into a clear error instead of a job that waits forever
(for resources a fixed cluster will never have, a stuck read, a lost node).

The job's driver runs a :class:`Watchdog`; progress is reported by calling ``beat`` from the
driver's own loop (labeling, evaluation) or, for training, by rank 0 to a
:class:`~pipelines.runtime.progress.ProgressActor` (``actor.beat.remote(what)``) that the watchdog
polls.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class Stalled(Exception):
    """No progress for the watchdog's limit (raised in the main thread by the watchdog)."""


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # what Ray Train and Ray's get already abort cleanly on


class Watchdog:
    """``with Watchdog(limit_s, "training") as dog:`` around a blocking call; ``dog.beat(what)``
    marks progress (or ``poll`` returns the last one: (wall time, what)). When nothing moves
    for ``limit_s`` the main thread is interrupted; the ``with`` block then raises
    :class:`Stalled` with the message. A main thread stuck in native code that ignores the
    interrupt gets ``grace_s`` more, then the process exits with status 1 after printing it."""

    def __init__(
        self,
        limit_s: float,
        what: str,
        *,
        poll: Callable[[], tuple[float, str]] | None = None,
        hint: str = "",
        grace_s: float = 60.0,
    ) -> None:
        self.limit_s, self.what, self.poll, self.hint, self.grace_s = (
            limit_s,
            what,
            poll,
            hint,
            grace_s,
        )
        self._last = (time.time(), "started")
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.message: str | None = None

    def beat(self, what: str) -> None:
        self._last = (time.time(), what)

    def _latest(self) -> tuple[float, str]:
        if self.poll is None:
            return self._last
        try:
            polled = self.poll()
        except Exception as e:  # noqa: BLE001 - an unreachable actor is no progress, not a crash
            log.warning("watchdog: cannot read progress (%s)", type(e).__name__)
            return self._last
        self._last = max(self._last, polled)
        return self._last

    def _run(self) -> None:
        period = min(30.0, max(0.2, self.limit_s / 10))
        while not self._stop.wait(period):
            at, what = self._latest()
            idle = time.time() - at
            if idle < self.limit_s:
                continue
            with self._lock:  # never interrupt code after the block
                if self._stop.is_set():
                    return
                self.message = (
                    f"{self.what}: no progress for {idle / 60:.1f} minutes (last: {what}); "
                    f"giving up{'. ' + self.hint if self.hint else ''}"
                )
                # A real signal, not _thread.interrupt_main(): only a signal wakes a main
                # thread blocked in a wait (Ray's get, a lock) to raise KeyboardInterrupt.
                signal.pthread_kill(threading.main_thread().ident, self._signum)
            if not self._stop.wait(self.grace_s):
                print(f"error: {self.message}", file=sys.stderr, flush=True)
                os._exit(1)
            return

    def __enter__(self) -> Watchdog:
        # Our own signal and handler: a job started with SIGINT ignored (nohup, a CI runner, a
        # shell's background job) would otherwise never be interrupted. Only the main thread may
        # install handlers; elsewhere the default SIGINT handler is the best there is.
        self._signum, self._own_handler = signal.SIGINT, False
        if threading.current_thread() is threading.main_thread():
            self._signum, self._own_handler = signal.SIGUSR2, True
            self._previous = signal.signal(signal.SIGUSR2, _raise_keyboard_interrupt)
        self._thread = threading.Thread(target=self._run, name="watchdog", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            with self._lock:
                self._stop.set()
        except KeyboardInterrupt:  # ours, sent while the block was ending
            pass
        finally:
            if self._own_handler:
                signal.signal(self._signum, self._previous or signal.SIG_DFL)
        # The interrupt may surface as another exception from inside the library (Ray Train
        # aborts its run on it), or the wait may have ended by itself just after it.
        if self.message:
            raise Stalled(self.message) from None
        return False
