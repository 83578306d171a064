"""Progress lines for jobs that run without a terminal (``ray job submit``, a CronJob's log):
``label: 1200/4800 frames (25%), 31.5 frames/s, ETA 1m54s``, at most every ``every_s`` seconds
and once at the end, whether or not Ray Data's progress bars are on.

Work done in Ray Data tasks is counted by a :class:`Counter` actor the tasks add to (one tiny
call per batch); a thread in the driver reads it and prints the lines. Work counted in the
driver itself (evaluation sums each batch there) calls :meth:`RateLine.update` directly.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


def duration(seconds: float) -> str:
    """``1h02m``, ``4m05s``, ``0m09s``."""
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class RateLine:
    """``WHAT: DONE/TOTAL UNIT (P%), R UNIT/s, ETA T`` with the rate averaged since the start."""

    def __init__(
        self,
        what: str,
        total: int,
        unit: str = "frames",
        every_s: float = 30.0,
        emit: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what, self.total, self.unit, self.every_s = what, total, unit, every_s
        self.emit = emit or (lambda line: print(line, flush=True))
        self.clock = clock
        self.t0 = self.t_last = clock()
        self.done_last = 0

    def format(self, done: int) -> str:
        elapsed = max(self.clock() - self.t0, 1e-9)
        rate = done / elapsed
        pct = f" ({100 * done / self.total:.0f}%)" if self.total else ""
        eta = (
            f", ETA {duration((self.total - done) / rate)}"
            if rate > 0 and done < self.total
            else ""
        )
        return f"{self.what}: {done}/{self.total} {self.unit}{pct}, {rate:.1f} {self.unit}/s{eta}"

    def update(self, done: int, force: bool = False) -> str | None:
        """Record ``done``; emit and return the line when it is due (``every_s`` since the
        last one, or ``force`` with something new)."""
        now = self.clock()
        if not (force and done != self.done_last) and now - self.t_last < self.every_s:
            return None
        line = self.format(done)
        self.emit(line)
        self.t_last, self.done_last = now, done
        return line


class Counter:
    """A tiny Ray actor (no CPU) that Ray Data tasks add their finished items to."""

    def __init__(self) -> None:
        self.n = 0

    def add(self, n: int) -> None:
        self.n += int(n)

    def get(self) -> int:
        return self.n


def counter_actor():
    """A :class:`Counter` on the driver's node (it lives as long as the driver)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(Counter).options(scheduling_strategy=here).remote()


def count(counter, n: int) -> None:
    """Add ``n`` to a :class:`Counter` from a task, without waiting (``None``: not counted)."""
    if counter is not None:
        counter.add.remote(n)


@contextmanager
def reported(
    line: RateLine, counter, poll_s: float = 2.0, final: Callable[[], int] | None = None
) -> Iterator[None]:
    """While the block runs, a thread reads ``counter`` and feeds ``line``; the last line is
    printed when the block ends, with ``final()`` where the job knows its exact count (a
    task's last addition may still be on its way to the counter)."""
    import ray

    stop = threading.Event()

    def read() -> int | None:
        try:
            return int(ray.get(counter.get.remote(), timeout=10))
        except Exception:  # noqa: BLE001 - a progress line is never worth failing the job
            return None

    def run() -> None:
        while not stop.wait(min(poll_s, line.every_s)):
            if (n := read()) is not None:
                line.update(n)

    thread = threading.Thread(target=run, name="progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=15)
        n = final() if final is not None else read()
        if n is not None:
            line.update(n, force=True)
