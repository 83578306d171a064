"""The registered pyfunc's environment: requirements any package index can serve."""

from packaging.requirements import Requirement

from pipelines.registry.pyfunc import _pip_requirements


def test_requirements_drop_local_version_labels():
    """A local build's version (``2.13.0+cpu``, ``2.14.0+cu130``) is pinned without its local
    label: no package index serves ``torch==2.13.0+cpu``."""
    fake = {"torch": "2.13.0+cpu", "torchvision": "0.28.0+cu126", "numpy": "2.1.3",
            "pillow": "11.0.0.post1"}  # fmt: skip
    reqs = [Requirement(r) for r in _pip_requirements(fake.__getitem__)]
    assert [r.name for r in reqs] == ["torch", "torchvision", "numpy", "pillow"]
    assert [str(r.specifier) for r in reqs] == [
        "==2.13.0", "==0.28.0", "==2.1.3", "==11.0.0.post1"
    ]  # fmt: skip


# -- the import shim for versions registered before pipelines.registry was a package -------------
OLD_PATH_PICKLE = b"cpipelines.registry\nLaneSegmentationModel\n)\x81."


def test_the_old_class_path_unpickles_as_the_pyfunc_model():
    import pickle

    from pipelines.registry.pyfunc import LaneSegmentationModel

    assert type(pickle.loads(OLD_PATH_PICKLE)) is LaneSegmentationModel


def test_a_version_pickled_under_the_old_path_loads_and_predicts(register_version):
    """A pyfunc client of a version registered by the previous release (its python_model.pkl
    names pipelines.registry.LaneSegmentationModel) still loads and predicts."""
    import cloudpickle
    import mlflow
    import numpy as np

    from pipelines.registry.pyfunc import LaneSegmentationModel
    from tests.support.helpers import CROP_TOP, FRAME_H, FRAME_W
    from tests.support.models import stored_model

    version = register_version("lanes-shim", constant_class=3)
    # What the previous release pickled: the same class under its old module path.
    LaneSegmentationModel.__module__ = "pipelines.registry"
    try:
        old = cloudpickle.dumps(LaneSegmentationModel())
    finally:
        LaneSegmentationModel.__module__ = "pipelines.registry.pyfunc"
    assert b"pipelines.registry\x94" in old and b"pipelines.registry.pyfunc" not in old
    (stored_model("lanes-shim", version) / "python_model.pkl").write_bytes(old)

    model = mlflow.pyfunc.load_model(f"models:/lanes-shim/{version}")
    masks = model.predict(np.zeros((1, FRAME_H, FRAME_W, 3), dtype=np.uint8))
    assert masks.shape == (1, FRAME_H, FRAME_W)
    assert (masks[:, :CROP_TOP] == 0).all() and (masks[:, CROP_TOP:] == 3).all()
