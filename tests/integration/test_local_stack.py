"""The local stack as a user runs it: infra/local/start.sh (a 2-CPU Ray head with token
authentication and an MLflow server, separate processes; S3 is an outage server the test
controls), `ray job submit` typed as in the README, faults injected into the running job, then
infra/local/stop.sh."""

import base64
import contextlib
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient

from pipelines.data.versions import resolve_dataset
from pipelines.runtime import tracking
from tests.support.faults import start_outage_server
from tests.support.helpers import ROOT, free_port, stack_env, stale_http_server
from tests.support.models import TEST_MODEL

START, STOP = ROOT / "infra/local/start.sh", ROOT / "infra/local/stop.sh"


def listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def local_stack():
    # A short path: Ray's Unix sockets live below it and are limited to ~107 characters.
    state = Path(tempfile.mkdtemp(prefix="ls-", dir="/tmp"))
    ports = {
        "RAY_GCS_PORT": free_port(),
        "RAY_DASHBOARD_PORT": free_port(),
        "MLFLOW_PORT": free_port(),
        "PG_PORT": free_port(),
    }
    # The stack's S3 (checkpoints) is an outage server the test can take away for a while.
    s3 = start_outage_server(outage_seconds=10)
    # The test session's own settings must not leak into the stack or its clients.
    env = {**stack_env(state, **ports), "AWS_ENDPOINT_URL_S3": s3.endpoint}
    try:
        start = subprocess.run(
            [str(START), "--num-cpus", "2"], env=env, capture_output=True, text=True, timeout=300
        )
        assert start.returncode == 0, start.stdout + start.stderr
        if "note: no PostgreSQL server binaries" in start.stdout:
            warnings.warn(
                "the local stack ran MLflow on sqlite: no PostgreSQL server binaries here "
                "(apt-get install postgresql to test the PostgreSQL backend)",
                stacklevel=1,
            )
        yield {"state": state, "env": env, "ports": ports, "start_output": start.stdout, "s3": s3}
    finally:
        subprocess.run([str(STOP)], env=env, capture_output=True, timeout=120)
        s3.stop()
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


def user_shell_started(command: str, stack: dict, merge: bool = False) -> subprocess.Popen:
    """:func:`user_shell` started in the background; ``communicate()`` for its output
    (``merge``: stderr into stdout)."""
    return subprocess.Popen(
        ["bash", "-c", f"source {stack['state']}/env.sh && {command}"],
        cwd=ROOT, env=stack["env"], stdout=subprocess.PIPE, text=True,
        stderr=subprocess.STDOUT if merge else subprocess.PIPE,
    )  # fmt: skip


class Lines:
    """A background process's merged output, read as it comes (``wait_for`` a line)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc, self.lines = proc, []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            assert self.proc.poll() is None or self._thread.is_alive(), self.text()[-4000:]
            assert time.monotonic() < deadline, (
                f"no {text!r} in {timeout} s:\n{self.text()[-4000:]}"
            )
            time.sleep(0.5)

    def finish(self, timeout: float) -> str:
        self.proc.wait(timeout=timeout)
        self._thread.join(timeout=30)
        return self.text()

    def text(self) -> str:
        return "".join(self.lines)


def command_lines() -> str:
    lines = []
    for p in psutil.process_iter(["cmdline"]):
        lines.append(" ".join(p.info["cmdline"] or []))
    return "\n".join(lines)


@dataclass
class StackRun:
    """What :func:`stack_run`'s job left behind, for the tests below to check one by one."""

    server: str
    password: str
    returncode: int
    out: str  # the user's `ray job submit` output (the job's logs), stdout and stderr merged
    command_lines: str  # every process's command line while the job ran
    bad_returncode: int
    bad_output: str

    def client(self) -> MlflowClient:
        # registry_uri too: it defaults to the process-wide one earlier tests set to sqlite.
        return MlflowClient(tracking_uri=self.server, registry_uri=self.server)

    def version(self):
        return self.client().get_model_version("lanes-stack", "1")

    def run(self):
        return self.client().get_run(self.version().run_id)


def stack_password(stack: dict) -> str:
    return (stack["state"] / "mlflow_password").read_text().strip()


@pytest.fixture(scope="module")
def stack_run(local_stack, local_shards):
    """The user's report: a 2-CPU head and 2 training workers. The job fits itself (half a CPU
    per worker, one left for the data pipeline) and trains with checkpoints on S3, through 10 s
    without S3 in the middle of the checkpoint's upload and a stop and restart of the stack's
    MLflow server (the epoch's records wait and are sent once it is back). Beside it runs a job
    that fails in its first seconds, so that no test waits for a job start of its own."""
    server = f"http://127.0.0.1:{local_stack['ports']['MLFLOW_PORT']}"
    password = stack_password(local_stack)
    with (
        pytest.MonkeyPatch.context() as mp,
        user_shell_started(
            "ray job submit --working-dir . -- python -m jobs.train --data /nonexistent "
            "--storage /tmp/x --experiment stack --register-as lanes-stack",
            local_stack,
        ) as bad,
    ):
        mp.setenv("MLFLOW_TRACKING_USERNAME", "admin")
        mp.setenv("MLFLOW_TRACKING_PASSWORD", password)
        # The README's command, typed as a user does.
        submit = Lines(user_shell_started(
            "ray job submit --working-dir . -- python -m jobs.train "
            f"--data {local_shards} --storage s3://lanes/checkpoints "
            "--experiment stack --register-as lanes-stack --num-workers 2 --batch-size 4 "
            f"--epochs 1 --run-name stack-run --no-augment --model {TEST_MODEL}",
            local_stack, merge=True,
        ))  # fmt: skip
        bad_stdout, bad_stderr = bad.communicate(timeout=300)
        # The run exists in MLflow: take the server away. Then S3 goes away for 10 s in the
        # middle of the epoch's checkpoint upload (model.pt): the upload rides it out, or the
        # group restarts. Then the epoch's records fail to go out, and the server comes back.
        submit.wait_for("starting run 'stack-run'", timeout=300)
        lines = command_lines()
        s3 = local_stack["s3"]
        seen = len(s3.lines)
        # The server goes away as in a crash (its pid file stays).
        mlflow_server = psutil.Process(
            json.loads((local_stack["state"] / "mlflow.pid").read_text())["pid"]
        )
        for p in [*mlflow_server.children(recursive=True), mlflow_server]:
            p.terminate()
        psutil.wait_procs([mlflow_server], timeout=30)
        s3.wait_write("/model.pt", timeout=600, after=seen)
        s3.trigger()
        s3.wait_outage_end(timeout=60)
        submit.wait_for("MLflow: epoch 0 metrics not recorded yet", timeout=600)
        restart = user_shell(f"{START} --restart-mlflow", local_stack, timeout=300)
        assert restart.returncode == 0, restart.stdout + restart.stderr
        out = submit.finish(timeout=900)
        yield StackRun(server, password, submit.proc.returncode, out, lines, bad.returncode,
                       bad_stdout + bad_stderr)  # fmt: skip


def test_the_mlflow_server_refuses_requests_without_the_stacks_credentials(local_stack):
    server = f"http://127.0.0.1:{local_stack['ports']['MLFLOW_PORT']}"
    assert len(stack_password(local_stack)) == 64
    search = f"{server}/api/2.0/mlflow/experiments/search?max_results=1"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(search, timeout=10)
    assert refused.value.code == 401
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(urllib.request.Request(search, headers={
            "Authorization": "Basic " + base64.b64encode(b"admin:password").decode()}), timeout=10)  # fmt: skip
    assert refused.value.code == 401


def test_the_ray_dashboard_answers_only_with_the_stacks_token(local_stack):
    dashboard = f"http://127.0.0.1:{local_stack['ports']['RAY_DASHBOARD_PORT']}"
    assert f"Ray dashboard  {dashboard}" in local_stack["start_output"]
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{dashboard}/api/version", timeout=10)
    assert refused.value.code == 401
    token = (local_stack["state"] / "ray_auth_token").read_text().strip()
    request = urllib.request.Request(
        f"{dashboard}/api/version", headers={"Authorization": f"Bearer {token}"}
    )
    assert json.load(urllib.request.urlopen(request, timeout=10))["ray_version"]


def test_a_client_with_the_wrong_token_cannot_submit(local_stack):
    wrong = user_shell("RAY_AUTH_TOKEN=not-the-token ray job list", local_stack, timeout=120)
    assert wrong.returncode != 0


@pytest.mark.slow
def test_the_readme_submit_trains_and_registers(stack_run):
    assert stack_run.returncode == 0, stack_run.out[-6000:]
    assert "succeeded" in stack_run.out
    assert "registered models:/lanes-stack/1" in stack_run.out
    assert float(stack_run.version().tags["val_miou"]) >= 0


@pytest.mark.slow
def test_the_checkpoint_upload_rides_out_the_s3_outage_without_a_restart(stack_run):
    # Location.patient_fs, pickled to the workers: no worker failure, so no group restart.
    assert "Error in training function" not in stack_run.out, stack_run.out[-6000:]


@pytest.mark.slow
def test_the_job_fits_itself_to_the_2_cpu_head(stack_run):
    # Instead of waiting forever for a third CPU.
    assert "the cluster has 2 CPUs (the Ray cluster): 2 workers x 0.5 CPU (not 1)" in stack_run.out


@pytest.mark.slow
def test_the_epoch_reaches_the_restarted_server_once(stack_run):
    run = stack_run.run()
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.runName"] == "stack-run"
    for key in ("val_miou", "train_loss", "lr"):
        history = stack_run.client().get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [0], key


@pytest.mark.slow
def test_the_epoch_pictures_are_images_at_step_0(stack_run):
    run_id = stack_run.run().info.run_id
    assert tracking.image_steps(stack_run.client(), run_id, "confusion") == {0}


@pytest.mark.slow
def test_the_dataset_is_the_runs_input(stack_run, local_shards):
    inputs = stack_run.run().inputs.dataset_inputs
    [train_input] = [i for i in inputs if i.dataset.name.endswith("/train")]
    assert json.loads(train_input.dataset.source)["uri"] == resolve_dataset(local_shards).uri


@pytest.mark.slow
def test_rank_0_progress_lines_reach_the_job_output(stack_run):
    pattern = r"epoch 1/1 step (\d+)/\1: [\d.]+ img/s, loss [\d.]+, epoch ETA 0m00s"
    assert re.search(pattern, stack_run.out)


@pytest.mark.slow
def test_the_backend_store_is_the_one_start_sh_named(stack_run, local_stack):
    """PostgreSQL where its server binaries are installed (the runs are rows of its
    database), else sqlite, as start.sh said."""
    state, pg_port = local_stack["state"], local_stack["ports"]["PG_PORT"]
    if not (state / "pg_password").exists():
        assert "note: no PostgreSQL server binaries" in local_stack["start_output"]
        assert (state / "mlflow.db").exists()
        return
    import psycopg2

    store = f"store: postgresql+psycopg2://mlflow@127.0.0.1:{pg_port}/mlflow"
    assert store in local_stack["start_output"]
    db = psycopg2.connect(host="127.0.0.1", port=pg_port, user="mlflow", dbname="mlflow",
                          password=(state / "pg_password").read_text().strip())  # fmt: skip
    try:
        with db.cursor() as cur:
            cur.execute("SELECT name, status FROM runs")
            assert ("stack-run", "FINISHED") in cur.fetchall()
    finally:
        db.close()
    assert not (state / "mlflow.db").exists()


@pytest.mark.slow
def test_the_epochs_checkpoint_is_complete_on_s3(stack_run, local_stack):
    ckpts = local_stack["s3"].location("s3://lanes/checkpoints/stack-run")
    infos = ckpts.list_files(("metrics.json",))
    assert sorted(json.loads(ckpts.at_path(i.path).read_text())["epoch"] for i in infos) == [0]
    for info in infos:
        folder = ckpts.at_path(info.path).parent()
        assert folder.join("model.pt").exists() and folder.join("train_state.pt").exists()


@pytest.mark.slow
def test_the_password_is_only_in_its_own_file(stack_run, local_stack):
    """Not in any command line, param, tag, the job's output or any log of the stack (the
    jobs' driver and worker logs included)."""
    password = stack_run.password
    assert password not in stack_run.command_lines
    run, version = stack_run.run(), stack_run.version()
    values = [*run.data.params.values(), *run.data.tags.values(), *version.tags.values()]
    assert values and not [v for v in values if password in v]
    leaks = [str(f) for f in local_stack["state"].rglob("*")
             if f.is_file() and f.name != "mlflow_password" and password.encode() in f.read_bytes()]  # fmt: skip
    assert not leaks, leaks
    assert password not in stack_run.out


@pytest.mark.slow
def test_a_failing_job_is_reported_with_its_one_line_error(stack_run):
    assert stack_run.bad_returncode != 0
    assert "error: /nonexistent: no manifest.json" in stack_run.bad_output


# -- start.sh and stop.sh: only what they started ---------------------------------------------
def gone(p: psutil.Process) -> bool:
    """Ended (a zombie whose parent has not reaped it counts: it runs nothing)."""
    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_stop_stops_what_was_recorded_and_leaves_a_reused_pid_alone(tmp_path):
    proc = str(ROOT / "infra/local/proc.py")

    def started(command: str) -> psutil.Process:
        """``command`` in the background of a shell that exits, as start.sh leaves them."""
        pid = subprocess.run(["bash", "-c", f"{command} > /dev/null 2>&1 & echo $!"],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        return psutil.Process(int(pid))

    recorded = started("bash -c 'sleep 300 & wait'")  # a server and its worker
    stranger = started("sleep 300")
    for name, p in (("mlflow", recorded), ("s3", stranger)):
        subprocess.run([sys.executable, proc, "record", str(tmp_path), name, str(p.pid)], check=True)  # fmt: skip
    # The s3 server "died" and its pid went to another process: same pid, another start.
    info = json.loads((tmp_path / "s3.pid").read_text())
    (tmp_path / "s3.pid").write_text(json.dumps({**info, "started": info["started"] - 100}))
    try:
        time.sleep(0.5)
        worker = recorded.children()
        assert worker
        out = subprocess.run([str(STOP)], env=stack_env(tmp_path), capture_output=True,
                             text=True, timeout=60).stdout  # fmt: skip
        assert f"stopped mlflow (pid {recorded.pid})\n" in out  # on SIGTERM: nothing killed
        assert all(gone(p) for p in (recorded, *worker))
        assert f"s3: pid {stranger.pid} is now another process" in out
        assert stranger.is_running()  # left alone
    finally:
        for p in (stranger, recorded):
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()


def test_start_refuses_a_server_it_did_not_start_and_leaves_nothing_running(tmp_path):
    """A stale server answers on MLflow's port (any request, with any credentials): start.sh
    does not take it for its own MLflow, fails with a clear error, and stops the S3 server it
    had already started."""
    s3_port = free_port()
    state = Path(tempfile.mkdtemp(prefix="ls-", dir="/tmp"))
    with stale_http_server() as stale_port:
        env = stack_env(state, MLFLOW_PORT=stale_port, S3_PORT=s3_port,
                        RAY_GCS_PORT=free_port(), RAY_DASHBOARD_PORT=free_port(),
                        PG_PORT=free_port())  # fmt: skip
        try:
            start = subprocess.run([str(START), "--s3"], env=env, capture_output=True,
                                   text=True, timeout=300)  # fmt: skip
            assert start.returncode == 1, start.stdout + start.stderr
            assert f"error: mlflow: port {stale_port} is taken by another server" in start.stderr, (
                start.stderr
            )
            assert "S3 server" in start.stdout  # it had started, and was stopped again
            assert not listening(s3_port)
            assert not list(state.glob("*.pid"))
            assert listening(stale_port)  # not ours: left alone
        finally:
            subprocess.run([str(STOP)], env=env, capture_output=True, timeout=120)
            shutil.rmtree(state, ignore_errors=True)


def test_start_interrupted_stops_what_it_started(tmp_path):
    state = Path(tempfile.mkdtemp(prefix="ls-", dir="/tmp"))
    s3_port, mlflow_port = free_port(), free_port()
    pg_port = free_port()
    env = stack_env(state, MLFLOW_PORT=mlflow_port, S3_PORT=s3_port,
                    RAY_GCS_PORT=free_port(), RAY_DASHBOARD_PORT=free_port(),
                    PG_PORT=pg_port)  # fmt: skip
    start = subprocess.Popen([str(START), "--s3"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (state / "mlflow.pid").exists():  # S3 is up, MLflow starting
            assert start.poll() is None and time.monotonic() < deadline, start.communicate()
            time.sleep(0.2)
        start.send_signal(signal.SIGINT)  # Ctrl-C
        _, err = start.communicate(timeout=120)
        assert start.returncode == 130, err
        assert "interrupted: stopping what was started" in err
        time.sleep(1)
        assert not any(listening(p) for p in (s3_port, mlflow_port, pg_port))
        assert not list(state.glob("*.pid"))
    finally:
        if start.poll() is None:
            start.kill()
        subprocess.run([str(STOP)], env=env, capture_output=True, timeout=120)
        shutil.rmtree(state, ignore_errors=True)
