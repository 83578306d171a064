"""The model registry: registered versions as the jobs use them (:mod:`~pipelines.registry.versions`:
resolved once, loaded as data, digests checked), the same for notebooks and services
(:func:`load_model`, :mod:`~pipelines.registry.loading`), the pyfunc model for outside clients and
registration (:mod:`~pipelines.registry.pyfunc`), aliases moved by compare-and-swap with history
(:mod:`~pipelines.registry.aliases`), a version's evaluation on the cluster
(:mod:`~pipelines.registry.evaluation`), and promotion (:mod:`~pipelines.registry.workflow`).

May import MLflow, inference, data, runtime, storage and core. PyTorch only through the pyfunc and
evaluation: :mod:`~pipelines.registry.versions` and :mod:`~pipelines.registry.aliases` import
none of it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipelines.registry.loading import load_model

__all__ = ["load_model"]


def __getattr__(name: str):
    # Lazy, like the shim below: every import of a registry module runs this file, and the
    # loader's imports (the inference package, the tracking helpers) are its callers' only.
    if name == "load_model":
        from pipelines.registry.loading import load_model

        return load_model
    # Versions registered before the registry was a package pickled their pyfunc as
    # ``pipelines.registry.LaneSegmentationModel``; a client that has this package imported
    # (MLflow prepends a model's bundled code to sys.path, it does not replace modules already
    # imported) still finds the class there. Kept for one release.
    if name == "LaneSegmentationModel":
        from pipelines.registry.pyfunc import LaneSegmentationModel

        return LaneSegmentationModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
