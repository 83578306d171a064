"""Running a trained model: the model directory format (:mod:`~pipelines.inference.model_dir`),
the one predictor (:mod:`~pipelines.inference.predictor`), the Ray Data model actors
(:mod:`~pipelines.inference.actors`) and evaluation on the cluster
(:mod:`~pipelines.inference.evaluate`).

PyTorch lives here and in :mod:`pipelines.training` only. May import core, data, ops and
storage; Ray only inside functions (an actor, a pipeline), never at module level.
"""
