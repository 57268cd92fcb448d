"""Squeeze10's optional per-block scale fit (``--method squeeze --finetune``): FIAS's "short per-block
reconstruction of scales to match the FP block outputs".

The codes of a :class:`MixedBinaryWeight` stay frozen; every cell's two fp16 parameters are trained by the
shared loop of :mod:`lowbit.calib.finetune` (MSE between the quantized block on the quantized stream and the
float block on the FP stream).  Per cell ``(i, g)`` with stored ``p1⁰, p2⁰``, in scale-free units:

* binary cell: ``α = p1⁰·γ``, ``μ = μ⁰ + δ·p1⁰``  →  ``ŵ = μ + α·(2t − 1) [+ α₂·(2u − 1)]``;
* high cell:   ``s = p1⁰·γ``, ``z = z⁰ + δ``      →  ``ŵ = s·(q − z)``,

with ``γ`` (m, G) initialised to 1 and ``δ`` (m, G) to 0, so one Adam learning rate suits every layer.  The
residual scale ``α₂`` stays as solved.  Export: ``p1 = p1⁰·γ``, ``p2 = μ`` or ``z``, rounded to fp16 — the
same format and size as before, so bits/weight do not change.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..calib import finetune
from ..packed import bitpack
from ..packed.mixed import MixedBinaryWeight


class TrainableMixed(nn.Module):
    """A Squeeze10 linear with trainable per-cell ``gamma`` (scale factor) and ``delta`` (offset shift)."""

    def __init__(self, packed: MixedBinaryWeight, bias: torch.Tensor | None):
        super().__init__()
        m, n = packed.shape
        self.packed = packed
        high = packed.high_cells()
        col = torch.arange(n) // packed.group_size
        hw = high[:, col]
        t = bitpack.unpack(packed.qsign.cpu(), 1, n).float()
        q = torch.zeros(m, n)
        kw = int(hw.sum())
        if kw:
            q[hw] = bitpack.unpack(packed.qrest.cpu(), packed.high_bits - 1, kw).float()
        q = q + t * 2 ** (packed.high_bits - 1)
        fixed = torch.zeros(m, n)                 # residual term α₂·(2u − 1) of binary weights (frozen)
        if packed.binary_residual:
            u = torch.zeros(m, n)
            p3 = torch.zeros(m, packed.n_groups)
            if m * n - kw:
                u[~hw] = bitpack.unpack(packed.qres.cpu(), 1, m * n - kw).float()
                p3[~high] = packed.p3.cpu().float()
            fixed = torch.where(hw, 0.0, p3[:, col] * (2 * u - 1))
        self.register_buffer("col", col)
        self.register_buffer("high", high)
        self.register_buffer("hw", hw)
        self.register_buffer("code", torch.where(hw, q, 2 * t - 1))   # q in high cells, ±1 in binary cells
        self.register_buffer("fixed", fixed)
        self.register_buffer("p1", packed.p1.cpu().float())
        self.register_buffer("p2", packed.p2.cpu().float())
        self.gamma = nn.Parameter(torch.ones(m, packed.n_groups))
        self.delta = nn.Parameter(torch.zeros(m, packed.n_groups))
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    @staticmethod
    def applies(packed) -> bool:
        return isinstance(packed, MixedBinaryWeight)

    def param_groups(self, lr: float) -> list[dict]:
        return [{"params": [self.gamma, self.delta], "lr": lr}]

    def cells(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The trained ``(p1, p2)`` (m, G) float32: ``(α, μ)`` in binary cells, ``(s, z)`` in high cells."""
        p1 = self.p1 * self.gamma
        p2 = torch.where(self.high, self.p2 + self.delta, self.p2 + self.delta * self.p1)
        return p1, p2

    def weight(self) -> torch.Tensor:
        p1, p2 = self.cells()
        P1, P2 = p1[:, self.col], p2[:, self.col]
        return torch.where(self.hw, P1 * (self.code - P2), P2 + P1 * self.code + self.fixed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight().T
        return y if self.bias is None else y + self.bias

    def export(self) -> MixedBinaryWeight:
        """The trained weight, stored exactly like the solver's: codes unchanged, new fp16 ``p1, p2`` (CPU)."""
        with torch.no_grad():
            p1, p2 = self.cells()
        p = self.packed
        stored = {k: t.cpu() for k, t in p.tensors().items()}
        stored.update(p1=p1.cpu().half().contiguous(), p2=p2.cpu().half().contiguous())
        return dataclasses.replace(p, **stored)


class BlockFinetuner(finetune.BlockFinetuner):
    """The runner's per-block callback for ``--method squeeze --finetune``."""

    def __init__(self, steps: int, lr: float, progress: bool = True):
        super().__init__(TrainableMixed, steps, lr, progress)
