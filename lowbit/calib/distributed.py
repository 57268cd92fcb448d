"""Calibration on several processes with ``torch.distributed`` (``torchrun -m lowbit quantize …``).

Data parallel over calibration windows: rank ``r`` of ``R`` runs the windows ``r, r + R, r + 2R, …``
through every block.  The statistics are sums over windows, and they are reduced in the *global window
order*, so they are bit for bit what one process computes:

    S = (…((P_0 + P_1) + P_2) + …) + P_{N-1}       (float64; P_w = X_wᵀX_w of window w, or |∂L_w/∂W|)

Round ``j`` holds the windows ``jR … jR + R − 1``, one per rank: every rank computes its window's ``P``
(zeros when it has none left), :func:`add_in_window_order` all-gathers the ``R`` of them and every rank
adds them to its ``S`` in rank order, i.e. in window order.  Every rank then holds the same ``S`` and
solves the layer; rank 0's quantized weight is broadcast so all ranks propagate exactly the same block
(a guard against nondeterministic solvers on GPUs), and only rank 0 writes the checkpoint.  Backend:
NCCL on CUDA, gloo on CPU.  Without ``WORLD_SIZE`` (or with 1) every function here is a no-op and
lowbit runs as a single process.
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


def _comm_device(t: torch.Tensor) -> torch.device:
    """Where a collective on ``t`` runs: NCCL needs CUDA tensors, gloo takes CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (and return it)."""
    if world()[1] > 1:
        dev = _comm_device(t)
        u = t.to(dev)
        dist.all_reduce(u, op=dist.ReduceOp.SUM)
        if u is not t:
            t.copy_(u)
    return t


def total_count(n: int) -> int:
    """``Σ_r n_r``: an integer summed over ranks (exact)."""
    return int(all_reduce_sum(torch.tensor([n], dtype=torch.int64)).item()) if world()[1] > 1 else n


def rounds(n_local: int) -> int:
    """Rounds of :func:`add_in_window_order` needed for every rank's ``n_local`` windows: ``max_r n_r``."""
    if world()[1] == 1:
        return n_local
    t = torch.tensor([n_local], dtype=torch.int64)
    u = t.to(_comm_device(t))
    dist.all_reduce(u, op=dist.ReduceOp.MAX)
    return int(u.item())


_SLAB = 1 << 24  # elements per all-gather (per rank): bounds the gathered copies to R × 64 MB of float32


def add_in_window_order(S: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """``S += P`` for one round of windows, in window order: rank ``r``'s ``P`` is window ``jR + r``'s
    contribution (zeros if it has none), and every rank adds all ``R`` of them to its ``S`` in rank order.
    With one process this is ``S += P``.  ``S`` and ``P`` have the same shape; the sum runs in ``S``'s dtype.

    The gathered contributions travel in slabs of at most ``2²⁴`` elements per rank, so the extra memory
    is bounded whatever the layer's size.  A rank with no window left sends zeros: ``S + 0 = S`` exactly."""
    size = world()[1]
    if size == 1:
        S += P.to(S.device)
        return S
    flat_s, flat_p = S.view(-1), P.reshape(-1).to(_comm_device(P))
    for a in range(0, flat_p.numel(), _SLAB):
        part = flat_p[a:a + _SLAB].contiguous()
        got = [torch.empty_like(part) for _ in range(size)]
        dist.all_gather(got, part)
        for g in got:  # rank order = window order within the round
            flat_s[a:a + _SLAB] += g.to(S.device)
    return S


def broadcast_from_owner(t: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``t`` on every rank (in place)."""
    if world()[1] > 1:
        dist.broadcast(t, src=0)
    return t


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()
