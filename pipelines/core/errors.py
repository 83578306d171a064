"""The jobs' exit statuses, one table for all of them, and the errors that end a job with one.

A job prints an expected failure as one line, ``error: <message>``, and exits with the status
of its class, so each message must name the file/flag and say what was expected. Anything else
is a bug or a crash: Python's traceback and status 1, and nothing else ever exits 1, so an
automation can tell "retry later" (3) and "not better" (4) from "look at this" (1).
"""

from __future__ import annotations

import textwrap
from enum import IntEnum


class Exit(IntEnum):
    OK = 0
    FAILED = 1
    BAD_INPUT = 2
    TRANSIENT = 3
    NOT_PROMOTED = 4
    LOST_RACE = 5
    STALLED = 6
    BROKEN_GPU = 7


#: What each status means, as every job's ``--help`` and docs/jobs.md list it.
MEANING = {
    Exit.OK: "done, or nothing to do (no new frames, another run holds the output's lease, "
    "the candidate already holds the alias)",
    Exit.FAILED: "an unexpected failure (a bug or a crash: see the traceback above it)",
    Exit.BAD_INPUT: "bad flags, config, data or model reference, or a request no node type "
    "of the cluster can ever satisfy: fix the command",
    Exit.TRANSIENT: "transient: storage or tracking server unreachable, frames deferred, "
    "nodes not provisioned in time: re-run later (training resumes)",
    Exit.NOT_PROMOTED: "promotion: the candidate is not better than the alias holder",
    Exit.LOST_RACE: "promotion: another promotion moved the alias meanwhile: re-run against "
    "the new holder",
    Exit.STALLED: "no progress for --stall-minutes (committed work is kept: re-run)",
    Exit.BROKEN_GPU: "a node Ray gave a GPU cannot use it (CUDA driver too old or missing), "
    "or the GPU failed mid-run (a CUDA error)",
}


def exit_status_table() -> str:
    """The table, one status a line (for ``--help``)."""
    rows = (
        textwrap.fill(MEANING[c], 79, initial_indent=f"  {int(c)}  ", subsequent_indent="     ")
        for c in Exit
    )
    return "exit status:\n" + "\n".join(rows)


class UserError(ValueError):
    """Bad input, arguments or environment; the message is shown to the user as it is."""

    exit_code: Exit = Exit.BAD_INPUT


class TransientError(UserError):
    """Something outside the job failed for now (storage, tracking server, provisioning):
    the same command later can succeed."""

    exit_code = Exit.TRANSIENT


class BrokenGpuError(UserError):
    """Ray gave this process a GPU that CUDA cannot use, or the GPU failed while in use."""

    exit_code = Exit.BROKEN_GPU
