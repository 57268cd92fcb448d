"""Squeeze10's mixed 1-bit / high-bit weight: each (row, group) cell is either binary or integer.

For ``W`` (m, n), group size ``gs``, ``G = ceil(n/gs)`` groups and high width ``b`` (4), a cell
``(i, g)`` is

* binary  (``mask[i, g] = 0``):  ``ŵ = μ + α·(2·t − 1)``,  ``t ∈ {0, 1}``  (``p1 = α``, ``p2 = μ``);
  with residual binarization (``meta()["binary_residual"]``, BiLLM-style)
  ``ŵ = μ + α₁·(2·t − 1) + α₂·(2·u − 1)``, ``u ∈ {0, 1}`` (``p1 = α₁``, ``p2 = μ``, ``α₂`` in ``p3``);
* high    (``mask[i, g] = 1``):  ``ŵ = s·(q − z)``,  ``q = 2^(b−1)·t + r ∈ [0, 2^b)``  (``p1 = s``, ``p2 = z``).

The top bit ``t`` of every weight lives in one 1-bit plane; only high cells store the remaining
``b − 1`` bits ``r``, so the codes cost exactly ``1 + (b − 1)·(high fraction)`` bits per weight:

* ``qsign``  int32 ``(m, ceil(n/32))``          — the bit plane ``t`` (original column order);
* ``qrest``  int32 ``(ceil(Kw/32)·(b − 1),)``  — ``r`` of the ``Kw`` weights in high cells, one flat
  stream in row-major ``(i, j)`` order (the mask says where each goes, so no padding);
* ``mask``   int32 ``(ceil(m·G/32),)``          — one bit per cell, row-major, 1 = high;
* ``p1, p2`` fp16 ``(m, G)``                    — ``α, μ`` or ``s, z`` per cell.

At 80 % binary cells, ``b = 4`` and ``gs = 128`` that is ``1 + 0.6 + 32/128 + 1/128 ≈ 1.86`` bits/weight.

Residual binarization adds two tensors (absent otherwise, so older checkpoints load unchanged):

* ``qres``  int32 ``(ceil(Kb/32),)``  — the second sign ``u`` of the ``Kb`` weights in binary cells, one
  flat 1-bit stream in row-major ``(i, j)`` order (like ``qrest``);
* ``p3``    fp16  ``(m·G − high cells,)`` — ``α₂`` of every binary cell, row-major over the binary cells.

That is ``+1`` bit per binary weight and ``+16`` bits per binary cell: ``≈ 1.86 + 0.8 + 0.1 = 2.76``
bits/weight at the same setting.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import bitpack
from .base import FormatError, PackedWeight, expect, meta_bool, meta_int, meta_shape, register_format


class MixedPlanes(NamedTuple):
    """A :class:`MixedBinaryWeight`'s codes, unpacked: ``high`` (m, G) bool (high cells), ``col`` (n,) int64 (group
    of each column), ``high_w`` (m, n) bool (weights in high cells), ``t`` (m, n) the top-bit plane, ``q`` (m, n)
    the high-bit code ``2^(b−1)·t + r`` (only ``2^(b−1)·t`` in binary cells), and with residual binarization
    ``u`` (m, n) the second sign (0 in high cells) and ``p3`` (m, G) the cells' ``α₂`` (0 in high cells), else
    None; all float32 but the masks and ``col``."""

    high: torch.Tensor
    col: torch.Tensor
    high_w: torch.Tensor
    t: torch.Tensor
    q: torch.Tensor
    u: torch.Tensor | None
    p3: torch.Tensor | None


@register_format
@dataclass(frozen=True)
class MixedBinaryWeight(PackedWeight):
    kind = "bin+int"
    shape: tuple[int, int]
    high_bits: int
    group_size: int
    qsign: torch.Tensor
    qrest: torch.Tensor
    mask: torch.Tensor
    p1: torch.Tensor
    p2: torch.Tensor
    qres: torch.Tensor | None = None  # residual binarization: second sign plane of the binary weights
    p3: torch.Tensor | None = None    # residual binarization: α₂ of the binary cells (flat, fp16)

    @property
    def binary_residual(self) -> bool:
        return self.qres is not None

    @property
    def n_groups(self) -> int:
        return -(-self.shape[1] // self.group_size)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, high: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor, high_bits: int,
                   group_size: int, res: torch.Tensor | None = None,
                   p3: torch.Tensor | None = None) -> "MixedBinaryWeight":
        """``codes`` (m, n) int: ``t ∈ {0,1}`` in binary cells, ``q ∈ [0, 2^b)`` in high cells;
        ``high`` (m, G) bool; ``p1``/``p2`` (m, G) float (rounded to fp16 here).  Residual
        binarization: ``res`` (m, n) int, the second sign ``u ∈ {0,1}`` (read in binary cells only),
        and ``p3`` (m, G) float, ``α₂`` (read in binary cells only); both or neither."""
        if (res is None) != (p3 is None):
            raise ValueError("residual binarization needs both res and p3")
        m, n = codes.shape
        codes, high = codes.cpu().long(), high.cpu().bool()
        half = 2 ** (high_bits - 1)
        col_group = torch.arange(n) // group_size
        high_w = high[:, col_group]                                       # (m, n) weights in high cells
        top = torch.where(high_w, codes // half, codes)
        rest = (codes % half)[high_w]                                     # (Kw,) row-major
        extra = {}
        if res is not None:
            extra = {"qres": bitpack.pack(res.cpu().long()[~high_w], 1),  # (Kb,) row-major
                     "p3": p3.cpu()[~high].to(torch.float16).contiguous()}
        return cls((m, n), high_bits, group_size,
                   qsign=bitpack.pack(top, 1), qrest=bitpack.pack(rest, high_bits - 1),
                   mask=bitpack.pack(high.long().flatten(), 1),
                   p1=p1.to(torch.float16).cpu().contiguous(), p2=p2.to(torch.float16).cpu().contiguous(), **extra)

    def high_cells(self) -> torch.Tensor:
        """(m, G) bool: which cells are high-bit."""
        m, G = self.shape[0], self.n_groups
        return bitpack.unpack(self.mask, 1, m * G).view(m, G).bool()

    def planes(self) -> MixedPlanes:
        """The stored codes unpacked (see :class:`MixedPlanes`), on the tensors' device."""
        m, n = self.shape
        high = self.high_cells()
        t = bitpack.unpack(self.qsign, 1, n).float()                      # (m, n)
        col = torch.arange(n, device=t.device) // self.group_size
        high_w = high[:, col]
        q = torch.zeros(m, n, dtype=torch.float32, device=t.device)
        kw = int(high_w.sum())
        if kw:
            q[high_w] = bitpack.unpack(self.qrest, self.high_bits - 1, kw).float()
        q = q + t * 2 ** (self.high_bits - 1)
        u = p3 = None
        if self.binary_residual:
            u = torch.zeros(m, n, dtype=torch.float32, device=t.device)
            p3 = torch.zeros(m, self.n_groups, dtype=torch.float32, device=t.device)
            if m * n - kw:
                u[~high_w] = bitpack.unpack(self.qres, 1, m * n - kw).float()
                p3[~high] = self.p3.float()
        return MixedPlanes(high, col, high_w, t, q, u, p3)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        d = self.planes()
        p1, p2 = self.p1.float()[:, d.col], self.p2.float()[:, d.col]
        binary = p2 + p1 * (2 * d.t - 1)
        if d.u is not None:
            binary = binary + d.p3[:, d.col] * (2 * d.u - 1)      # the solver's order of operations: exact
        w = torch.where(d.high_w, p1 * (d.q - p2), binary)
        return w.to(dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"qsign": self.qsign, "qrest": self.qrest, "mask": self.mask, "p1": self.p1, "p2": self.p2}
        if self.binary_residual:
            out.update(qres=self.qres, p3=self.p3)
        return out

    def meta(self) -> dict:
        return {"kind": self.kind, "shape": list(self.shape), "high_bits": self.high_bits,
                "group_size": self.group_size, "high_cells": int(self.high_cells().sum()),
                "binary_residual": self.binary_residual}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "MixedBinaryWeight":
        m, n = meta_shape(meta)
        b, gs = meta_int(meta, "high_bits", 2, 8), meta_int(meta, "group_size", 1)
        residual = meta_bool(meta, "binary_residual", False)  # absent in checkpoints written before the option
        G = -(-n // gs)
        k = meta_int(meta, "high_cells", 0, m * G)
        # the tensors whose shapes follow from (m, n, G) first: they bound the work of counting the cells below
        qsign = expect(tensors, "qsign", torch.int32, (m, bitpack.packed_width(n, 1)))
        p1, p2 = expect(tensors, "p1", torch.float16, (m, G)), expect(tensors, "p2", torch.float16, (m, G))
        mask = expect(tensors, "mask", torch.int32, (bitpack.packed_width(m * G, 1),))
        high = bitpack.unpack(mask, 1, m * G).view(m, G).bool()
        if int(high.sum()) != k:
            raise FormatError(f"tensor 'mask' marks a different number of high cells than {k}")
        kw = int(high.sum(dim=0)[torch.arange(n) // gs].sum())  # weights in high cells: Σ_j (high cells of j's group)
        extra = {}
        if residual:
            extra = {"qres": expect(tensors, "qres", torch.int32, (bitpack.packed_width(m * n - kw, 1),)),
                     "p3": expect(tensors, "p3", torch.float16, (m * G - k,))}
        return cls((m, n), b, gs, qsign=qsign,
                   qrest=expect(tensors, "qrest", torch.int32, (bitpack.packed_width(kw, b - 1),)),
                   mask=mask, p1=p1, p2=p2, **extra)
