"""Label new drive frames with a registered model; write masks to Parquet, incrementally.

    python -m jobs.label --input URI --output URI --model models:/NAME@champion

Input: a prefix of raw frames (*.jpg / *.png, any size) or an ingested dataset. Output: Parquet
under OUTPUT/labeled_date=YYYY-MM-DD/ (schema in docs/label.md). Only inputs without a row for the
same model version are labeled, so it can run on a schedule; runs that overlap are safe (a lease
on OUTPUT: the second exits 0 naming the holder, or waits with --wait-for-lease). Exit status:
0 done (or nothing to do, or another run holds the lease); 3 some frames were deferred after
storage errors (the next run labels them); 6 stalled; the whole table ends ``--help``.
"""

from __future__ import annotations

import sys

from jobs import _cli
from pipelines.labeling.workflow import LabelConfig, run

PROG = "python -m jobs.label"
DESCRIPTION = "Batch-label frames with a registered lane model (Ray Data, one model per actor)."


def build_parser(defaults: dict | None = None):
    return _cli.build_parser(LabelConfig, PROG, DESCRIPTION, defaults)


def load_config(argv: list[str] | None) -> LabelConfig:
    return _cli.load_config(LabelConfig, argv, PROG, DESCRIPTION)


@_cli.cli
def main(argv: list[str] | None = None) -> int:
    return run(load_config(argv))


if __name__ == "__main__":
    sys.exit(main())
