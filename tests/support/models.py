"""Registered models for tests: a model whose predictions are known without training, and the
planted pickles that prove a job loads registered versions as data."""

from __future__ import annotations

from pathlib import Path

#: The suite's model: the production FCN-8s head on ResNet-18 instead of ResNet-101 (a quarter
#: of the parameters), so every Ray job of the suite moves 45 MB checkpoints and all-reduces
#: 45 MB of gradients, not 170 MB. The pipelines never look at the architecture; the unit tests
#: build the production model itself.
TEST_MODEL = "fcn8s_resnet18"


def make_model(constant_class: int | None = None, seed: int = 0, name: str = TEST_MODEL):
    """A ResNet FCN-8s (``name``) whose predictions are known without training.

    ``constant_class``: zero score heads except a positive layer4 bias for that class, so the
    net predicts that class at every pixel (bilinear upsampling of a positive constant stays
    positive). ``None``: small random heads on the random backbone, so predictions vary with
    the input.
    """
    import torch

    from fcn_models import build_model

    torch.manual_seed(seed)
    model = build_model(name, 8).eval()
    heads = (model.score_layer2, model.score_layer3, model.score_layer4)
    with torch.no_grad():
        for head in heads:
            if constant_class is None:
                head.weight.normal_(0, 0.01)
            else:
                head.weight.zero_()
                head.bias.zero_()
        if constant_class is not None:
            model.score_layer4.bias[constant_class] = 1.0
    return model


# -- trust boundaries ------------------------------------------------------------------------------
class Touch:
    """Unpickled, it creates ``path``: what a planted pickle could do instead."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def malicious_pickle(canary: Path) -> bytes:
    """A pickle that creates the file ``canary`` when it is unpickled."""
    import pickle

    return pickle.dumps(Touch(canary))


def stored_model(name: str, version: str) -> Path:
    """The folder of a registered version's pyfunc model in the tests' local artifact store
    (MLmodel, python_model.pkl, artifacts/model_dir/...)."""
    from urllib.parse import urlparse

    from mlflow import MlflowClient

    uri = MlflowClient().get_model_version_download_uri(name, version)
    assert uri.startswith("file://"), uri
    return Path(urlparse(uri).path)


def plant_malicious_pickle(name: str, version: str, canary: Path) -> None:
    """Replace a registered version's ``python_model.pkl`` with one that creates ``canary``
    when unpickled (as whoever can write to the artifact store could)."""
    (stored_model(name, version) / "python_model.pkl").write_bytes(malicious_pickle(canary))


def register_test_model(store: str, folder: Path, name: str, transform, canary: Path,
                        constant_class: int | None = None, seed: int = 0) -> str:  # fmt: skip
    """Register a model built by :func:`make_model` the way jobs.train does (pyfunc + tags) in
    the MLflow store ``store`` (the process's tracking URI must be it), with a planted
    ``python_model.pkl`` that creates ``canary`` when unpickled. Returns the version."""
    import mlflow

    from pipelines.core import labels
    from pipelines.inference.model_dir import ModelSpec, save_model_dir
    from pipelines.registry.pyfunc import register_model_dir
    from pipelines.runtime import tracking

    model_dir = folder / f"model-{name}-{constant_class}-{seed}"
    spec = ModelSpec(TEST_MODEL, 8, transform, labels.CLASS_NAMES)
    save_model_dir(model_dir, make_model(constant_class, seed), spec)
    # An experiment of our own: the default one would put artifacts in ./mlruns.
    experiment = tracking.ensure_experiment("registered-by-tests", store)
    with mlflow.start_run(experiment_id=experiment, run_name=f"register-{name}"):
        version = register_model_dir(model_dir, name, {"made_by": "tests"})
    plant_malicious_pickle(name, str(version.version), canary)
    return str(version.version)
