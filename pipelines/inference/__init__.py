"""Running a trained model: the model directory format (:mod:`~pipelines.inference.model_dir`),
the one predictor (:mod:`~pipelines.inference.predictor`), the Ray Data model actors
(:mod:`~pipelines.inference.actors`), evaluation on the cluster
(:mod:`~pipelines.inference.evaluate`) and, for notebooks and services,
:class:`~pipelines.inference.model.LaneModel` (:mod:`~pipelines.inference.model`).

PyTorch lives here and in :mod:`pipelines.training` only. May import core, data, ops and
storage; Ray only inside functions (an actor, a pipeline), never at module level.
"""

from pipelines.inference.model import (
    FramesError,
    LaneModel,
    ModelDirError,
    ScoredMasks,
    load_model,
)

__all__ = ["FramesError", "LaneModel", "ModelDirError", "ScoredMasks", "load_model"]
