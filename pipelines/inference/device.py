"""Which device a model runs on in a Ray worker or actor: the GPU Ray gave it, or the CPU.

A process Ray gave a GPU whose CUDA cannot start (an image built for CUDA 13 on a node with an
older driver, or no driver at all) must not fall back to the CPU: ResNet-101 would then run on
every core of the node, starving the load and encode tasks beside it, with no error. It fails
with one line naming the torch CUDA build and what the node reports.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import torch

from pipelines.core.errors import BrokenGpuError


def node_gpu_report() -> str:
    """What this node says about its NVIDIA driver and GPUs, in one phrase."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "no nvidia-smi on the node (no NVIDIA driver installed or mounted)"
    try:
        out = subprocess.run(
            [smi, "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as e:
        return f"nvidia-smi failed ({type(e).__name__})"
    text = (out.stdout or out.stderr).strip().replace("\n", "; ")
    return f"nvidia-smi: {text or f'exit status {out.returncode}'}"


def check_gpu(gpu_ids: list, cuda_available: bool | None = None) -> None:
    """Raise :class:`BrokenGpuError` when Ray assigned ``gpu_ids`` but CUDA is not usable."""
    if not gpu_ids:
        return
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if cuda_available:
        return
    raise BrokenGpuError(
        f"Ray gave this process GPU {','.join(map(str, gpu_ids))} but torch "
        f"{torch.__version__} (built for CUDA {torch.version.cuda or 'none: a CPU build'}) "
        f"cannot use it: torch.cuda.is_available() is False; CUDA_VISIBLE_DEVICES="
        f"{os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}; {node_gpu_report()}. Use an "
        "image whose CUDA the node's driver supports, or a node with a newer driver"
    )


def raise_if_device_failed(error: BaseException, device: torch.device, doing: str) -> None:
    """Raise :class:`BrokenGpuError` (from ``error``) when ``error`` is the device failing rather
    than the data: a CUDA error (``torch.AcceleratorError``), or any error after which the GPU
    no longer answers. CUDA errors are sticky: every later call of this process fails too, so
    catching one per frame would turn every frame after it into an error row, recorded as bad
    for that model version. Returns when the device is fine (the data was the problem)."""
    failed = isinstance(error, torch.AcceleratorError)
    if not failed and device.type == "cuda":
        try:
            torch.cuda.synchronize(device)
        except Exception:  # noqa: BLE001 - any failure here is the device's
            failed = True
    if failed:
        raise BrokenGpuError(
            f"the GPU ({device}) failed while {doing} ({type(error).__name__}: "
            f"{str(error).strip()[:300]}); the actor stops rather than record frames as bad; "
            f"{node_gpu_report()}"
        ) from error


def ray_device() -> torch.device:
    """``cuda`` when Ray gave this worker or actor a GPU (checked usable), else ``cpu``."""
    import ray

    gpu_ids = ray.get_gpu_ids()
    check_gpu(gpu_ids)
    return torch.device("cuda" if gpu_ids else "cpu")
