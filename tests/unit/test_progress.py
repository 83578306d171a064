"""Progress lines: the format, when they are due, and the count from Ray Data tasks."""

import re

from pipelines.runtime.progress import (
    RateLine,
    duration,
    reported,
)
from pipelines.runtime.progress import (
    progress_actor as counter_actor,
)
from pipelines.runtime.progress import (
    report as count,
)


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_rate_line_is_due_every_n_seconds_and_counts_down():
    clock, lines = Clock(), []
    line = RateLine("label", 400, every_s=30, emit=lines.append, clock=clock)
    clock.t += 10
    assert line.update(50) is None  # 10 s after the start: not due
    clock.t += 30
    assert line.update(100) == "label: 100/400 frames (25%), 2.5 frames/s, ETA 2m00s"
    clock.t += 5
    assert line.update(120) is None  # 5 s after the last line
    assert line.update(120, force=True) is not None  # the end of a stage: always
    assert line.update(120, force=True) is None  # nothing new since
    clock.t += 3555
    assert line.update(400, force=True) == "label: 400/400 frames (100%), 0.1 frames/s"
    assert lines == [
        "label: 100/400 frames (25%), 2.5 frames/s, ETA 2m00s",
        "label: 120/400 frames (30%), 2.7 frames/s, ETA 1m45s",  # 280 left at 120/45 s
        "label: 400/400 frames (100%), 0.1 frames/s",
    ]
    assert [duration(s) for s in (0, 9.4, 245, 3720)] == ["0m00s", "0m09s", "4m05s", "1h02m"]


def test_tasks_count_into_the_driver_line(ray_cluster):
    """Ray Data tasks add to the counter; the driver's thread prints lines while they run
    and the exact total at the end."""
    import ray

    counter, lines = counter_actor(), []

    def work(batch, counter):
        count(counter, len(batch["id"]))
        return batch

    line = RateLine("ingest", 40, "records", every_s=0.05, emit=lines.append)
    with reported(line, counter, poll_s=0.05):
        ray.data.range(40, override_num_blocks=8).map_batches(
            work, batch_size=5, fn_kwargs={"counter": counter}
        ).materialize()
    assert lines and lines[-1].startswith("ingest: 40/40 records (100%), ")
    done = [int(re.match(r"ingest: (\d+)/", x)[1]) for x in lines]
    assert done == sorted(done)  # never goes back
