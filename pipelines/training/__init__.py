"""Training: the Ray-free engine (:mod:`~pipelines.training.engine`: build a model and its
training state, train an epoch over any batches, evaluate, save and resume), the typed options
and the loop's config (:mod:`~pipelines.training.config`), the recipe
(:mod:`~pipelines.training.recipe`), augmentation on the device
(:mod:`~pipelines.training.augment`); the Ray adapters around the engine: Ray Train's
``train_loop_per_worker`` (:mod:`~pipelines.training.loop`) with its Ray Data batches
(:mod:`~pipelines.training.batches`) and DDP agreement (:mod:`~pipelines.training.distributed`);
checkpoint files (:mod:`~pipelines.training.checkpoint`), rank 0's MLflow record
(:mod:`~pipelines.training.record`), backbone weights (:mod:`~pipelines.training.weights`), and
the driver that runs it all (:mod:`~pipelines.training.workflow`).

May import PyTorch, Ray (Train, Data), MLflow, and every other part of :mod:`pipelines` but
labeling and registry's promotion.
"""
