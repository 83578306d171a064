"""Glue shared by the job entry points: YAML config files, connecting to Ray, and turning bad
input into one clear line instead of a stack trace."""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
from collections.abc import Callable

import yaml

from pipelines.errors import UserError

log = logging.getLogger("jobs")


class ConfigError(UserError):
    """Bad job arguments or config file."""


USER_ERRORS = (UserError, FileNotFoundError)


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``; with ``--config FILE`` (YAML, keys spelled like the flags), the file
    gives the defaults and flags on the command line override it."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        try:
            with open(known.config) as f:
                values = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"--config {known.config}: cannot read YAML ({e})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"--config {known.config}: expected a mapping of option: value")
        dests = {a.dest: a for a in parser._actions}
        defaults = {}
        for key, value in values.items():
            dest = str(key).replace("-", "_")
            if dest not in dests or dest in ("help", "config"):
                raise ConfigError(f"--config {known.config}: unknown option {key!r}")
            defaults[dest] = value
        parser.set_defaults(**defaults)
        # A value from the file satisfies a required flag.
        for dest in defaults:
            dests[dest].required = False
    return parser.parse_args(argv)


def add_actor_pool_args(p) -> None:
    """``--batch-size``, ``--actors`` and ``--use-gpu`` of the jobs that run a pool of model
    actors (labeling, promotion's evaluation); sized by ``capacity.plan_actor_pool``."""
    p.add_argument("--batch-size", type=int, default=8, help="frames per model call")
    p.add_argument(
        "--actors", type=int, default=None, help="model replicas (default: one per GPU, else 1)"
    )
    p.add_argument(
        "--use-gpu",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one GPU per model actor (default: when the cluster has GPUs now; pass --use-gpu "
        "for GPU workers that autoscale from zero)",
    )


def add_progress_arg(p, what: str) -> None:
    """``--progress-seconds`` (every job prints progress lines without a terminal)."""
    p.add_argument(
        "--progress-seconds",
        type=float,
        default=30.0,
        help=f"a progress line ({what}) at most this often",
    )


def init_ray(min_cpus: int = 0) -> str:
    """Connect to the Ray cluster (``RAY_ADDRESS``, set by ``ray job submit``) or start a local
    one. Token authentication stays on: local clusters generate a token, remote clusters
    need ``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``."""
    import ray

    if ray.is_initialized():
        return "existing"
    ray_logging = {"logging_level": logging.WARNING, "log_to_driver": True}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **ray_logging)
        return "cluster"
    # Local: enough logical CPUs for the train workers plus Ray Data's decoding tasks.
    # The dashboard (127.0.0.1 only) also serves the state API that Ray Train queries.
    # address="local": a new local Ray, even when `ray start` left one running on this
    # machine (plain ray.init() would join that one instead; set RAY_ADDRESS to do that).
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, min_cpus), **ray_logging)
    return "local"


def quiet_ray_data() -> None:
    import ray

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty()
    ctx.print_on_execution_start = False
    if not sys.stderr.isatty():
        # Without a terminal Ray Data logs a multi-line progress report every few seconds;
        # the jobs print their own one-line summaries instead.
        logging.getLogger("ray.data").setLevel(logging.WARNING)


def cli(main: Callable[[list[str] | None], int]) -> Callable[[list[str] | None], int]:
    """Run ``main``; user errors print ``error: ...`` on one line and exit with status 2."""

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
        try:
            return main(argv)
        except USER_ERRORS as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return wrapper
