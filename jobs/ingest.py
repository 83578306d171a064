"""Ingest raw drive data into a new version of a Parquet dataset (train/, val/, manifest.json).

    python -m jobs.ingest --source URI --dest URI [--size 1024x384] [--crop-top 690]
        [--val-fraction 0.1] [--seed N] [--keep-versions N]

The source is an ApolloScape-layout tree (ColorImage*/...jpg with Label*/..._bin.png) or a CSV
of ``image,label[,drive]`` paths. Each run writes DEST/versions/NAME/ and commits it by
replacing DEST/current.json, last. Bad records never stop the ingest: each is listed in the
manifest with its reason. Exit status: 0 committed; 2 nothing valid (not committed); 3 some
records stayed unreadable after retries (storage trouble, not bad data; not committed unless
--allow-unreadable): re-run. The whole table ends ``--help``.
"""

from __future__ import annotations

import sys

from jobs import _cli
from pipelines.data.workflow import IngestConfig, run

PROG, DESCRIPTION = "python -m jobs.ingest", "Ingest Apollo-style lane data into Parquet shards."


def build_parser(defaults: dict | None = None):
    return _cli.build_parser(IngestConfig, PROG, DESCRIPTION, defaults)


def load_config(argv: list[str] | None) -> IngestConfig:
    return _cli.load_config(IngestConfig, argv, PROG, DESCRIPTION)


@_cli.cli
def main(argv: list[str] | None = None) -> int:
    return run(load_config(argv))


if __name__ == "__main__":
    sys.exit(main())
