"""What the tests share besides fixtures: paths, the synthetic geometry, ports, job
processes on the session's Ray cluster, the tests' ingest config."""

from __future__ import annotations

import contextlib
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = ROOT.parent / "shared" / "data" / "apollo-lane-labels"

# Small frames keep CI fast; the crop keeps the real recipe's proportion (690 of 1710 rows).
FRAME_W, FRAME_H, CROP_TOP = 846, 428, 172
MODEL_W, MODEL_H = 128, 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early with status {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


@contextlib.contextmanager
def moto_server(port: int | None = None) -> Iterator[tuple[subprocess.Popen, str]]:
    """moto in server mode on 127.0.0.1 (``port``, or a free one): (process, endpoint)."""
    port = port or free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_port(port, proc)
        yield proc, f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


def stack_env(state: Path, **ports: int) -> dict[str, str]:
    """The environment of infra/local/start.sh and stop.sh for a stack in ``state`` on
    ``ports``, without the test session's own Ray and MLflow settings."""
    env = {**os.environ, "LANE_STACK_DIR": str(state), **{k: str(v) for k, v in ports.items()}}
    for key in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    return env


@contextlib.contextmanager
def stale_http_server() -> Iterator[int]:
    """A server that is not the stack's answering 200 to any GET on a free port (yields it)."""

    class Stale(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Stale)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_port
    finally:
        server.shutdown()


def job_env(**extra: str) -> dict[str, str]:
    """The environment of a job run in its own process on the session's Ray cluster."""
    import ray

    return {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, **extra}


def start_job(module: str, *argv: str) -> subprocess.Popen:
    """``python -m MODULE ARGV`` in its own process on the session's Ray cluster; its stdout
    and stderr merged, as text (``communicate()`` for them)."""
    return subprocess.Popen(
        [sys.executable, "-m", module, *argv],
        cwd=ROOT, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def ingest_config(source, dest, transform, **options):
    """The tests' ingest of ``source`` into ``dest`` with ``transform``'s geometry, without
    progress lines."""
    from pipelines.data.workflow import IngestConfig

    return IngestConfig.of_transform(source, dest, transform, progress_seconds=None, **options)


def assert_same_confusion(got, expected, ties_per_million: float = 100) -> None:
    """Two confusion matrices of the same frames scored in batches of other sizes agree: every
    ground-truth row holds the same pixels, and predictions differ only for pixels whose two
    best classes tie within float32's last bits (at most ``ties_per_million`` of the pixels).
    CPU convolutions round differently at another batch size (the test model's logits differ
    by ~2e-6 between batches of 8 and 1), so such a pixel can flip: seen once, 1 pixel of
    ~47,000 in test_train's summed confusion. A missing part, other weights or other
    BatchNorm statistics move thousands."""
    import numpy as np

    got, expected = np.asarray(got), np.asarray(expected)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    np.testing.assert_array_equal(got.sum(axis=1), expected.sum(axis=1))
    moved = int(np.abs(got - expected).sum()) // 2  # each flip leaves one cell for another
    assert moved <= expected.sum() * ties_per_million / 1e6, (moved, int(expected.sum()))
