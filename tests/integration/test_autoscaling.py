"""The jobs on the cluster they ship for: an autoscaling cluster that starts from zero (a head
with no CPUs; CPU and GPU worker node types at 0 replicas; Ray's own autoscaler, v2, with its
fake multi-node provider: tests/support/autoscaling.py).

The fake GPU node type has a ``GPU`` resource and no CUDA: Ray schedules GPU actors there, and
they meet the same check a node with a broken driver does, so GPU scheduling is tested up to the
fail-loud check and no further (no test weakens it to let a fake GPU pass).
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.autoscaling import AutoscalingRay
from tests.support.helpers import FRAME_H, FRAME_W, ROOT, free_port, stop, wait_for_port
from tests.support.models import TEST_MODEL, make_model

pytestmark = pytest.mark.slow
MODEL = "lanes-autoscaling"
NODE_TYPES = {
    "cpu-group": {"resources": {"CPU": 2}, "max_workers": 2},
    "gpu-group": {"resources": {"CPU": 2, "GPU": 1}, "max_workers": 1},
}


@dataclass
class Setup:
    cluster: AutoscalingRay
    tmp: Path
    frames: Path
    tracking_uri: str

    def job(self, module: str, *argv: str, timeout: float = 600, **env: str):
        """``python -m module argv`` on the cluster: (exit status, output, seconds)."""
        start = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", module, *argv], cwd=ROOT, capture_output=True, text=True,
            env={**self.cluster.env(), "MLFLOW_TRACKING_URI": self.tracking_uri, **env},
            timeout=timeout,
        )  # fmt: skip
        return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start

    def label(self, output: str, *extra: str):
        return self.job("jobs.label", "--input", str(self.frames), "--output",
                        str(self.tmp / output), "--model", f"models:/{MODEL}/1", *extra)  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory, test_transform):
    import mlflow

    from pipelines.core import labels
    from pipelines.data.synthetic import write_tree
    from pipelines.inference.model_dir import ModelSpec, save_model_dir
    from pipelines.registry.pyfunc import register_model_dir
    from pipelines.runtime import tracking

    tmp = tmp_path_factory.mktemp("autoscaling")
    write_tree(tmp / "frames", 6, records=2, width=FRAME_W, height=FRAME_H, seed=3,
               with_labels=False)  # fmt: skip
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    spec = ModelSpec(TEST_MODEL, 8, test_transform, labels.CLASS_NAMES)
    save_model_dir(tmp / "model", make_model(seed=1), spec)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        with mlflow.start_run(experiment_id=tracking.ensure_experiment("autoscaling", uri)):
            register_model_dir(tmp / "model", MODEL, {"made_by": "tests"})
    # Idle nodes go after 6 s: each test starts from zero (a job holds its nodes through its
    # request while it runs), and the promotion test does not wait half a minute for it.
    cluster = AutoscalingRay(NODE_TYPES, idle_timeout_minutes=0.1).start()
    try:
        yield Setup(cluster, tmp, tmp / "frames", uri)
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def scaled_label(setup):
    """Two CPU actors asked of a cluster with no CPUs: the autoscaler brings up CPU nodes."""
    return setup.label("out", "--actors", "2")


@pytest.fixture(scope="module")
def nothing_to_do(setup, scaled_label):
    """The same output again, asking for more GPUs than the cluster can ever have."""
    return setup.label("out", "--use-gpu", "--actors", "2")


def test_labeling_on_an_idle_cluster_scales_up_and_finishes(setup, scaled_label):
    status, out, _ = scaled_label
    assert status == 0, out[-4000:]
    assert "waiting for 3 CPUs: autoscaler" in out
    assert "label: found 6 frames, labeled 6" in out
    assert setup.cluster.launched().get("cpu", 0) >= 1


def test_labeling_with_nothing_to_do_never_asks_for_a_gpu(setup, nothing_to_do):
    status, out, _ = nothing_to_do
    assert status == 0, out[-4000:]
    assert "nothing new to label; nothing written" in out
    assert "waiting for" not in out
    assert "gpu" not in setup.cluster.launched()


def test_more_gpus_than_any_node_type_has_fail_fast(setup, nothing_to_do):
    status, out, took = setup.label("out-infeasible", "--use-gpu", "--actors", "2")
    assert status == 2, out[-4000:]
    assert "error: labeling asks for 2 GPUs and 3 CPUs; the cluster's node types can never " \
           "provide" in out  # fmt: skip
    assert took < 120
    assert "gpu" not in setup.cluster.launched()


def test_a_node_that_never_arrives_ends_at_the_provisioning_timeout(setup, nothing_to_do):
    status, out, _ = setup.label("out-timeout", "--use-gpu", "--actors", "1",
                                 "--provision-timeout", "1")  # fmt: skip
    assert status == 3, out[-4000:]
    [error] = [line for line in out.splitlines() if line.startswith("error: ")]
    assert error.startswith("error: labeling: 1 GPU"), error
    assert "never arrived within --provision-timeout 1s (autoscaler" in error


def test_a_gpu_actor_on_a_node_without_cuda_fails_loudly(setup, nothing_to_do):
    status, out, _ = setup.label("out-gpu", "--use-gpu", "--actors", "1")
    assert status == 7, out[-4000:]
    assert "error: Ray gave this process GPU 0 but torch" in out
    assert "torch.cuda.is_available() is False" in out


def test_training_refuses_a_local_tracking_store_on_a_cluster_that_grows(setup, local_shards):
    status, out, _ = setup.job(
        "jobs.train", "--data", local_shards, "--storage", str(setup.tmp / "ckpt"),
        "--experiment", "autoscaling", "--register-as", MODEL, "--epochs", "1",
        "--model", TEST_MODEL,
    )  # fmt: skip
    assert status == 2, out[-4000:]
    assert "is a store on this machine's disk, but the Ray cluster spans an autoscaling " \
           "cluster" in out  # fmt: skip


@pytest.fixture(scope="module")
def mlflow_server(setup):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{setup.tmp / 'server.db'}",
         "--artifacts-destination", (setup.tmp / "server-artifacts").as_uri(), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_port(port, proc, timeout=120)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


def test_training_on_an_idle_cluster_scales_up_and_registers(setup, local_shards, mlflow_server):
    setup.cluster.wait_idle()  # earlier tests' nodes gone: the cluster is at zero again
    status, out, _ = setup.job(
        "jobs.train", "--data", local_shards, "--storage", str(setup.tmp / "ckpt"),
        "--experiment", "autoscaling", "--register-as", MODEL, "--epochs", "1",
        "--num-workers", "1", "--batch-size", "2", "--no-augment", "--run-name", "grown",
        "--model", TEST_MODEL,
        MLFLOW_TRACKING_URI=mlflow_server,
    )  # fmt: skip
    # One worker: the scale-up is what is tested here (DDP across nodes: test_faults.py).
    assert status == 0, out[-6000:]
    assert "waiting for 2 CPUs: autoscaler" in out
    assert f"registered models:/{MODEL}/1" in out


def test_training_on_a_node_without_cuda_fails_loudly(setup, local_shards, mlflow_server):
    status, out, _ = setup.job(
        "jobs.train", "--data", local_shards, "--storage", str(setup.tmp / "ckpt"),
        "--experiment", "autoscaling", "--register-as", MODEL, "--epochs", "1",
        "--num-workers", "1", "--use-gpu", "--batch-size", "2", "--no-augment",
        "--run-name", "broken-gpu", "--max-failures", "0", "--model", TEST_MODEL,
        MLFLOW_TRACKING_URI=mlflow_server,
    )  # fmt: skip
    assert status == 7, out[-6000:]
    [error] = [line for line in out.splitlines() if line.startswith("error: ")]
    assert "CUDA" in error and ("torch.cuda.is_available() is False" in error
                                or "ProcessGroupNCCL" in error), error  # fmt: skip


def test_promotion_on_an_idle_cluster_scales_up_and_promotes(setup, local_shards):
    setup.cluster.wait_idle()  # the training tests' nodes gone: the cluster is at zero again
    status, out, _ = setup.job(
        "jobs.promote", "--model", MODEL, "--candidate", "1", "--eval-data", local_shards,
        "--actors", "2", "--experiment", "autoscaling",
    )  # fmt: skip
    assert status == 0, out[-4000:]
    assert "waiting for 3 CPUs: autoscaler" in out
    assert "promoted v1 to champion (no previous holder)" in out
