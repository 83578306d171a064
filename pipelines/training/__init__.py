"""Training: the typed options and the loop's config (:mod:`~pipelines.training.config`), the
recipe (:mod:`~pipelines.training.recipe`), the loop every Ray Train worker runs
(:mod:`~pipelines.training.loop`) with its batches (:mod:`~pipelines.training.batches`), DDP
agreement (:mod:`~pipelines.training.distributed`), checkpoints
(:mod:`~pipelines.training.checkpoint`) and MLflow record (:mod:`~pipelines.training.record`),
backbone weights (:mod:`~pipelines.training.weights`), and the driver that runs it all
(:mod:`~pipelines.training.driver`).

May import PyTorch, Ray (Train, Data), MLflow, and every other part of :mod:`pipelines` but
labeling and registry's promotion.
"""
