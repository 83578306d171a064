"""Train a lane segmentation FCN with Ray Train (DDP), track it in MLflow, register the best model.

    python -m jobs.train --data URI --num-workers N [--use-gpu] --epochs E --batch-size B \\
        --experiment NAME --register-as MODEL --storage URI [--run-name NAME] ...

Run it directly (starts a local Ray) or with ``ray job submit --working-dir . -- python -m
jobs.train ...`` against a cluster. Re-running with the same ``--run-name`` and ``--storage``
resumes from the last checkpoint and continues the same MLflow run. Exit status: 0 trained and
registered; 1 training failed, 6 stalled (re-run to resume); the whole table ends ``--help``.
"""

from __future__ import annotations

import sys

from jobs import _cli
from pipelines.training.workflow import TrainConfig, run

PROG = "python -m jobs.train"
DESCRIPTION = (
    "Train an FCN on ingested lane shards with Ray Train (DDP); log to MLflow; register the "
    "best checkpoint."
)


def build_parser(defaults: dict | None = None):
    return _cli.build_parser(TrainConfig, PROG, DESCRIPTION, defaults)


def load_config(argv: list[str] | None) -> TrainConfig:
    """The options, with the values in force where a default depends on others."""
    return _cli.load_config(TrainConfig, argv, PROG, DESCRIPTION).resolved()


@_cli.cli
def main(argv: list[str] | None = None) -> int:
    return run(load_config(argv))


if __name__ == "__main__":
    sys.exit(main())
