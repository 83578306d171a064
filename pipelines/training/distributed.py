"""What the DDP ranks agree on before validation: one set of weights and BatchNorm statistics,
and one sum of every rank's confusion matrix (scores come from the sum, never from averaged rank
scores, which would weight ranks, not pixels).
"""

from __future__ import annotations

import torch
from torch import nn


def broadcast_buffers(model: nn.Module, src: int = 0) -> None:
    """Rank ``src``'s buffers (BatchNorm running statistics) on every rank. DDP broadcasts
    them before each training forward, but that forward then updates them per rank, so after
    the last step the ranks differ; validation must score the weights that are checkpointed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for b in model.buffers():
            dist.broadcast(b, src)


def sum_over_ranks(conf: torch.Tensor, stats: torch.Tensor, frames: torch.Tensor) -> list[int]:
    """``conf`` and ``stats`` summed over all ranks, in place; returns the frames each rank
    scored. Scores come from the summed confusion matrix, never from averaged rank scores."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [int(frames)]
    dist.all_reduce(conf)
    dist.all_reduce(stats)
    by_rank = [torch.zeros_like(frames) for _ in range(dist.get_world_size())]
    dist.all_gather(by_rank, frames)
    return [int(n) for n in by_rank]


def check_replicas_agree(model: nn.Module) -> None:
    """Raise unless every rank holds the same weights and buffers (a float64 checksum,
    compared by all-reduce min/max): validation must score one model, the checkpointed one."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    tensors = [t.detach() for t in (*model.parameters(), *model.buffers())]
    total = torch.stack([t.double().sum() for t in tensors]).sum()
    lo, hi = total.clone(), total.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    if lo != hi:
        raise RuntimeError(
            f"rank {dist.get_rank()}: the ranks hold different weights or BatchNorm statistics "
            f"before validation (checksums {float(lo)!r} .. {float(hi)!r})"
        )


def compress_gradients(model: nn.Module, how: str) -> None:
    """``how`` ``bf16``: DDP all-reduces ``model``'s gradient buckets in bfloat16 (torch's
    ``bf16_compress_hook``: cast, all-reduce, divide by the world, cast back into the fp32
    gradients), half the bytes of fp32; ``none``: DDP's own fp32 all-reduce. A model that is
    not DDP (one worker) all-reduces nothing, so it is left as it is."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    if how not in ("none", "bf16"):
        raise ValueError(f"unknown gradient compression {how!r}")
    if how == "bf16" and isinstance(model, DistributedDataParallel):
        model.register_comm_hook(None, default_hooks.bf16_compress_hook)


def allreduce_bytes_per_step(model: nn.Module, how: str) -> int:
    """The gradient bytes one rank sends into DDP's all-reduce per step: DDP's buckets hold
    the gradient of every parameter that requires one, each element sent as bf16 (2 bytes)
    with ``how`` ``bf16``, else in the gradient's own dtype; 0 for a model that is not DDP."""
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(model, DistributedDataParallel):
        return 0
    params = [p for p in model.module.parameters() if p.requires_grad]
    if how == "bf16":
        return sum(p.numel() for p in params) * torch.finfo(torch.bfloat16).bits // 8
    return sum(p.numel() * p.element_size() for p in params)
