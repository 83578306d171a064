"""The model registry: registered versions as the jobs use them (:mod:`~pipelines.registry.versions`:
resolved once, loaded as data, digests checked), the pyfunc model for outside clients and
registration (:mod:`~pipelines.registry.pyfunc`), aliases moved by compare-and-swap with history
(:mod:`~pipelines.registry.aliases`), and promotion (:mod:`~pipelines.registry.promotion`).

May import MLflow, inference, data, ops, storage and core. PyTorch only through the pyfunc and
evaluation: :mod:`~pipelines.registry.versions` and :mod:`~pipelines.registry.aliases` import
none of it.
"""


def __getattr__(name: str):
    # Versions registered before the registry was a package pickled their pyfunc as
    # ``pipelines.registry.LaneSegmentationModel``; a client that has this package imported
    # (MLflow prepends a model's bundled code to sys.path, it does not replace modules already
    # imported) still finds the class there. Kept for one release.
    if name == "LaneSegmentationModel":
        from pipelines.registry.pyfunc import LaneSegmentationModel

        return LaneSegmentationModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
