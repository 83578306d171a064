"""Running the jobs on a real cluster: the MLflow tracking store (:mod:`~pipelines.runtime.tracking`),
fitting a job to the cluster (:mod:`~pipelines.runtime.capacity`), "no progress" as an error
instead of a hang (:mod:`~pipelines.runtime.watchdog`), progress lines and reports
(:mod:`~pipelines.runtime.progress`), and the named fault points the tests arm
(:mod:`~pipelines.runtime.faults`).

May import Ray and MLflow (lazily where a Ray task must not pay for them), storage and core;
never PyTorch.
"""
