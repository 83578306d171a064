"""Promote a registered model version to an alias (default ``champion``) only when it is better.

    python -m jobs.promote --model NAME --candidate VERSION|latest --eval-data URI \\
        [--alias champion] [--min-gain 0.0] [--actors N] [--use-gpu]
    python -m jobs.promote --model NAME --rollback [--alias champion]

Both the candidate and the current alias holder are evaluated on the same shards with the
training metric code, on the cluster (Ray Data over a pool of model actors, a GPU each when the
cluster has GPUs; the driver only sums confusion matrices). Each result is recorded as tags on
its version and as an MLflow evaluation run, so the MLflow UI compares candidate and holder.
The alias moves by compare-and-swap: only if it still points at the version evaluated against.
Exit status: 0 the candidate holds the alias (promoted now, or already), 4 not better, 5 the
alias moved meanwhile; the whole table (the same for every job) ends ``--help``.
"""

from __future__ import annotations

import sys

from jobs import _cli
from pipelines.registry.workflow import NOT_PROMOTED, PromoteConfig, run

__all__ = ["NOT_PROMOTED", "main"]
PROG = "python -m jobs.promote"
DESCRIPTION = (
    "Evaluate a candidate model version against the alias holder; move the alias if it is better."
)


def build_parser(defaults: dict | None = None):
    return _cli.build_parser(PromoteConfig, PROG, DESCRIPTION, defaults)


def load_config(argv: list[str] | None) -> PromoteConfig:
    return _cli.load_config(PromoteConfig, argv, PROG, DESCRIPTION)


@_cli.cli
def main(argv: list[str] | None = None) -> int:
    return run(load_config(argv))


if __name__ == "__main__":
    sys.exit(main())
