"""The local stack as a user runs it: infra/local/start.sh (Ray head with token authentication
and an MLflow server, separate processes), `ray job submit` typed as in the README, then
infra/local/stop.sh."""

import json
import os
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient

from .conftest import ROOT, free_port

START, STOP = ROOT / "infra/local/start.sh", ROOT / "infra/local/stop.sh"


def listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def local_stack():
    # A short path: Ray's Unix sockets live below it and are limited to ~107 characters.
    state = Path(tempfile.mkdtemp(prefix="ls-", dir="/tmp"))
    ports = {
        "RAY_GCS_PORT": free_port(),
        "RAY_DASHBOARD_PORT": free_port(),
        "MLFLOW_PORT": free_port(),
    }
    env = {**os.environ, "LANE_STACK_DIR": str(state), **{k: str(v) for k, v in ports.items()}}
    # The test session's own settings must not leak into the stack or its clients.
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    try:
        start = subprocess.run(
            [str(START), "--num-cpus", "4"], env=env, capture_output=True, text=True, timeout=300
        )
        assert start.returncode == 0, start.stdout + start.stderr
        yield {"state": state, "env": env, "ports": ports, "start_output": start.stdout}
    finally:
        subprocess.run([str(STOP)], env=env, capture_output=True, timeout=120)
        leftover = subprocess.run(["pgrep", "-f", str(state)], capture_output=True, text=True)
        shutil.rmtree(state, ignore_errors=True)
        assert leftover.stdout.strip() == "", f"processes left running: {leftover.stdout}"
        assert not any(listening(p) for p in ports.values())


def user_shell(command: str, stack: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    """``source env.sh`` then ``command`` in the repository, as the README says."""
    return subprocess.run(
        ["bash", "-c", f"source {stack['state']}/env.sh && {command}"],
        cwd=ROOT, env=stack["env"], capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def user_shell_started(command: str, stack: dict) -> subprocess.Popen:
    """:func:`user_shell` started in the background; ``communicate()`` for its output."""
    return subprocess.Popen(
        ["bash", "-c", f"source {stack['state']}/env.sh && {command}"],
        cwd=ROOT, env=stack["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


@pytest.mark.slow
def test_ray_job_submit_trains_and_registers_on_the_local_stack(local_stack, local_shards):
    ports = local_stack["ports"]
    dashboard = f"http://127.0.0.1:{ports['RAY_DASHBOARD_PORT']}"
    assert f"Ray dashboard  {dashboard}" in local_stack["start_output"]

    # Token authentication is on: no token, no answer; the token from the stack works.
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{dashboard}/api/version", timeout=10)
    assert refused.value.code == 401
    token = (local_stack["state"] / "ray_auth_token").read_text().strip()
    request = urllib.request.Request(
        f"{dashboard}/api/version", headers={"Authorization": f"Bearer {token}"}
    )
    assert json.load(urllib.request.urlopen(request, timeout=10))["ray_version"]
    # A client with the wrong token cannot submit.
    wrong = user_shell("RAY_AUTH_TOKEN=not-the-token ray job list", local_stack, timeout=120)
    assert wrong.returncode != 0

    # A job that fails (checked below) is submitted first, to run beside the training job: it
    # fails in its first seconds, so the test does not wait for a job start of its own.
    with user_shell_started(
        "ray job submit --working-dir . -- python -m jobs.train --data /nonexistent "
        "--storage /tmp/x --experiment stack --register-as lanes-stack",
        local_stack,
    ) as bad:
        # The README's command, typed as a user does.
        submit = user_shell(
            "ray job submit --working-dir . -- python -m jobs.train "
            f"--data {local_shards} --storage {local_stack['state']}/checkpoints "
            "--experiment stack --register-as lanes-stack --num-workers 2 --batch-size 4 "
            "--epochs 1 --run-name stack-run --no-augment",
            local_stack,
        )
        bad_stdout, bad_stderr = bad.communicate(timeout=300)
    assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-4000:]
    assert "succeeded" in submit.stdout + submit.stderr
    assert "registered models:/lanes-stack/1" in submit.stdout

    # The job tracked into the stack's MLflow server, not a local file.
    server = f"http://127.0.0.1:{ports['MLFLOW_PORT']}"
    # registry_uri too: it defaults to the process-wide one earlier tests set to sqlite.
    client = MlflowClient(tracking_uri=server, registry_uri=server)
    version = client.get_model_version("lanes-stack", "1")
    assert float(version.tags["val_miou"]) >= 0
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.runName"] == "stack-run"
    assert "val_miou" in run.data.metrics
    assert (local_stack["state"] / "mlflow.db").exists()
    assert (local_stack["state"] / "checkpoints" / "stack-run").is_dir()

    # A job that fails is reported as failed, with the job's one-line error.
    assert bad.returncode != 0
    assert "error: /nonexistent: no manifest.json" in bad_stdout + bad_stderr
