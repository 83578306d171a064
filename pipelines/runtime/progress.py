"""What a job says about its progress, without a terminal (``ray job submit``, a CronJob's
log), and what its watchdog reads.

Lines: :class:`RateLine` (``label: 1200/4800 frames (25%), 31.5 frames/s, ETA 1m54s``) for work
counted in items, :class:`StepLine` (``epoch 2/5 step 12/36: 14.2 img/s, loss 0.4123, ...``) for
training steps; each at most every ``every_s`` seconds and once at the end of a stage.

Reports: work done away from the driver (Ray Data tasks, training rank 0) goes to one
:class:`ProgressActor` on the driver's node, ``add(n)`` for items and ``beat(what)`` for
milestones; :func:`reported` turns its count into lines while a stage runs, and the job's
:class:`~pipelines.runtime.watchdog.Watchdog` reads its last beat.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import SupportsFloat

from pipelines.core.options import option

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ProgressOptions:
    """``--progress-seconds``, of every job."""

    progress_seconds: float | None = option(
        30.0,
        "a progress line at most this often, and one at the end of each stage",
        above=0,
        group="progress",
    )


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


class StepLine:
    """Rank 0's progress lines, readable under ``ray job submit`` (no terminal): at most
    every ``every_s`` seconds and at the end of each epoch, the step, images/s since the
    last line, the loss of the last step, and the ETA of the epoch and of the run."""

    def __init__(self, every_s: float, steps_per_epoch: int, epochs: int, first_epoch: int):
        self.every_s, self.steps_per_epoch, self.epochs = every_s, steps_per_epoch, epochs
        self.left_at_start = (epochs - first_epoch) * steps_per_epoch
        self.done = 0  # steps run by this process (a resumed run starts at its epoch)
        self.t_start = self.t_last = time.monotonic()
        self.images_since = 0

    def step(self, epoch: int, step_in_epoch: int, images: int, loss: SupportsFloat,
             end_of_epoch: bool = False) -> str | None:  # fmt: skip
        """Count a step; returns the line when one is due (and logs it)."""
        self.done += 1
        self.images_since += images
        now = time.monotonic()
        if now - self.t_last < self.every_s and not end_of_epoch:
            return None
        rate = self.images_since / max(now - self.t_last, 1e-9)
        per_step = (now - self.t_start) / self.done
        epoch_left = (self.steps_per_epoch - step_in_epoch) * per_step
        run_left = (self.left_at_start - self.done) * per_step
        line = (
            f"epoch {epoch + 1}/{self.epochs} step {step_in_epoch}/{self.steps_per_epoch}: "
            f"{rate:.1f} img/s, loss {float(loss):.4f}, epoch ETA {duration(epoch_left)}, "
            f"run ETA {duration(run_left)}"
        )  # float(loss): one host sync per line, not per step
        log.info("%s", line)
        self.t_last, self.images_since = now, 0
        return line


class ProgressActor:
    """A tiny Ray actor (no CPU) that tasks and workers report to: ``add(n)`` items done
    (Ray Data tasks, one call per batch), ``beat(what)`` a milestone (training rank 0's steps).
    The driver reads ``count()`` for its lines and ``last()`` (wall time, what) for its
    watchdog."""

    def __init__(self) -> None:
        self.n = 0
        self.at, self.what = time.time(), "started"

    def add(self, n: int) -> None:
        self.n += int(n)

    def beat(self, what: str) -> None:
        self.at, self.what = time.time(), what

    def count(self) -> int:
        return self.n

    def last(self) -> tuple[float, str]:
        return self.at, self.what


def progress_actor():
    """A :class:`ProgressActor` on the driver's own node: it lives as long as the driver, and
    a worker node lost mid-run must not take the progress reported to it along."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(ProgressActor).options(scheduling_strategy=here).remote()


def report(actor, n: int) -> None:
    """Add ``n`` items to a :class:`ProgressActor` from a task, without waiting (``None``:
    not reported)."""
    if actor is not None:
        actor.add.remote(n)


@contextmanager
def reported(
    line: RateLine, actor, poll_s: float = 2.0, final: Callable[[], int] | None = None
) -> Iterator[None]:
    """While the block runs, a thread reads ``actor``'s count and feeds ``line``; the last
    line is printed when the block ends, with ``final()`` where the job knows its exact count
    (a task's last addition may still be on its way)."""
    import ray

    stop = threading.Event()

    def read() -> int | None:
        try:
            return int(ray.get(actor.count.remote(), timeout=10))
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


@contextmanager
def counted(
    what: str, total: int, unit: str, every_s: float | None, final: Callable[[], int]
) -> Iterator[object | None]:
    """A :class:`ProgressActor` for the block's tasks to :func:`report` to, whose count becomes
    :class:`RateLine` lines (``what: done/total unit ...``) while the block runs and once, with
    ``final()``, when it ends. ``every_s`` None: no lines and no actor (yields None)."""
    if every_s is None:
        yield None
        return
    actor = progress_actor()
    with reported(RateLine(what, total, unit, every_s=every_s), actor, final=final):
        yield actor
