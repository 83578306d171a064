"""Running a trained model: the model directory format (:mod:`~pipelines.inference.model_dir`),
the one predictor (:mod:`~pipelines.inference.predictor`), the one evaluation (batches ->
confusion matrix: :mod:`~pipelines.inference.evaluate`), the model stages Ray Data runs as
actors and tests call in-process (:mod:`~pipelines.inference.actors`) and, for notebooks and
services,
:class:`~pipelines.inference.model.LaneModel` (:mod:`~pipelines.inference.model`).

PyTorch lives here and in :mod:`pipelines.training` only. May import core, data, runtime and
storage; Ray only inside functions (an actor, a pipeline), never at module level.
"""

from pipelines.inference.model import (
    FramesError,
    LaneModel,
    ModelDirError,
    ScoredMasks,
)

__all__ = ["FramesError", "LaneModel", "ModelDirError", "ScoredMasks"]
