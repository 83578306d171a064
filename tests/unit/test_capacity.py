"""Fitting jobs to small clusters, and the stall watchdog, without Ray."""

import signal
import threading
import time

import pytest

from pipelines.runtime.capacity import (
    DATA_CPUS,
    CapacityError,
    Cluster,
    check_reader,
    fit_actor_pool,
    fit_training,
    withdraw,
)
from pipelines.runtime.watchdog import Stalled, Watchdog

HEAD = Cluster(cpus=2, gpus=0, source="the Ray cluster")


def test_training_fits_by_fractional_cpus_leaving_one_for_data():
    # The user's report: 2 workers on a 2-CPU head left nothing for the data pipeline.
    cpus, note = fit_training(HEAD, 2, 1.0, explicit=False)
    assert cpus == 0.5 and 2 * cpus + DATA_CPUS <= HEAD.cpus
    assert "2 workers x 0.5 CPU (not 1) + 1 CPU for the data pipeline" in note
    assert fit_training(Cluster(8, 0, "x"), 2, 1.0, explicit=False) == (1.0, None)
    cpus, _ = fit_training(Cluster(4, 0, "x"), 3, 1.0, explicit=False)
    assert cpus == 1.0  # 3 x 1 + 1 = 4 fits exactly
    cpus, _ = fit_training(Cluster(4, 0, "x"), 6, 1.0, explicit=False)
    assert cpus == 0.5 and 6 * cpus + DATA_CPUS <= 4


def test_training_that_cannot_fit_names_cpus_and_the_fix():
    with pytest.raises(CapacityError) as e:
        fit_training(HEAD, 2, 1.0, explicit=True)  # --cpus-per-worker given: kept
    msg = str(e.value)
    assert "need 3 CPUs; the cluster has 2 CPUs (the Ray cluster)" in msg
    assert "Lower --cpus-per-worker or --num-workers" in msg and "--cluster-cpus" in msg
    with pytest.raises(CapacityError, match="Lower --num-workers to at most 2, or add nodes"):
        fit_training(Cluster(1.5, 0, "the Ray cluster"), 4, 1.0, explicit=False)
    with pytest.raises(CapacityError, match="Add nodes: a training job needs at least 1.25 CPUs"):
        fit_training(Cluster(1, 0, "--cluster-cpus"), 1, 1.0, explicit=False)


def test_actor_pools_shrink_to_leave_a_reader_cpu():
    assert fit_actor_pool(Cluster(8, 0, "x"), 4, use_gpu=False, explicit=False) == (4, None)
    actors, note = fit_actor_pool(HEAD, 3, use_gpu=False, explicit=False)
    assert actors == 1 and "1 model actors (not 3)" in note
    with pytest.raises(CapacityError, match=r"need 4 CPUs; the cluster has 2 CPUs.*--actors to 1"):
        fit_actor_pool(HEAD, 3, use_gpu=False, explicit=True)
    with pytest.raises(CapacityError, match="Add nodes"):
        fit_actor_pool(Cluster(1, 0, "x"), 1, use_gpu=False, explicit=False)
    with pytest.raises(
        CapacityError, match="2 GPU actors need 2 GPUs; the cluster has 4 CPUs and 1 GPUs"
    ):
        fit_actor_pool(Cluster(4, 1, "x"), 2, use_gpu=True, explicit=True)
    with pytest.raises(CapacityError, match="reading the evaluation data needs 1 CPU"):
        check_reader(Cluster(0, 1, "x"))


def test_watchdog_interrupts_a_job_started_with_sigint_ignored():
    # nohup, a CI runner or a shell's background job start the process with SIGINT ignored; the
    # watchdog must still end the wait, and leave SIGINT and its own signal as it found them.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        start = time.monotonic()
        with pytest.raises(Stalled, match="job: no progress"), Watchdog(0.5, "job"):
            threading.Event().wait(30)
        assert time.monotonic() - start < 10
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGUSR2) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGINT, previous)


def test_watchdog_interrupts_a_stalled_wait_and_lets_progress_run():
    # Beats keep it quiet...
    with Watchdog(1.0, "job") as dog:
        for i in range(8):
            time.sleep(0.25)
            dog.beat(f"step {i}")
    # ...and a wait with none is interrupted with the message, well before it would end.
    start = time.monotonic()
    with (
        pytest.raises(
            Stalled, match=r"job: no progress for 0\.0 minutes \(last: step 3\); giving up\. hint"
        ),
        Watchdog(1.0, "job", hint="hint") as dog,
    ):
        dog.beat("step 3")
        threading.Event().wait(30)
    assert time.monotonic() - start < 10
    # A progress source polled (a training worker's actor) counts too.
    beats = [time.time()]
    with Watchdog(1.0, "job", poll=lambda: (beats[-1], "remote")):
        for _ in range(8):
            time.sleep(0.25)
            beats.append(time.time())


def test_a_failed_withdrawal_of_the_autoscaler_request_is_a_warning(capsys):
    """The job's outcome is decided when its request is withdrawn: a GCS that does not answer
    then must not turn it into a traceback and exit 1 after the job's one-line error."""
    calls = []

    def request_resources(bundles):
        calls.append(bundles)
        raise TimeoutError("GCS did not answer in 10 s")

    withdraw(request_resources)
    assert calls == [[]]
    err = capsys.readouterr().err
    assert err.startswith("warning: could not withdraw this job's autoscaler request "
                          "(TimeoutError: GCS did not answer in 10 s)")  # fmt: skip
