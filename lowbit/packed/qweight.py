"""Group-wise integer formats: ``int`` (GPTQ-style grid) and ``int+outliers`` (the grid plus fp16 CSR outliers).

The protocol every format implements, the format table and the strict metadata readers live in
:mod:`lowbit.packed.base`; they are re-exported here for the code that imports them from this module.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import bitpack
from .base import (FORMATS, FormatError, PackedWeight, _expect, expect, from_tensors, meta_bool, meta_int,  # noqa: F401
                   meta_shape, meta_str, register_format)


@register_format
@dataclass(frozen=True)
class GroupQuantWeight(PackedWeight):
    """Group-wise uniform integer weight ``Ŵ[i, j] = scale[i, g(j)]·(q[i, j] − zero[i, g(j)])``.

    Shapes, for ``W`` (m, n), group size ``gs`` and ``G = ceil(n/gs)`` groups (the last may be partial):

    * ``qweight``  int32 ``(m, ceil(n/32)·bits)`` — codes in original column order, bit-packed;
    * ``scales``   fp16  ``(m, G)``;
    * ``qzeros``   int32 ``(G, ceil(m/32)·bits)`` — integer zero points, packed along the output axis
      (few groups per row would waste most of a word); ``None`` when symmetric (zero = ``2^(bits−1)``);
    * ``g_idx``    int32 ``(n,)`` — group of each input column; ``None`` when groups are contiguous
      (``g(j) = j // gs``), which is the case unless act-order ran without static groups.
    """

    kind = "int"
    shape: tuple[int, int]
    bits: int
    group_size: int
    qweight: torch.Tensor
    scales: torch.Tensor
    qzeros: torch.Tensor | None = None
    g_idx: torch.Tensor | None = None

    @property
    def sym(self) -> bool:
        return self.qzeros is None

    @property
    def n_groups(self) -> int:
        return -(-self.shape[1] // self.group_size)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                   group_size: int, g_idx: torch.Tensor | None = None) -> "GroupQuantWeight":
        """Pack integer ``codes`` (m, n), float ``scales``/``zeros`` (m, G) (``zeros=None``: symmetric)."""
        m, n = codes.shape
        return cls(
            shape=(m, n), bits=bits, group_size=group_size,
            qweight=bitpack.pack(codes, bits).cpu(),
            scales=scales.to(torch.float16).cpu().contiguous(),
            qzeros=None if zeros is None else bitpack.pack(zeros.round().to(torch.int64).t(), bits).cpu(),
            g_idx=None if g_idx is None else g_idx.to(torch.int32).cpu().contiguous(),
        )

    def codes(self) -> torch.Tensor:
        """Integer codes (m, n) int64."""
        return bitpack.unpack(self.qweight, self.bits, self.shape[1])

    def zeros(self) -> torch.Tensor:
        """Zero points (m, G) as float32."""
        m = self.shape[0]
        if self.qzeros is None:
            return torch.full((m, self.n_groups), float(2 ** (self.bits - 1)), device=self.scales.device)
        return bitpack.unpack(self.qzeros, self.bits, m).t().float()

    def column_groups(self) -> torch.Tensor:
        """Group index of every input column (n,) int64."""
        if self.g_idx is not None:
            return self.g_idx.long()
        return torch.arange(self.shape[1], device=self.scales.device) // self.group_size

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight ``(m, n)``: ``scales[:, g] · (codes − zeros[:, g])``."""
        g = self.column_groups()
        scale = self.scales.float()[:, g]
        zero = self.zeros()[:, g]
        return (scale * (self.codes().float() - zero)).to(dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"qweight": self.qweight, "scales": self.scales}
        if self.qzeros is not None:
            out["qzeros"] = self.qzeros
        if self.g_idx is not None:
            out["g_idx"] = self.g_idx
        return out

    def meta(self) -> dict:
        return {"kind": self.kind, "shape": list(self.shape), "bits": self.bits, "group_size": self.group_size,
                "sym": self.sym, "g_idx": self.g_idx is not None}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "GroupQuantWeight":
        m, n = meta_shape(meta)
        bits, gs = meta_int(meta, "bits", 1, 8), meta_int(meta, "group_size", 1)
        sym, has_gidx = meta_bool(meta, "sym"), meta_bool(meta, "g_idx")
        n_groups = -(-n // gs)
        g_idx = expect(tensors, "g_idx", torch.int32, (n,)) if has_gidx else None
        if g_idx is not None and n and (int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups):
            raise FormatError(f"tensor 'g_idx' has group indices outside 0..{n_groups - 1}")
        return cls(
            shape=(m, n), bits=bits, group_size=gs,
            qweight=expect(tensors, "qweight", torch.int32, (m, bitpack.packed_width(n, bits))),
            scales=expect(tensors, "scales", torch.float16, (m, n_groups)),
            qzeros=None if sym else expect(tensors, "qzeros", torch.int32, (n_groups, bitpack.packed_width(m, bits))),
            g_idx=g_idx,
        )


@register_format
@dataclass(frozen=True)
class OutlierQuantWeight(PackedWeight):
    """Group-wise integer weight plus exact fp16 outliers in CSR form (GWQ, SpQR-style storage).

    ``Ŵ = D + S``: ``D`` is the :class:`GroupQuantWeight` held by the first seven fields (its codes
    at outlier positions are the zero point, so ``D`` is 0 there) and ``S`` (m, n) is sparse with
    ``nnz`` fp16 values:

    * ``outlier_rowptr`` int32 ``(m + 1,)`` — row ``i``'s entries are ``rowptr[i]:rowptr[i+1]``;
    * ``outlier_col``    int16 ``(nnz,)`` when ``n ≤ 32768`` else int32 — column of each entry;
    * ``outlier_val``    fp16  ``(nnz,)``.

    At 1 % outliers the sparse part costs ≈ 0.01·(16 + 16) = 0.32 bits per weight (+ row pointers).
    """

    kind = "int+outliers"
    shape: tuple[int, int]
    bits: int
    group_size: int
    qweight: torch.Tensor
    scales: torch.Tensor
    qzeros: torch.Tensor | None
    g_idx: torch.Tensor | None
    outlier_rowptr: torch.Tensor
    outlier_col: torch.Tensor
    outlier_val: torch.Tensor

    @classmethod
    def from_dense(cls, dense: GroupQuantWeight, values: torch.Tensor, mask: torch.Tensor) -> "OutlierQuantWeight":
        """``dense`` (zero at the outliers) + the entries of ``values`` (m, n) where ``mask`` (m, n) is set."""
        m, n = dense.shape
        mask = mask.cpu()
        rows, cols = mask.nonzero(as_tuple=True)  # row-major order, as CSR needs
        rowptr = torch.zeros(m + 1, dtype=torch.int32)
        rowptr[1:] = torch.cumsum(mask.sum(dim=1), 0).to(torch.int32)
        return cls(dense.shape, dense.bits, dense.group_size, dense.qweight, dense.scales, dense.qzeros, dense.g_idx,
                   outlier_rowptr=rowptr, outlier_col=cols.to(_col_dtype(n)),
                   outlier_val=values.cpu()[rows, cols].to(torch.float16))

    @property
    def dense(self) -> GroupQuantWeight:
        return GroupQuantWeight(self.shape, self.bits, self.group_size, self.qweight, self.scales, self.qzeros, self.g_idx)

    @property
    def nnz(self) -> int:
        return int(self.outlier_val.numel())

    def sparse(self) -> torch.Tensor:
        """The outliers as a torch sparse CSR tensor (m, n), fp16 values."""
        return torch.sparse_csr_tensor(self.outlier_rowptr, self.outlier_col.long(), self.outlier_val, self.shape)

    def outlier_coords(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Row and column index (nnz,) int64 of every outlier."""
        counts = (self.outlier_rowptr[1:] - self.outlier_rowptr[:-1]).long()
        rows = torch.repeat_interleave(torch.arange(self.shape[0], device=counts.device), counts)
        return rows, self.outlier_col.long()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = self.dense.dequantize(torch.float32)
        rows, cols = self.outlier_coords()
        w[rows, cols] += self.outlier_val.float()
        return w.to(dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**self.dense.tensors(), "outlier_rowptr": self.outlier_rowptr, "outlier_col": self.outlier_col,
                "outlier_val": self.outlier_val}

    def meta(self) -> dict:
        return {**self.dense.meta(), "kind": self.kind, "nnz": self.nnz}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "OutlierQuantWeight":
        dense = GroupQuantWeight.from_tensors(tensors, {**meta, "kind": GroupQuantWeight.kind})
        m, n = dense.shape
        nnz = meta_int(meta, "nnz", 0, m * n)
        rowptr = expect(tensors, "outlier_rowptr", torch.int32, (m + 1,))
        col = expect(tensors, "outlier_col", _col_dtype(n), (nnz,))
        val = expect(tensors, "outlier_val", torch.float16, (nnz,))
        if int(rowptr[0]) != 0 or int(rowptr[-1]) != nnz or bool((rowptr[1:] < rowptr[:-1]).any()):
            raise FormatError("tensor 'outlier_rowptr' is not a valid CSR row pointer")
        if nnz and (int(col.min()) < 0 or int(col.max()) >= n):
            raise FormatError(f"tensor 'outlier_col' has columns outside 0..{n - 1}")
        return cls(dense.shape, dense.bits, dense.group_size, dense.qweight, dense.scales, dense.qzeros, dense.g_idx,
                   outlier_rowptr=rowptr, outlier_col=col, outlier_val=val)


def _col_dtype(n: int) -> torch.dtype:
    return torch.int16 if n <= 32768 else torch.int32

