"""The output lease of scheduled labeling runs, on a local folder and on the real S3 server:
one holder at a time, heartbeat, takeover after expiry, a holder that lost it cannot commit."""

import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from pipelines.storage import conditional, resolve
from pipelines.storage.lease import LEASE_NAME, Lease, LeaseHeld, LeaseLost


@pytest.fixture(params=["local", "s3"])
def lease_loc(request, tmp_path):
    if request.param == "local":
        return resolve(tmp_path / "out").join(LEASE_NAME)
    return resolve(request.getfixturevalue("s3_prefix")).join(LEASE_NAME)


def test_one_holder_at_a_time_and_release(lease_loc):
    with Lease(lease_loc, "run-a", ttl=60) as a:
        with pytest.raises(LeaseHeld, match="held by run run-a") as held:
            Lease(lease_loc, "run-b", ttl=60).try_acquire()
        assert held.value.holder.run == "run-a"
        a.check()
    assert conditional.read_tagged(lease_loc) is None  # released: the object is gone
    with Lease(lease_loc, "run-b", ttl=60) as b:
        assert b.took_over is None


def test_started_together_exactly_one_wins(lease_loc):
    leases = [Lease(lease_loc, f"run-{i}", ttl=60) for i in range(8)]

    def attempt(lease: Lease) -> bool:
        try:
            lease.try_acquire()
            return True
        except LeaseHeld:
            return False

    with ThreadPoolExecutor(8) as pool:
        won = list(pool.map(attempt, leases))
    try:
        assert sum(won) == 1, won
        winner = leases[won.index(True)]
        assert json.loads(conditional.read_tagged(lease_loc)[0])["run"] == winner.run
    finally:
        for lease, w in zip(leases, won, strict=True):
            if w:
                lease.release()


def test_heartbeat_keeps_it_and_a_dead_holder_is_taken_over(lease_loc):
    a = Lease(lease_loc, "run-a", ttl=1.5)
    a.try_acquire()
    time.sleep(3.0)  # two lease lifetimes: only the heartbeat keeps it
    with pytest.raises(LeaseHeld):
        Lease(lease_loc, "run-b", ttl=60).try_acquire()
    a.check()

    # The holder dies (no more heartbeats, never released); once expired, the next run takes
    # over, and the old holder, should it wake up, can no longer commit.
    a._stop.set()
    a._thread.join()
    time.sleep(1.6)
    b = Lease(lease_loc, "run-b", ttl=60)
    b.try_acquire()
    try:
        assert b.took_over is not None and b.took_over.run == "run-a"
        with pytest.raises(LeaseLost, match="took the lease over"):
            a.check()
        a.release()  # must not delete b's lease
        b.check()
        assert json.loads(conditional.read_tagged(lease_loc)[0])["run"] == "run-b"
    finally:
        b.release()


def test_garbage_lease_object_counts_as_expired(lease_loc):
    lease_loc.write_bytes(b"{half a lease")
    with Lease(lease_loc, "run-c", ttl=60) as c:
        assert c.took_over is None
        c.check()
