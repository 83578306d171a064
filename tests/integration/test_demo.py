"""`make demo`'s steps complete: the demo job at a smaller size, in its own process (it starts
its own local Ray and MLflow store, as on a user's machine)."""

import os
import subprocess
import sys

import pytest
from mlflow import MlflowClient
from PIL import Image

from pipelines.labeling.output import read_output
from tests.support.helpers import ROOT


@pytest.mark.slow
def test_demo_runs_the_whole_loop(tmp_path):
    out = tmp_path / "demo"
    # The demo sets its own tracking store (inside --dir) and starts its own Ray.
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.demo", "--dir", str(out), "--frames", "16",
         "--new-frames", "4", "--epochs", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for step in range(1, 8):
        assert f"[{step}/7]" in proc.stdout
    assert "Demo finished in" in proc.stdout
    assert "mlflow ui --backend-store-uri sqlite:///" in proc.stdout

    store = f"sqlite:///{out / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    champion = client.get_model_version_by_alias("lane-demo", "champion")
    assert str(champion.version) == "1"
    rows = read_output(str(out / "labels")).to_pylist()
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    assert all(r["model_version"] == "1" for r in rows)
    with Image.open(out / "preview.png") as preview:
        assert preview.size[0] == 2 * 640 and preview.mode == "RGB"

    # Run again: the folder is recreated, not appended to; a foreign folder is refused.
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    refused = subprocess.run(
        [sys.executable, "-m", "jobs.demo", "--dir", str(foreign)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert refused.returncode != 0 and "was not made by the demo" in refused.stderr
    assert (foreign / "notes.txt").read_text() == "keep me"
