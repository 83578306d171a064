"""Named fault points: the places where the test suite injects a fault into a running job (dies
halfway through a commit, pauses between two shard writes, loses a training worker at a step).

The product only calls :func:`point` with the point's name and what it knows there. What
happens is injected from outside: the environment variable ``LANE_FAULT_HANDLER`` names a module
whose ``on_fault_point(name, **context)`` is called at every point (the suite's is
``tests.support.fault_handler``). Unset, as always outside the tests, a point costs one
environment lookup and does nothing. The ``LANE_FAULT*`` variables reach a job's Ray workers
through the runtime environment the job starts them with (:func:`runtime_env`).

Like ``PYTHONPATH``, the variable is the operator's: it is never read from a bucket or the
tracking server, and a job that has one set says so in its log.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable

log = logging.getLogger(__name__)

ENV = "LANE_FAULT_HANDLER"
#: Every point, and the context it is called with.
POINTS = {
    "ingest.shard_written": "a shard file of the new version was written (path: its URI)",
    "label.chunk_staged": "a chunk's rows are written to staging, not yet marked complete",
    "label.file_committed": "a file of a commit was moved into the output (moved: files so far)",
    "label.chunk_committed": "a chunk was committed (chunk: its number, from 0)",
    "label.device_decode": "a model actor decodes JPEGs on its device (device: which)",
    "label.predict": "a model actor predicts a batch (device: which)",
    "train.step": "rank 0 took an optimizer step (step: the run's global step; storage, "
    "run_name: where the run keeps its checkpoints)",
}
_handlers: dict[str, Callable[..., None]] = {}


def point(name: str, **context: object) -> None:
    """Fault point ``name``: calls the injected handler, if any, with ``context``."""
    if name not in POINTS:
        raise KeyError(f"unknown fault point {name!r}; known: {', '.join(POINTS)}")
    module = os.environ.get(ENV)
    if module:
        _handler(module)(name, **context)


def _handler(module: str) -> Callable[..., None]:
    if module not in _handlers:
        log.warning("fault points are handled by %s (%s is set)", module, ENV)
        _handlers[module] = importlib.import_module(module).on_fault_point
    return _handlers[module]


def runtime_env() -> dict:
    """Ray's ``runtime_env`` that carries the ``LANE_FAULT*`` variables to a job's workers
    ({} when none is set)."""
    carried = {k: v for k, v in os.environ.items() if k.startswith("LANE_FAULT")}
    return {"env_vars": carried} if carried else {}
