"""Whether a cluster can grow decides whether a job larger than it waits for nodes or is
refused at once: a laptop or a cluster started by hand has an autoscaler too (a read-only
one), and a job on it must never wait out --provision-timeout for nodes that cannot come.
(The cluster that does grow is tests/integration/test_autoscaling.py.)"""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.support.autoscaling import AutoscalingRay
from tests.support.helpers import ROOT

pytestmark = pytest.mark.slow


def _reported(gcs_address: str, timeout_s: float = 60.0) -> dict:
    from pipelines import compat

    deadline = time.monotonic() + timeout_s
    while (state := compat.autoscaler_state(gcs_address)) is None:
        assert time.monotonic() < deadline, "the autoscaler never reported"
        time.sleep(0.5)
    return state


def test_a_laptop_cluster_is_read_only_and_cannot_grow(ray_cluster):
    from pipelines.runtime import capacity

    # Once its (v1) autoscaler has reported, not before: without a report it is fixed anyway.
    state = _reported(ray_cluster.get_runtime_context().gcs_address)
    assert state["readonly"], state
    assert not capacity.cluster().autoscaling


# A driver on the hand-started cluster, once its (v2) autoscaler reports: three 1-CPU training
# workers and the data pipeline's CPU on a 2-CPU head.
DRIVER = """
import sys, time, ray
from tests.integration.test_cluster_growth import _reported
from pipelines.runtime import capacity
ray.init(address=sys.argv[1], logging_level="ERROR")
_reported(sys.argv[1])
start = time.monotonic()
try:
    with capacity.training_workers(3, None, False, cluster_cpus=None, timeout_s=300) as got:
        print("granted", got)
except capacity.CapacityError as e:
    print(f"refused after {time.monotonic() - start:.0f}s: {e}")
"""


@pytest.fixture(scope="module")
def hand_started():
    cluster = AutoscalingRay({}).start_read_only(cpus=2)
    try:
        yield cluster
    finally:
        cluster.stop()


def test_a_job_larger_than_a_hand_started_v2_cluster_is_refused_at_once(hand_started):
    out = subprocess.run(
        [sys.executable, "-c", DRIVER, hand_started.address], cwd=ROOT, env=hand_started.env(),
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert "refused after" in out.stdout, out.stdout + out.stderr[-3000:]
    seconds = int(out.stdout.split("refused after ")[1].split("s:")[0])
    assert seconds < 60, out.stdout  # the autoscaler's answer, not the 300 s timeout
    assert "infeasible; the cluster has 2 CPUs (the Ray cluster)" in out.stdout, out.stdout
