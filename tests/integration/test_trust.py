"""Trust boundaries: what the jobs read from the tracking server or a bucket is loaded as data
(tensors and JSON), checked against the digests recorded at registration, and never run."""

from __future__ import annotations

import contextlib
import json

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from pipelines.inference.model_dir import UnsafeFileError
from pipelines.registry.versions import DIGEST_TAGS, ModelRef, RegistryError, load_predictor
from tests.support.helpers import FRAME_H, FRAME_W
from tests.support.models import TEST_MODEL, Touch, make_model, plant_malicious_pickle, stored_model

MODEL = "lanes-trust-test"


def test_jobs_load_a_registered_version_as_data_never_its_pickle(register_version, tmp_path):
    version = register_version(MODEL, constant_class=2)
    canary = tmp_path / "pickle-ran"
    plant_malicious_pickle(MODEL, version, canary)
    predictor = load_predictor(ModelRef(MODEL, version))
    assert not canary.exists()
    [mask] = predictor.predict([np.zeros((FRAME_H, FRAME_W, 3), np.uint8)])
    assert (mask[predictor.transform.crop_top :] == 2).all()  # the version's own weights
    # The planted pickle is live: MLflow's pyfunc loader (what the jobs no longer use) runs it.
    with contextlib.suppress(Exception):
        mlflow.pyfunc.load_model(f"models:/{MODEL}/{version}")
    assert canary.exists()


@pytest.mark.slow
def test_a_changed_file_in_the_artifact_store_is_refused(
    register_version, ray_cluster, tmp_path, capsys
):
    """Another version's weights, or a spec with another crop, in place of a version's own:
    valid for torch and JSON, so only the digests recorded at registration can tell. Loading
    refuses, naming the version; the labeling job refuses with one error line before any
    actor starts; a version without digests cannot be checked and is refused too."""
    from jobs import label
    from pipelines.core.codecs import encode_jpeg
    from pipelines.data.synthetic import render_frame

    version, other = register_version(MODEL, constant_class=2), register_version(MODEL, 3)
    ref = ModelRef(MODEL, version)
    for name in ("model.json", "model.pt"):
        stored = stored_model(MODEL, version) / "artifacts" / "model_dir" / name
        original = stored.read_bytes()
        replacement = (stored_model(MODEL, other) / "artifacts" / "model_dir" / name).read_bytes()
        if name == "model.json":
            replacement = original.replace(b'"crop_top": 172', b'"crop_top": 100')
        assert replacement != original
        stored.write_bytes(replacement)
        with pytest.raises(
            RegistryError,
            match=rf"models:/{MODEL}/{version}: {name} has sha256 \w+, not the \w+ recorded at "
            rf"registration \(tag {DIGEST_TAGS[name]}\): the stored file was changed",
        ):
            load_predictor(ref)
        if name == "model.json":
            stored.write_bytes(original)

    # The labeling job, with the swapped weights still in place.
    rng = np.random.default_rng(0)
    (tmp_path / "in").mkdir()
    for i in range(2):
        frame = render_frame(rng, FRAME_W, FRAME_H)[0]
        (tmp_path / "in" / f"f{i}.jpg").write_bytes(encode_jpeg(frame))
    argv = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
            "--model", f"models:/{MODEL}/{version}"]  # fmt: skip
    capsys.readouterr()
    assert label.main(argv) == 2
    err = capsys.readouterr().err
    assert f"error: models:/{MODEL}/{version}: model.pt has sha256 " in err, err
    assert "Traceback" not in err  # one line, before any labeling actor started
    assert not list(tmp_path.glob("out/**/*.parquet"))

    stored.write_bytes(original)
    assert (load_predictor(ref).predict([np.zeros((FRAME_H, FRAME_W, 3), np.uint8)])[0] == 2).any()
    # A version without the digests (registered by something else) cannot be checked.
    MlflowClient().delete_model_version_tag(MODEL, version, DIGEST_TAGS["model.pt"])
    with pytest.raises(RegistryError, match=f"has no {DIGEST_TAGS['model.pt']} tag"):
        load_predictor(ref)


def test_weights_and_train_state_that_would_run_code_are_refused(tmp_path, test_transform):
    """What a resumed training run loads from its checkpoint (engine.load_checkpoint, in every
    Ray Train worker): weights and train state as data; a planted pickle in either is refused,
    never run."""
    from pipelines.core import labels
    from pipelines.inference.model_dir import ModelSpec
    from pipelines.training import engine
    from pipelines.training.recipe import make_recipe

    canary = tmp_path / "pickle-ran"
    spec = ModelSpec(TEST_MODEL, 8, test_transform, labels.CLASS_NAMES)
    state = engine.build_train_state(make_model(1), make_recipe("default", TEST_MODEL),
                                     total_steps=2)  # fmt: skip
    checkpoint = engine.save_checkpoint(tmp_path / "checkpoint", state, spec, epoch=0)
    original = (checkpoint / "train_state.pt").read_bytes()
    torch.save({"optimizer": Touch(canary)}, checkpoint / "train_state.pt")
    with pytest.raises(
        UnsafeFileError, match=r"train_state\.pt: refused to load: .*could run code"
    ):
        engine.load_checkpoint(checkpoint)
    (checkpoint / "train_state.pt").write_bytes(original)
    torch.save({"weights": Touch(canary)}, checkpoint / "model.pt")
    with pytest.raises(UnsafeFileError, match=r"model\.pt: refused to load: .*could run code"):
        engine.load_checkpoint(checkpoint)
    assert not canary.exists()
    # The planted file is live: a plain torch.load runs it.
    torch.load(checkpoint / "model.pt", weights_only=False)
    assert canary.exists()


def test_redaction_masks_the_mlflow_password_and_drops_secret_keys(monkeypatch):
    from pipelines.runtime.tracking import redact

    canary = "canary-mlflow-password-5f3a"
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", canary)
    out = redact({
        "note": f"run by {canary} today",
        "mlflow_password": "anything",
        "store": f"http://admin:{canary}@mlflow:5000/",
        "nested": {"data": f"s3://b/{canary}", "epochs": 3},
    })  # fmt: skip
    assert "mlflow_password" not in out
    assert canary not in json.dumps(out)
    assert out["note"] == "run by *** today"
    assert out["store"] == "http://***@mlflow:5000/"
    assert out["nested"] == {"data": "s3://b/***", "epochs": 3}
