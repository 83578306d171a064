"""One exit-status table for every job: in each job's --help, in the README, and what the
door returns for each class of error."""

from __future__ import annotations

import re

import pytest

from jobs import _cli, ingest, label, promote, train
from pipelines.core.errors import MEANING, Exit, TransientError, UserError, exit_status_table
from pipelines.runtime.tracking import TrackingUnreachable
from pipelines.storage import TransientStorageError
from tests.support.helpers import ROOT


@pytest.mark.parametrize("job", [ingest, train, label, promote])
def test_every_jobs_help_ends_with_the_table(job):
    assert job.build_parser().format_help().rstrip().endswith(exit_status_table())


def test_the_manual_has_the_same_table():
    readme = (ROOT / "docs" / "jobs.md").read_text()
    table = readme[readme.index("| status | meaning |") :].split("\n\n")[0]
    rows = re.findall(r"^\| (\d) \| (.+) \|$", table, re.M)
    assert {Exit(int(code)): meaning for code, meaning in rows} == MEANING


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (UserError("bad --flag"), 2),
        (FileNotFoundError("no such file: x"), 2),
        (TransientError("try later"), 3),
        (TransientStorageError("s3://b/x: SlowDown after 5 attempts"), 3),
        (TrackingUnreachable("MLflow tracking server http://h is not reachable"), 3),
    ],
)
def test_the_door_maps_each_expected_failure_to_its_status(error, status, capsys):
    @_cli.cli
    def main(argv):
        raise error

    assert main([]) == status
    assert capsys.readouterr().err == f"error: {error}\n"


def test_an_unexpected_failure_is_a_traceback_not_a_status():
    """Python then exits 1: the only way a job exits 1."""

    @_cli.cli
    def main(argv):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        main([])


def test_an_expected_failure_raised_in_a_ray_worker_is_still_one_line(ray_cluster, capsys):
    """Ray re-raises a worker's exception wrapped (RayTaskError, with the worker's traceback
    in its text); the door finds the expected failure inside and prints only its line."""
    from pipelines.core.errors import BrokenGpuError

    @ray_cluster.remote
    def actor_start():
        raise BrokenGpuError("Ray gave this process GPU 0 but torch cannot use it")

    @_cli.cli
    def main(argv):
        ray_cluster.get(actor_start.remote())

    assert main([]) == 7
    assert capsys.readouterr().err == (
        "error: Ray gave this process GPU 0 but torch cannot use it\n"
    )


def test_an_expected_failure_ray_kept_only_as_text_is_rebuilt(capsys):
    """An actor whose __init__ raised reaches the driver as ActorDiedError, with the original
    exception only in its text (Ray 2.60)."""

    @_cli.cli
    def main(argv):
        raise RuntimeError(
            "The actor died because of an error raised in its creation task, ray::MapWorker\n"
            "    raise BrokenGpuError(\n"
            "pipelines.core.errors.BrokenGpuError: Ray gave this process GPU 0 but torch cannot"
            " use it\n"
        )

    assert main([]) == 7
    assert capsys.readouterr().err == "error: Ray gave this process GPU 0 but torch cannot use it\n"
