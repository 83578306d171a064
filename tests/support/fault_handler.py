"""The suite's fault handler (``LANE_FAULT_HANDLER``, :mod:`pipelines.runtime.faults`): what a
job does at each fault point that a test arms, read from ``LANE_FAULTS``, e.g.
``LANE_FAULTS="label.file_committed=1,ingest.shard_written=20"`` (:func:`fault_env` sets both):

- ``ingest.shard_written=S``: pause S seconds after each shard write;
- ``label.chunk_staged``: exit 137 (as a kill would) once a chunk's staging is written;
- ``label.file_committed=N``: exit 137 after moving the N-th file of a commit;
- ``label.chunk_committed=S``: pause S seconds after each commit;
- ``label.device_decode=N``, ``label.predict=N``: from the N-th such call of a model actor
  on, CUDA's sticky "illegal memory access" (``torch.AcceleratorError``), as a GPU that fails
  mid-run raises;
- ``train.step=N``: rank 0 exits 1 at global step N, once per run (a marker in the run's
  storage), after Ray Train has registered the run's last checkpoint.

A misspelt point fails the job loudly instead of arming nothing.
"""

from __future__ import annotations

import json
import logging
import os
import time

from pipelines.runtime import faults

log = logging.getLogger(__name__)

SPEC = "LANE_FAULTS"
#: Marks, in the run's storage, that ``train.step`` has fired for the run.
FAULT_MARKER = ".fault-exit-at-step-done"
#: Ray Train's record of the checkpoints its controller registered (Ray 2.60, Train v2).
CHECKPOINT_SNAPSHOT = "checkpoint_manager_snapshot.json"
#: Calls of ``label.device_decode`` and ``label.predict`` seen by this process.
_calls: dict[str, int] = {}


def fault_env(spec: str) -> dict[str, str]:
    """The environment that arms ``spec`` in a job (and, through it, its Ray workers)."""
    armed(spec)  # a misspelt point fails in the test that wrote it
    return {faults.ENV: __name__, SPEC: spec}


def armed(spec: str | None = None) -> dict[str, str]:
    """{point: value} of ``spec`` (default: ``LANE_FAULTS``)."""
    spec = os.environ.get(SPEC, "") if spec is None else spec
    points = {}
    for item in filter(None, (i.strip() for i in spec.split(","))):
        name, _, value = item.partition("=")
        if name not in faults.POINTS:
            raise ValueError(
                f"{SPEC}: unknown fault point {name!r}; known: {', '.join(faults.POINTS)}"
            )
        points[name] = value
    return points


def on_fault_point(name: str, **context) -> None:
    value = armed().get(name)
    if value is None:
        return
    if name in ("ingest.shard_written", "label.chunk_committed"):
        time.sleep(float(value))
    elif name == "label.chunk_staged" or (
        name == "label.file_committed" and context["moved"] >= int(value)
    ):
        die(name, 137)
    elif name in ("label.device_decode", "label.predict"):
        _calls[name] = _calls.get(name, 0) + 1
        if _calls[name] >= int(value):
            import torch

            raise torch.AcceleratorError(
                "CUDA error: an illegal memory access was encountered (injected at fault point "
                f"{name} on {context['device']})"
            )
    elif name == "train.step" and context["step"] == int(value):
        exit_once_per_run(context["storage"], context["run_name"], context["step"])


def exit_once_per_run(storage: str, run_name: str, step: int) -> None:
    """The worker dies *after* the checkpoint before it was recorded: Ray Train's controller
    registers a reported checkpoint when it next polls the workers (every 2 s, later on a
    loaded machine), and a death before that loses the registration (the re-run would start
    from scratch). So it waits for the controller's snapshot to list one, then exits."""
    from pipelines.storage import resolve

    run = resolve(storage).join(run_name)
    marker = run.join(FAULT_MARKER)
    if marker.exists():
        return
    marker.write_text(f"failed at step {step}\n")
    snapshot, deadline = run.join(CHECKPOINT_SNAPSHOT), time.monotonic() + 120
    while time.monotonic() < deadline:
        if snapshot.exists() and json.loads(snapshot.read_text()).get("checkpoint_results"):
            break
        time.sleep(0.5)
    else:
        raise TimeoutError(f"{snapshot.uri}: no registered checkpoint after 120 s")
    die("train.step", 1)


def die(name: str, status: int) -> None:
    """End this process at once, as a kill would: no clean-up, no flush."""
    log.warning("fault point %s: exiting with status %d", name, status)
    os._exit(status)
