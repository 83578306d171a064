"""Batch labeling: what to label (:mod:`~pipelines.labeling.inputs`), the options
(:mod:`~pipelines.labeling.config`), the output schema (:mod:`~pipelines.labeling.schema`) and
its readers (:mod:`~pipelines.labeling.output`), staging and commit
(:mod:`~pipelines.labeling.commit`), the stages of a batch, Ray-free
(:mod:`~pipelines.labeling.stages`), their Ray Data pipeline (:mod:`~pipelines.labeling.dataset`)
and the run (:mod:`~pipelines.labeling.workflow`).

No PyTorch import anywhere here, and nothing heavy in this file: the CPU tasks of the pipeline
import :mod:`~pipelines.labeling.stages` and start without PyTorch or MLflow; the model actors
import :mod:`pipelines.inference` when they start. May import data, registry's versions, runtime,
storage and core.
"""
