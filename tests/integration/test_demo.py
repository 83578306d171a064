"""`make demo`'s steps complete: the demo job at a smaller size, in its own process (it starts
its own local Ray and MLflow store, as on a user's machine); and every snippet of the manual
(README and docs/) that claims to run on the demo's output runs on it, as a user would paste
it: in a fresh interpreter, in the folder that holds ``demo/``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from PIL import Image

from pipelines.labeling.output import read_output
from tests.support.helpers import ROOT
from tests.support.models import TEST_MODEL

#: Marks the fenced Python block that follows as runnable after `make demo`.
MARK = "<!-- snippet: demo -->"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def demo_snippets() -> list[tuple[str, str]]:
    """(page:line, code) of each marked block."""
    out = []
    for page in PAGES:
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.strip() != MARK:
                continue
            if i + 1 >= len(lines) or lines[i + 1].strip() != "```python":
                raise AssertionError(f"{page.name}:{i + 1}: {MARK} not followed by ```python")
            end = next(j for j in range(i + 2, len(lines)) if lines[j].strip() == "```")
            out.append((f"{page.relative_to(ROOT)}:{i + 3}", "\n".join(lines[i + 2 : end])))
    return out


SNIPPETS = demo_snippets()


def _env() -> dict:
    # The demo sets its own tracking store (inside --dir) and starts its own Ray.
    return {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One demo run, into ``WORK/demo`` (the README's snippets name ``demo/``)."""
    work = tmp_path_factory.mktemp("user")
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.demo", "--dir", str(work / "demo"), "--frames", "16",
         "--new-frames", "4", "--epochs", "1", "--model", TEST_MODEL],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return work, proc


@pytest.mark.slow
def test_demo_runs_every_step_and_says_where_things_are(demo):
    _, proc = demo
    for step in range(1, 8):
        assert f"[{step}/7]" in proc.stdout
    assert "Demo finished in" in proc.stdout
    assert "mlflow ui --backend-store-uri sqlite:///" in proc.stdout


@pytest.mark.slow
def test_demo_registers_and_promotes_its_model(demo):
    store = f"sqlite:///{demo[0] / 'demo' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=store, registry_uri=store)
    champion = client.get_model_version_by_alias("lane-demo", "champion")
    assert str(champion.version) == "1"


@pytest.mark.slow
def test_demo_labels_the_new_frames_and_draws_the_preview(demo):
    out = demo[0] / "demo"
    rows = read_output(str(out / "labels")).to_pylist()
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    assert all(r["model_version"] == "1" for r in rows)
    with Image.open(out / "preview.png") as preview:
        assert preview.size[0] == 2 * 640 and preview.mode == "RGB"


def test_the_manual_has_demo_snippets():
    """Guards the parametrized test below against passing because extraction found nothing."""
    pages = {where.split(":")[0] for where, _ in SNIPPETS}
    assert "README.md" in pages and len(SNIPPETS) >= 3, SNIPPETS


@pytest.mark.slow
@pytest.mark.parametrize(("where", "code"), SNIPPETS, ids=[w for w, _ in SNIPPETS])
def test_a_manual_snippet_runs_on_the_demo_output(where, code, demo):
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=demo[0], env=_env(), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, f"{where}:\n{code}\n---\n{proc.stderr[-3000:]}"
    assert not re.search(r"\bWarning\b", proc.stderr), f"{where} warned:\n{proc.stderr[-3000:]}"


@pytest.mark.slow
def test_the_demo_recreates_its_folder_and_refuses_a_foreign_one(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    refused = subprocess.run(
        [sys.executable, "-m", "jobs.demo", "--dir", str(foreign)],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert refused.returncode != 0 and "was not made by the demo" in refused.stderr
    assert (foreign / "notes.txt").read_text() == "keep me"
