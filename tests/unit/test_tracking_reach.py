"""A tracking store every training node can reach: a sqlite or file store only when every
node is this machine."""

from __future__ import annotations

import pytest

from pipelines.runtime.tracking import local_store_problem


@pytest.mark.parametrize("uri", ["sqlite:////tmp/mlflow.db", "file:///tmp/mlruns"])
def test_a_local_store_is_refused_across_machines(uri):
    problem = local_store_problem(uri, {"head", "gpu-node-1"}, autoscaling=False)
    assert problem and "spans 2 machines" in problem
    assert "Set MLFLOW_TRACKING_URI to the tracking server" in problem


def test_a_local_store_is_refused_on_a_cluster_that_grows():
    problem = local_store_problem("sqlite:////tmp/mlflow.db", {"head"}, autoscaling=True)
    assert problem and "spans an autoscaling cluster" in problem


def test_a_local_store_is_fine_on_one_machine():
    """Several Ray nodes on one machine (the test suite's) share its disk."""
    assert local_store_problem("sqlite:////tmp/mlflow.db", {"laptop"}, autoscaling=False) is None


def test_a_server_is_fine_anywhere():
    assert local_store_problem("http://mlflow:5000", {"a", "b"}, autoscaling=True) is None
