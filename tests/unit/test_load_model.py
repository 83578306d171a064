"""The safe loader's errors that need no registered version (a tracking store that is not
there, a URI of another kind, a folder that is no model), and the registered pyfunc's class
defined without MLflow's type-hint warning (printed by every jobs.label and jobs.promote start
before)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pipelines.core.errors import UserError
from pipelines.inference import LaneModel, ModelDirError
from pipelines.registry import load_model
from pipelines.registry.versions import RegistryError
from pipelines.runtime.tracking import TrackingError, TrackingUnreachable
from tests.support.helpers import ROOT, free_port


def one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert isinstance(e.value, UserError) and "\n" not in message, message
    return message


def test_a_tracking_server_that_does_not_answer_is_one_line():
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TrackingUnreachable) as e:
        load_model("models:/lanes@champion", tracking_uri=uri)
    assert one_line(e).startswith(f"MLflow tracking server {uri} is not reachable")


def test_a_missing_sqlite_store_is_named_not_created(tmp_path):
    db = tmp_path / "nowhere.db"
    with pytest.raises(TrackingError) as e:
        load_model("models:/lanes/1", tracking_uri=f"sqlite:///{db}")
    assert f"sqlite:///{db}: no such database file" in one_line(e)
    assert not db.exists()


def test_other_uris_and_folders_are_refused(tmp_path):
    with pytest.raises(RegistryError) as e:
        load_model("runs:/abc/model")
    assert one_line(e).startswith("runs:/abc/model: expected models:/NAME@ALIAS")
    with pytest.raises(ModelDirError) as e:
        load_model(tmp_path)
    assert one_line(e).startswith(f"{tmp_path}: not a model directory (expected model.pt")
    with pytest.raises(ModelDirError) as e:
        LaneModel.from_dir("models:/lanes@champion")
    assert "pipelines.registry.load_model" in one_line(e)


PROBE = """
import warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    import pipelines.registry.pyfunc
for w in seen:
    if issubclass(w.category, UserWarning):
        print(f"{w.filename}:{w.lineno}: {w.message}")
"""


def test_the_pyfunc_class_is_defined_without_a_type_hint_warning():
    run = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "", run.stdout


def test_registering_a_version_logs_no_warning(register_version, caplog):
    """The training job registers every run's model: MLflow's warning that the pyfunc object
    is pickled (known, and never read by the jobs) must not print on every run."""
    import logging

    with caplog.at_level(logging.WARNING):
        register_version("quiet-registration")
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [m for m in warned if "python_model" in m or "CloudPickle" in m], warned
