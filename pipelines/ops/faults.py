"""Named fault points for the test suite. Where a test needs a job to die or pause at one exact
place (halfway through a commit, between two shard writes, at a training step), the product
calls a point by name here and the test arms it through the environment::

    LANE_FAULTS="label.exit_mid_commit=1,ingest.pause_after_shard=20"

Unarmed, as always outside the tests, a point costs one lookup. The variable reaches a job's
Ray workers through the runtime environment the job starts them with (:func:`runtime_env`).
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

ENV = "LANE_FAULTS"
#: Every point, and what arming it does.
POINTS = {
    "ingest.pause_after_shard": "each shard write then pauses VALUE seconds",
    "label.exit_after_write": "the labeling driver exits 137 once a chunk's staging is written",
    "label.exit_mid_commit": "the labeling driver exits 137 after moving VALUE files of a commit",
    "label.pause_after_commit": "the labeling driver pauses VALUE seconds after each commit",
    "train.exit_at_step": "rank 0 exits 1 at global step VALUE, once per run",
}


def _armed() -> dict[str, str]:
    spec = os.environ.get(ENV, "").strip()
    points = {}
    for item in filter(None, (i.strip() for i in spec.split(","))):
        name, _, value = item.partition("=")
        if name not in POINTS:
            raise ValueError(f"{ENV}: unknown fault point {name!r}; known: {', '.join(POINTS)}")
        points[name] = value
    return points


def armed(name: str) -> str | None:
    """The value point ``name`` is armed with ("" without one), or None when it is not."""
    if name not in POINTS:
        raise KeyError(f"unknown fault point {name!r}")
    return _armed().get(name)


def exit_process(name: str, status: int) -> None:
    """End this process at once, as a kill would: no clean-up, no flush."""
    log.warning("fault point %s: exiting with status %d", name, status)
    os._exit(status)


def runtime_env() -> dict:
    """Ray's ``runtime_env`` that carries the armed points to a job's workers ({} if none)."""
    spec = os.environ.get(ENV)
    if spec:
        _armed()  # a typo fails here, in the test, not silently in a worker
        return {"env_vars": {ENV: spec}}
    return {}
