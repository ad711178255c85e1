"""Data-parallel helpers on torch.distributed (launched with ``torchrun``; gloo on CPU, nccl on CUDA).

The trainer averages gradients with an explicit all-reduce after ``backward`` instead of wrapping
the flow in ``DistributedDataParallel``: its losses call the transform several times per step
(forward-backward regulariser, force matching's double backward, reverse KL through the
representation), which DDP's one-forward-per-step bucket hooks do not support. Averaging the
gradients of equal-sized shards of a global batch gives exactly the gradient of the global mean.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size`` processes, and its torch ``device``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """"auto" -> CUDA (this process's local GPU) when available, else CPU; "cuda" without a GPU is an error."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was requested but torch sees no CUDA device; use --device cpu")
        if device == "cuda":
            device = f"cuda:{local_rank % torch.cuda.device_count()}"
        torch.cuda.set_device(torch.device(device))
    return torch.device(device)


def init_distributed(device: str = "auto", timeout_s: float = 6 * 3600.0) -> DistInfo:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK).

    Without those variables this is a single process (world size 1, no process group). The long
    default timeout covers rank 0 training the teacher while the other ranks wait at a barrier.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def average_gradients(module: torch.nn.Module, world_size: int) -> None:
    """All-reduce and average the gradients of ``module`` over the process group (in one flat buffer)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if world_size <= 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def all_reduce_mean(values: torch.Tensor, world_size: int) -> torch.Tensor:
    """Mean of a tensor over the process group (identity for a single process)."""
    if world_size <= 1:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values / world_size


def all_reduce_max(values: torch.Tensor, world_size: int) -> torch.Tensor:
    if world_size <= 1:
        return values
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
