"""Trainable views of packed weights for the per-block fine-tuning loop (:mod:`lowbit.calib.finetune`).

A view is an ``nn.Module`` ``(packed, bias)`` over one packed linear whose codes stay frozen and whose few real
parameters are trained: ``forward(x)``, ``param_groups(lr) -> list`` (Adam groups), ``export() -> packed`` (the
trained weight in its stored format, on the CPU) and ``applies(packed)`` (whether it trains that weight).
:data:`VIEWS` maps a packed ``kind`` to its view (``@view_of(Format)``); each view reads its format's own
decoding (``QuipWeight.stage_terms``, ``MixedBinaryWeight.planes``) instead of unpacking the tensors again.

**QuIP#** (``--method quip --finetune``).  Each linear ``y = diag(s_u) T_mᵀ W̃ T_n diag(s_v) x`` with
``W̃ = Σ_k g_k·scales[k]·C_k`` (codes ``C_k`` frozen) gets trainable real vectors ``s_u`` (m,), ``s_v`` (n,)
(initialised to the ±1 signs) and per-stage gains ``g_k`` (init 1); signs at lr = ``ft_lr``, gains at
``ft_lr/10``.  The trained signs are stored as fp16 vectors (``QuipWeight.sign_mode == "real"``: +16·(m + n)
bits per matrix, counted in bits/weight).  Not done (the paper's fuller recipe): updating the still-unquantized
weights between the block's matrices, and the end-to-end stage (signs, scales and lm_head against the FP logits).

**Squeeze10** (``--method squeeze --finetune``, FIAS's "short per-block reconstruction of scales").  Every cell's
two fp16 parameters are trained.  Per cell ``(i, g)`` with stored ``p1⁰, p2⁰``, in scale-free units:

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

from ..packed.mixed import MixedBinaryWeight
from ..packed.quipw import QuipWeight
from ..packed.rht import rht_forward, rht_inverse

VIEWS: dict[str, type[nn.Module]] = {}


def view_of(fmt: type):
    """Class decorator: register a trainable view of packed format ``fmt`` in :data:`VIEWS` (by ``fmt.kind``)."""
    def add(view: type[nn.Module]) -> type[nn.Module]:
        VIEWS[fmt.kind] = view
        return view
    return add


def _frozen_bias(bias: torch.Tensor | None) -> nn.Parameter | None:
    return None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)


@view_of(QuipWeight)
class TrainableQuip(nn.Module):
    """A QuIP# linear with real-valued ``su``, ``sv`` and per-stage ``gain`` as parameters; codes frozen."""

    def __init__(self, packed: QuipWeight, bias: torch.Tensor | None):
        super().__init__()
        self.packed = packed
        su, sv = packed.signs()
        self.su, self.sv = nn.Parameter(su.float().clone()), nn.Parameter(sv.float().clone())
        self.gain = nn.Parameter(torch.ones(len(packed.stages)))
        self.register_buffer("C", torch.stack(packed.stage_terms()))          # (stages, m, n): scales[k]·C_k
        self.bias = _frozen_bias(bias)

    @staticmethod
    def applies(packed) -> bool:
        return isinstance(packed, QuipWeight) and packed.sign_mode != "none"

    def param_groups(self, lr: float) -> list[dict]:
        return [{"params": [self.su, self.sv], "lr": lr}, {"params": [self.gain], "lr": lr / 10}]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        Wt = (self.gain[:, None, None] * self.C).sum(0)                       # W̃ (m, n)
        y = rht_inverse(rht_forward(x, self.sv, self.packed.in_kind) @ Wt.T, self.su, self.packed.out_kind)
        return y if self.bias is None else y + self.bias

    def export(self) -> QuipWeight:
        """The trained weight: real signs in fp16, scales × gains (float32), codes unchanged (CPU)."""
        p = self.packed
        return dataclasses.replace(p, codes=p.codes.cpu(), codes2=None if p.codes2 is None else p.codes2.cpu(),
                                   scales=(p.scales.cpu().float() * self.gain.detach().cpu()).contiguous(),
                                   su=self.su.detach().cpu().half(), sv=self.sv.detach().cpu().half())


@view_of(MixedBinaryWeight)
class TrainableMixed(nn.Module):
    """A Squeeze10 linear with trainable per-cell ``gamma`` (scale factor) and ``delta`` (offset shift)."""

    def __init__(self, packed: MixedBinaryWeight, bias: torch.Tensor | None):
        super().__init__()
        m, n = packed.shape
        self.packed = packed
        d = packed.planes()
        fixed = torch.zeros(m, n) if d.u is None else torch.where(d.high_w, 0.0, d.p3[:, d.col] * (2 * d.u - 1))
        self.register_buffer("col", d.col)
        self.register_buffer("high", d.high)
        self.register_buffer("hw", d.high_w)
        self.register_buffer("code", torch.where(d.high_w, d.q, 2 * d.t - 1))  # q in high cells, ±1 in binary cells
        self.register_buffer("fixed", fixed)               # residual term α₂·(2u − 1) of binary weights (frozen)
        self.register_buffer("p1", packed.p1.float())
        self.register_buffer("p2", packed.p2.float())
        self.gamma = nn.Parameter(torch.ones(m, packed.n_groups))
        self.delta = nn.Parameter(torch.zeros(m, packed.n_groups))
        self.bias = _frozen_bias(bias)

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
