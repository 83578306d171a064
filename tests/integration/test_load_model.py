"""The safe Python API (``pipelines.registry.load_model``) against a real MLflow store: each way
of naming a version gives the masks of the one predictor and the scores the labeling job
writes; nothing of the version is unpickled; a changed file and unknown names are one clear
error; and the pyfunc, for MLflow-native clients, answers the same over ``mlflow models serve``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image

from pipelines.core.codecs import decode_png_mask
from pipelines.data.sources import Limits
from pipelines.data.synthetic import render_frame
from pipelines.inference import FramesError, LaneModel
from pipelines.inference.actors import Segmenter
from pipelines.labeling.inputs import list_inputs
from pipelines.labeling.stages import LabelStages
from pipelines.registry import load_model
from pipelines.registry.versions import (
    ModelRef,
    RegistryError,
    fetch_verified,
    load_predictor,
    version_transform,
)
from pipelines.storage import resolve
from tests.support.helpers import FRAME_H, FRAME_W, ROOT, free_port, stop
from tests.support.models import stored_model

MODEL = "lanes-api"


def frames(n: int, width: int = FRAME_W, height: int = FRAME_H, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([render_frame(rng, width, height)[0] for _ in range(n)])


def labeled_by_the_job(ref: ModelRef, batch: np.ndarray, tmp_path):
    """What the labeling job writes for ``batch``: its CPU stage reads the frames (PNG files,
    lossless), its model actor's call (without Ray, its predictor on the CPU, built from the
    verified files as the job's driver fetches them) scores them, its encode stage writes the
    rows."""
    folder = tmp_path / "to-label"
    folder.mkdir()
    for i, frame in enumerate(batch):
        Image.fromarray(frame).save(folder / f"f{i:03d}.png")
    segment = Segmenter(fetch_verified(ref), device="cpu")
    inputs = list_inputs(str(folder))
    stages = LabelStages(kind=inputs.kind, anchor=resolve(inputs.uri), transform=version_transform(ref),
                         model_name=ref.name, model_version=ref.version, limits=Limits())  # fmt: skip
    table = stages.label(inputs.rows, segment, datetime.now(timezone.utc))
    assert table["status"].to_pylist() == ["ok"] * len(batch)
    return table.to_pydict()


def test_each_uri_and_path_gives_the_predictors_masks_and_labelings_scores(
    register_version, tmp_path
):
    version = register_version(MODEL, seed=1)  # random heads: masks vary with the frame
    MlflowClient().set_registered_model_alias(MODEL, "champion", version)
    stored = stored_model(MODEL, version)
    # Not read: deleted, every load below still works (and the fixture's canary stays unmade).
    (stored / "python_model.pkl").unlink()
    batch = frames(2)
    ref = ModelRef(MODEL, version)
    predictor = load_predictor(ref, device="cpu")  # the jobs' loader, the one predictor
    expected = np.stack(predictor.predict(batch))
    assert expected.shape == (2, FRAME_H, FRAME_W) and len(np.unique(expected)) > 1

    models = {}
    for uri in (f"models:/{MODEL}@champion", f"models:/{MODEL}/{version}",
                f"models:/{MODEL}/latest", stored, stored / "artifacts" / "model_dir"):  # fmt: skip
        models[uri] = model = load_model(uri, device="cpu")
        assert isinstance(model, LaneModel)
        masks = model.predict(batch)
        assert masks.dtype == np.uint8 and masks.shape == batch.shape[:3], uri
        np.testing.assert_array_equal(masks, expected, err_msg=str(uri))
    champion = models[f"models:/{MODEL}@champion"]
    assert champion.source == f"models:/{MODEL}/{version}"  # the version it resolved to
    assert model.source == str(stored / "artifacts" / "model_dir")
    del models, model
    # The path-only loader of the inference package is the same model.
    direct = LaneModel.from_dir(stored / "artifacts" / "model_dir", device="cpu")
    np.testing.assert_array_equal(direct.predict(batch), expected)
    # Another frame size the model accepts: masks at that size.
    small = frames(1, 400, 240, seed=3)
    np.testing.assert_array_equal(direct.predict(small)[0], predictor.predict(small)[0])
    del direct

    # The scored variant: the labeling job's scores and masks for the same frames.
    scored = champion.predict_scored(batch)
    np.testing.assert_array_equal(scored.masks, expected)
    written = labeled_by_the_job(ref, batch, tmp_path)
    for name in ("confidence", "pixel_confidence", "uncertain_fraction", "novelty"):
        got = getattr(scored, name)
        assert got.shape == (2,) and got.dtype == np.float32, name
        want = np.array([np.nan if v is None else v for v in written[name]], np.float32)
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=name)
    assert np.isfinite(scored.novelty).all()
    for mask, png in zip(scored.masks, written["mask"], strict=True):
        np.testing.assert_array_equal(mask, decode_png_mask(png))


def test_a_changed_file_or_unknown_name_is_one_clear_error(register_version):
    version = register_version(MODEL, constant_class=2)
    client = MlflowClient()
    client.set_registered_model_alias(MODEL, "champion", version)
    weights = stored_model(MODEL, version) / "artifacts" / "model_dir" / "model.pt"
    original = weights.read_bytes()
    # One byte of a tensor flipped: still a valid torch file, only the digest can tell.
    data = bytearray(original)
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(RegistryError) as e:
        load_model(f"models:/{MODEL}@champion", device="cpu")
    message = str(e.value)
    assert message.startswith(f"models:/{MODEL}/{version}: model.pt has sha256 "), message
    assert "the stored file was changed; refusing to load it" in message
    assert "\n" not in message
    weights.write_bytes(original)
    assert (load_model(f"models:/{MODEL}@champion", device="cpu").spec.n_class) == 8

    for uri, says in [
        (f"models:/{MODEL}@no-such-alias", "no-such-alias"),
        (f"models:/{MODEL}/99", "99"),
        ("models:/no-such-model/1", "no-such-model"),
        (f"models:{MODEL}/1", "expected models:/NAME@ALIAS"),
    ]:
        with pytest.raises(RegistryError) as e:
            load_model(uri)
        message = str(e.value)
        assert uri in message and says in message and "\n" not in message, message


def test_bad_frames_are_one_clear_error(register_version):
    version = register_version(MODEL, constant_class=2)
    model = load_model(f"models:/{MODEL}/{version}", device="cpu")
    good = frames(1)
    for bad, says in [
        (good[0], "got shape (428, 846, 3) dtype uint8"),
        (good.astype(np.float32), "got shape (1, 428, 846, 3) dtype float32"),
        (good[..., :1], "got shape (1, 428, 846, 1)"),
        (np.zeros((1, 48, 48, 3), np.uint8), "smaller than 64x64 pixels"),
    ]:
        for predict in (model.predict, model.predict_scored):
            with pytest.raises(FramesError) as e:
                predict(bad)
            message = str(e.value)
            assert message.startswith(f"models:/{MODEL}/{version}: frames"), message
            assert says in message and "\n" not in message, message
    assert model.predict(good[:0]).shape == (0, FRAME_H, FRAME_W)
    assert model.predict_scored(good[:0]).confidence.shape == (0,)


# -- the pyfunc, for MLflow-native clients -----------------------------------------------------------
@pytest.fixture
def served(register_version, mlflow_store):
    """``mlflow models serve`` of a registered version on a free loopback port, with the
    version's real pickled pyfunc (the fixture plants a malicious one: a client of the pyfunc
    trusts the store, which the tests' own pickle makes true). Yields (base URL, version)."""
    import cloudpickle

    from pipelines.registry.pyfunc import LaneSegmentationModel

    version = register_version(MODEL, seed=1)
    pkl = stored_model(MODEL, version) / "python_model.pkl"
    pkl.write_bytes(cloudpickle.dumps(LaneSegmentationModel()))
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{MODEL}/{version}",
           "--env-manager", "local", "--host", "127.0.0.1", "-p", str(port), "--workers", "1"]  # fmt: skip
    # The server execs uvicorn by name: this interpreter's scripts first on PATH.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store, "PATH": path}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 240
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow models serve exited: {proc.stdout.read()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.time() < deadline, "mlflow models serve did not answer /ping"
            time.sleep(0.5)
        yield base, version
    finally:
        stop(proc)


@pytest.mark.slow
def test_mlflow_models_serve_answers_the_predictors_masks(served):
    base, version = served
    batch = frames(2, 160, 240, seed=5)  # small: the JSON carries every pixel
    body = json.dumps({"inputs": batch.tolist()}).encode()
    request = urllib.request.Request(f"{base}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            answer = json.loads(r.read())
    except urllib.error.HTTPError as e:
        raise AssertionError(f"{e.code}: {e.read().decode()[:2000]}") from None
    masks = np.array(answer["predictions"], dtype=np.uint8)
    expected = load_model(f"models:/{MODEL}/{version}", device="cpu").predict(batch)
    assert masks.shape == (2, 240, 160)
    np.testing.assert_array_equal(masks, expected)
    assert len(np.unique(expected)) > 1
