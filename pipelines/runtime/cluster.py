"""Connecting a job to Ray: the cluster ``ray job submit`` runs it on (``RAY_ADDRESS``), or a
local one it starts itself. Token authentication stays on: local clusters generate a token,
remote clusters need ``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``.
"""

from __future__ import annotations

import logging
import os
import sys

from pipelines.runtime import faults


def init_ray(min_cpus: int = 0) -> str:
    """Connect to the Ray cluster (``RAY_ADDRESS``) or start a local one; returns which:
    "existing" (this process is connected already), "cluster" or "local"."""
    import ray

    if ray.is_initialized():
        return "existing"
    ray_logging = {"logging_level": logging.WARNING, "log_to_driver": True}
    runtime_env = faults.runtime_env() or None  # the tests' armed fault points, for the workers
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=runtime_env, **ray_logging)
        return "cluster"
    # Local: enough logical CPUs for the train workers plus Ray Data's decoding tasks.
    # The dashboard (127.0.0.1 only) also serves the state API that Ray Train queries.
    # address="local": a new local Ray, even when `ray start` left one running on this
    # machine (plain ray.init() would join that one instead; set RAY_ADDRESS to do that).
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, min_cpus),
             runtime_env=runtime_env, **ray_logging)  # fmt: skip
    return "local"


def _bars_off_on_purpose(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Progress bars disabled.")


def quiet_ray_data() -> None:
    """Ray Data's progress bars on a terminal only; without one (``ray job submit``, a CronJob)
    the jobs print their own one-line progress instead of Ray Data's multi-line reports."""
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty()
    ctx.print_on_execution_start = False
    if not sys.stderr.isatty():
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        # Ray Data then warns, once per process, that its bars are off: they are, on purpose.
        logging.getLogger("ray.data._internal.progress").addFilter(_bars_off_on_purpose)
