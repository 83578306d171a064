"""Batch labeling: what to label (:mod:`~pipelines.labeling.inputs`), the options
(:mod:`~pipelines.labeling.config`), the output schema (:mod:`~pipelines.labeling.schema`) and
its readers (:mod:`~pipelines.labeling.output`), staging and commit
(:mod:`~pipelines.labeling.commit`), the Ray Data pipeline of one chunk
(:mod:`~pipelines.labeling.stages`) and the run loop (:mod:`~pipelines.labeling.run`).

No PyTorch import anywhere here, and nothing heavy in this file: the CPU tasks of the pipeline
import :mod:`~pipelines.labeling.stages` and start without PyTorch or MLflow; the model actors
import :mod:`pipelines.inference` when they start. May import data, registry's versions, ops,
storage and core.
"""
