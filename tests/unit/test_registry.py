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
