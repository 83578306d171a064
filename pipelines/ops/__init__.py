"""Running the jobs on a real cluster: the MLflow tracking store (:mod:`~pipelines.ops.tracking`),
fitting a job to the cluster (:mod:`~pipelines.ops.capacity`), "no progress" as an error
instead of a hang (:mod:`~pipelines.ops.watchdog`), progress lines and reports
(:mod:`~pipelines.ops.progress`), and the named fault points the tests arm
(:mod:`~pipelines.ops.faults`).

May import Ray and MLflow (lazily where a Ray task must not pay for them), storage and core;
never PyTorch.
"""
