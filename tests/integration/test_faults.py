"""Faults injected into running jobs, with real processes on 127.0.0.1: concurrent promotions
(and the registry lock they share)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import mlflow
import pytest
from mlflow import MlflowClient

from pipelines.registry import aliases
from pipelines.registry.versions import RegistryError
from pipelines.runtime import tracking
from tests.support.helpers import ROOT, job_env, start_job
from tests.support.models import TEST_MODEL, register_test_model

MODEL = "lanes-faults-test"


# -- promotion: compare-and-swap -----------------------------------------------------------------
def test_alias_lock_excludes_waits_and_clears_a_stale_one(mlflow_store, monkeypatch):
    client = MlflowClient()
    client.create_registered_model(MODEL)
    lock = aliases.LOCK_NAME.format(name=MODEL, alias="champion")
    with aliases.alias_lock(MODEL, "champion", client):
        assert client.get_registered_model(lock)  # held: the lock model exists
        start = time.monotonic()
        with (
            pytest.raises(RegistryError, match=f"another promotion or rollback holds {lock}"),
            aliases.alias_lock(MODEL, "champion", client, wait_s=1.0),
        ):
            pass
        assert time.monotonic() - start >= 1.0  # it waited before giving up
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_registered_model(lock)  # released
    # One left behind by a killed job: removed once older than the TTL, then taken.
    client.create_registered_model(lock)
    monkeypatch.setattr(aliases, "LOCK_TTL_S", 0.0)
    with aliases.alias_lock(MODEL, "champion", client, wait_s=0.0):
        pass


def test_alias_moves_only_from_the_holder_it_was_evaluated_against(mlflow_store, tmp_path):
    client = MlflowClient()
    client.create_registered_model(MODEL)
    # Versions without weights: moving aliases never reads them.
    v1, v2, v3 = (
        str(client.create_model_version(MODEL, source=tmp_path.as_uri()).version) for _ in range(3)
    )
    assert aliases.move_alias(MODEL, "champion", v1, client, expected=None) is None
    with pytest.raises(aliases.AliasMoved, match=f"moved from nothing to v{v1}"):
        aliases.move_alias(MODEL, "champion", v2, client, expected=None)
    assert aliases.move_alias(MODEL, "champion", v3, client, expected=v1) == v1
    with pytest.raises(aliases.AliasMoved, match=f"moved from v{v1} to v{v3}"):
        aliases.move_alias(MODEL, "champion", v2, client, expected=v1)
    aliases.rollback_alias(MODEL, "champion", client)
    history = aliases.alias_history(MODEL, "champion", client)
    assert [(h["version"], h["previous"], h["how"]) for h in history] == [
        (v1, None, "promote"),
        (v3, v1, "promote"),
        (v1, v3, "rollback"),
    ]


@pytest.fixture(scope="module")
def race(local_shards, ray_cluster, tmp_path_factory, test_transform):
    """Two promote jobs started together, each with a candidate better than the holder: both
    evaluate against v1; the first to finish moves the alias, the other finds it moved (the
    compare-and-swap). Returns (holder, candidates, exit statuses, outputs, store)."""
    tmp = tmp_path_factory.mktemp("race")
    store, canary = f"sqlite:///{tmp / 'mlflow.db'}", tmp / "planted-pickle-ran"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", store)
        mlflow.set_tracking_uri(store)
        mlflow.set_registry_uri(store)
        # All "dividing": scores next to nothing; the candidates, all background, beat it.
        holder = register_test_model(store, tmp, MODEL, test_transform, canary, 1)
        candidates = [register_test_model(store, tmp, MODEL, test_transform, canary, 0, seed=s)
                      for s in (1, 2)]  # fmt: skip
        aliases.move_alias(MODEL, "champion", holder, MlflowClient(store, store))
        procs = [
            start_job(
                "jobs.promote", "--model", MODEL, "--candidate", c, "--eval-data", local_shards
            )
            for c in candidates
        ]
        outs = [p.communicate(timeout=600)[0] for p in procs]
    assert not canary.exists(), "a promotion unpickled a registered version's python_model.pkl"
    return holder, candidates, [p.returncode for p in procs], outs, MlflowClient(store, store)


@pytest.mark.slow
def test_of_two_promotions_at_once_one_wins_and_the_other_lost_a_race(race):
    holder, candidates, codes, outs, _ = race
    assert sorted(codes) == [0, 5], outs  # 5: lost the race
    winner = candidates[codes.index(0)]
    assert f"promoted v{winner} to champion" in outs[codes.index(0)]


@pytest.mark.slow
def test_the_loser_says_who_moved_the_alias_meanwhile(race):
    holder, candidates, codes, outs, _ = race
    winner, loser = candidates[codes.index(0)], candidates[codes.index(5)]
    lost = outs[codes.index(5)]
    assert f"champion was moved from v{holder} to v{winner} meanwhile" in lost, lost
    assert f"while v{loser} was evaluated against v{holder}" in lost


@pytest.mark.slow
def test_after_the_race_the_history_holds_one_move(race):
    holder, candidates, codes, _, client = race
    winner = candidates[codes.index(0)]
    assert str(client.get_model_version_by_alias(MODEL, "champion").version) == winner
    model = client.get_registered_model(MODEL)
    assert model.tags[aliases.PREVIOUS_ALIAS_TAG.format(alias="champion")] == holder
    history = json.loads(model.tags[aliases.HISTORY_TAG.format(alias="champion")])
    assert [(h["version"], h["previous"]) for h in history] == [(holder, None), (winner, holder)]


@pytest.mark.slow
def test_the_loser_is_tagged_not_promoted_and_the_lock_is_gone(race):
    _, candidates, codes, _, client = race
    tag = client.get_model_version(MODEL, candidates[codes.index(5)]).tags["promotion_champion"]
    assert tag.startswith("not promoted:")
    # The lock is gone: the next promotion or rollback goes ahead.
    assert not client.search_registered_models(
        f"name = '{aliases.LOCK_NAME.format(name=MODEL, alias='champion')}'"
    )


# -- training: a job that would wait forever ends with a clear error -----------------------------
@pytest.mark.slow
def test_training_that_cannot_get_data_cpus_is_ended_by_its_watchdog(
    tmp_path, local_shards, mlflow_store, ray_cluster
):
    """Two workers of 2 CPUs each, told the cluster can grow to 5: they take all 4 CPUs of the
    session's cluster, and Ray Data's read tasks wait for a CPU that never comes (the user's
    report, where the job hung with no error). The watchdog ends the job: exit 6, one error
    naming the stall and the cluster's real size, the resume message, the MLflow run FAILED.
    Its own process, so that its driver's exit frees the cluster for the next tests."""
    argv = ["--data", local_shards, "--storage", str(tmp_path / "ckpt"), "--run-name", "stuck",
            "--experiment", "faults", "--register-as", MODEL, "--num-workers", "2",
            "--batch-size", "4", "--epochs", "1", "--no-augment",
            "--cpus-per-worker", "2", "--cluster-cpus", "5", "--stall-minutes", "0.2",
            "--model", TEST_MODEL]  # fmt: skip
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.train", *argv],
        cwd=ROOT, env=job_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    took = time.monotonic() - start
    err = proc.stderr
    assert proc.returncode == 6, err[-4000:]  # stalled
    assert "error: training: no progress for 0.2 minutes (last: started); giving up." in err, err[
        -4000:
    ]
    assert "The cluster has 4 CPUs (the Ray cluster)" in err  # not the 5 it was told
    assert "re-run the same command (--run-name stuck) to resume" in err
    assert took < 120  # 12 s of stall, plus starting and stopping
    [run] = MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name("faults").experiment_id]
    )
    assert run.info.status == "FAILED"


# -- training: a Ray node lost mid-training ------------------------------------------------------
@pytest.fixture(scope="module")
def node_loss(local_shards, tmp_path_factory):
    """A head with no CPUs (as on KubeRay) and one 2-CPU worker node, in their own processes
    on 127.0.0.1; two DDP workers on that node. Once Ray Train has recorded epoch 0's
    checkpoint the node is killed outright (every process of it, SIGKILL); 5 s later a new node
    joins. Returns (exit status, output, MLflow client, run)."""
    tmp = tmp_path_factory.mktemp("node-loss")
    store = f"sqlite:///{tmp / 'mlflow.db'}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["MLFLOW_TRACKING_URI"] = store
    nodes = subprocess.Popen(
        [sys.executable, "-m", "tests.support.ray_nodes", "--head-cpus", "0", "--node-cpus", "2"],
        cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip

    def command(line: str) -> str:
        nodes.stdin.write(line + "\n")
        nodes.stdin.flush()
        return nodes.stdout.readline().strip()

    job, storage = None, tmp / "ckpt"
    try:
        address = nodes.stdout.readline().strip().removeprefix("address ")
        assert address.startswith("127.0.0.1:"), address
        argv = ["--data", local_shards, "--storage", str(storage), "--run-name", "node-loss",
                "--experiment", "faults", "--register-as", MODEL, "--num-workers", "2",
                "--batch-size", "4", "--epochs", "2", "--no-augment", "--max-failures", "1",
                "--model", TEST_MODEL]  # fmt: skip
        job = subprocess.Popen(
            [sys.executable, "-m", "jobs.train", *argv], cwd=ROOT,
            env={**env, "RAY_ADDRESS": address}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        # Ray Train's own record of a checkpoint (one that is only uploaded is not resumed).
        recorded = storage / "node-loss" / "checkpoint_manager_snapshot.json"
        deadline = time.monotonic() + 300
        while not recorded.exists():
            assert job.poll() is None, job.communicate()[0][-4000:]
            assert time.monotonic() < deadline, "no checkpoint recorded after 300 s"
            time.sleep(0.2)
        assert command("kill").startswith("killed ")
        time.sleep(5)  # no node that could run the workers
        assert job.poll() is None, job.communicate()[0][-4000:]  # it waits, it does not fail
        assert command("add").startswith("added ")
        out = job.communicate(timeout=600)[0]
    finally:
        if job is not None and job.poll() is None:
            job.kill()
            job.wait()
        command("quit")
        nodes.wait(timeout=60)
    client = MlflowClient(store, store)
    [run] = client.search_runs([client.get_experiment_by_name("faults").experiment_id])
    return job.returncode, out, client, run


@pytest.mark.slow
def test_training_resumes_when_a_lost_node_is_back_and_registers(node_loss):
    status, out, _, run = node_loss
    assert status == 0, out[-4000:]
    assert "registered models:/" in out
    assert run.info.status == "FINISHED"


@pytest.mark.slow
def test_the_lost_workers_are_restarted_under_the_watchdog(node_loss):
    _, out, _, _ = node_loss
    assert "[FailurePolicy] RETRY" in out  # the workers were lost, and restarted
    assert "cannot read progress" not in out, out[-4000:]  # the watchdog's actor survived


@pytest.mark.slow
def test_after_the_node_loss_each_epoch_is_logged_once(node_loss):
    """Epoch 0 was trained once: the restart resumed from its checkpoint; the lost rank 0's
    unsent pictures were re-sent from the checkpoint, none twice."""
    _, _, client, run = node_loss
    for key in ("val_miou", "train_loss"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0, 1], key
    for key in ("confusion", "overlays"):  # one image per epoch, none twice
        assert tracking.image_steps(client, run.info.run_id, key) == {0, 1}, key
    assert len(client.list_artifacts(run.info.run_id, "images")) == 2 * 2 * 2  # + thumbnails
