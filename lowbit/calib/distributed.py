"""Calibration on several processes with ``torch.distributed`` (``torchrun -m lowbit quantize …``).

Data parallel over calibration windows: rank ``r`` of ``R`` runs the windows ``r, r + R, r + 2R, …``
through every block.  The statistics are sums over tokens, so the global ones are the sums of the
ranks' ones, reduced in float64:

    S = Σ_r S_r,   N = Σ_r N_r,   H = 2/N · S;     GWQ: s = Σ_r s_r  (Σ|∂L/∂W| over windows)

Every rank then holds the same ``H`` and solves the layer; rank 0's quantized weight is broadcast
so all ranks propagate exactly the same block (a guard against nondeterministic solvers on GPUs),
and only rank 0 writes the checkpoint.  Backend: NCCL on CUDA, gloo on CPU.  Without ``WORLD_SIZE``
(or with 1) every function here is a no-op and lowbit runs as a single process.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(device: str) -> str:
    """Join the process group that ``torchrun`` describes in the environment, if any.
    Returns the device this rank computes on (``cuda:<local rank>`` on GPUs)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return device
    if torch.device(device).type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return device


def shard(windows: torch.Tensor) -> torch.Tensor:
    """This rank's calibration windows (N, T) -> (≈N/R, T): rows ``rank::R``."""
    rank, size = world()
    return windows[rank::size] if size > 1 else windows


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (and return it)."""
    if world()[1] > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_from_owner(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``t`` on every rank (in place)."""
    if world()[1] > 1:
        dist.broadcast(t, src=0)
    return t


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()
