"""A process Ray gave a GPU that CUDA cannot use fails with one line, never a CPU fallback."""

from __future__ import annotations

import pytest
import torch

from pipelines.core.errors import BrokenGpuError
from pipelines.inference.device import check_gpu


def test_no_gpu_assigned_is_the_cpu():
    check_gpu([], cuda_available=False)


def test_a_usable_gpu_passes():
    check_gpu(["0"], cuda_available=True)


def test_an_assigned_gpu_without_cuda_names_the_build_and_the_node(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(BrokenGpuError) as e:
        check_gpu(["0"], cuda_available=False)
    message = str(e.value)
    assert message.startswith("Ray gave this process GPU 0 but torch")
    assert f"built for CUDA {torch.version.cuda or 'none: a CPU build'}" in message
    assert "CUDA_VISIBLE_DEVICES=0" in message and "nvidia-smi" in message
    assert "\n" not in message and e.value.exit_code == 7


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine's CUDA works")
def test_this_machines_torch_is_checked_when_not_told(monkeypatch):
    with pytest.raises(BrokenGpuError):
        check_gpu(["0"])
