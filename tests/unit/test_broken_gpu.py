"""A training failure that is a broken GPU is recognised from what Ray Train hands the driver
(exit 7, one line), however Ray Train wrote it: the worker's exception object per rank (its
text, a traceback, is cut in the middle past 1,000 characters), NCCL's refusal, or text only.
Ray Train's own error classes build the failures, as its worker-group poll does."""

from __future__ import annotations

import pytest
from ray.train import ControllerError
from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
from ray.train.v2._internal.execution.worker_group.poll import WorkerGroupPollStatus, WorkerStatus

from pipelines.core.errors import BrokenGpuError
from pipelines.training.workflow import broken_gpu

REASON = "Ray gave this process GPU 0 but torch cannot use it: " + "x" * 600


def worker_failed(error: BaseException, traceback: str):
    """The WorkerGroupError the controller raises for one rank that failed with ``error``."""
    wrapped = UserExceptionWithTraceback(error, traceback)
    status = WorkerGroupPollStatus({0: WorkerStatus(running=False, error=wrapped)})
    return status.get_worker_group_error()


def test_a_workers_broken_gpu_is_found_even_when_its_text_is_cut():
    frames = "".join(f'  File "ray/train/f{i}.py", line {i}, in f\n' for i in range(60))
    failure = worker_failed(BrokenGpuError(REASON),
                            f"Traceback:\n{frames}pipelines.core.errors.BrokenGpuError: {REASON}")  # fmt: skip
    assert "BrokenGpuError: " not in str(failure)  # Ray's truncation took the class name away
    assert broken_gpu(failure) == REASON


def test_nccl_refusing_a_process_group_is_a_broken_gpu():
    nccl = RuntimeError("ProcessGroupNCCL is only supported with GPUs, no GPUs found!")
    why = broken_gpu(ControllerError(nccl))
    assert why.startswith("the training workers were given GPUs that CUDA cannot use")


def test_a_broken_gpu_known_only_as_text_is_found():
    failure = worker_failed(RuntimeError("remote"), f"...\nBrokenGpuError: {REASON[:80]}\n")
    assert broken_gpu(failure) == REASON[:80]


@pytest.mark.parametrize(
    "error", [ValueError("the loss is NaN"), RuntimeError("CUDA out of memory")]
)  # fmt: skip
def test_other_failures_are_not_a_broken_gpu(error):
    assert broken_gpu(worker_failed(error, f"Traceback ...\n{error!r}")) is None
