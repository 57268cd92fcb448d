"""Packed quantized weights: frozen dataclasses of plain tensors plus JSON-safe metadata.

Every packed format implements the same small interface, so the checkpoint code, the inference
module and the bit accounting never branch on the method:

* ``kind``                          — the format's name in ``lowbit.json``;
* ``tensors() -> dict[str, Tensor]`` — what goes into safetensors (suffixes of the layer name);
* ``meta() -> dict``                — JSON-safe settings needed to read the tensors back;
* ``from_tensors(tensors, meta)``   — the inverse, validating keys, dtypes and shapes;
* ``dequantize() -> Tensor (m, n)`` — the float weight (reference path);
* ``stored_bits()``                 — every bit stored for this weight (codes, scales, zeros, indices).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import bitpack


class FormatError(ValueError):
    """Packed tensors that do not match their metadata (wrong keys, dtypes or shapes)."""


def _expect(tensors: dict, key: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """``tensors[key]``, which must have exactly ``dtype`` and ``shape`` and, when floating point, finite values."""
    if key not in tensors:
        raise FormatError(f"missing tensor '{key}'")
    t = tensors[key]
    if t.dtype != dtype or tuple(t.shape) != tuple(shape):
        raise FormatError(f"tensor '{key}' is {t.dtype} {tuple(t.shape)}, expected {dtype} {tuple(shape)}")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise FormatError(f"tensor '{key}' holds NaN or infinite values")
    return t


# Layer metadata is read strictly: lowbit writes JSON integers, booleans and strings, so a float, a string of
# digits, or 1 for true is damage, not a value to coerce (``int("4")``, ``bool("false")`` would accept garbage).

def meta_int(meta: dict, key: str, lo: int = 1, hi: int | None = None) -> int:
    """``meta[key]``: an integer (not a bool) in ``lo..hi``."""
    v = meta.get(key)
    if type(v) is not int or v < lo or (hi is not None and v > hi):
        raise FormatError(f"layer metadata '{key}' must be an integer in {lo}..{'' if hi is None else hi}, got {v!r}")
    return v


def meta_bool(meta: dict, key: str, default: bool | None = None) -> bool:
    """``meta[key]``: true or false (``default`` when absent, if given)."""
    v = meta.get(key, default)
    if not isinstance(v, bool):
        raise FormatError(f"layer metadata '{key}' must be true or false, got {v!r}")
    return v


def meta_str(meta: dict, key: str, choices: tuple[str, ...]) -> str:
    """``meta[key]``: one of ``choices``."""
    v = meta.get(key)
    if not isinstance(v, str) or v not in choices:
        raise FormatError(f"layer metadata '{key}' must be one of {', '.join(choices)}, got {v!r}")
    return v


def meta_shape(meta: dict) -> tuple[int, int]:
    """``meta["shape"]``: ``[m, n]``, two positive integers."""
    v = meta.get("shape")
    if not isinstance(v, list) or len(v) != 2 or any(type(d) is not int or d < 1 for d in v):
        raise FormatError(f"layer metadata 'shape' must be [rows, columns] of positive integers, got {v!r}")
    return v[0], v[1]


@dataclass(frozen=True)
class GroupQuantWeight:
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
        g_idx = _expect(tensors, "g_idx", torch.int32, (n,)) if has_gidx else None
        if g_idx is not None and n and (int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups):
            raise FormatError(f"tensor 'g_idx' has group indices outside 0..{n_groups - 1}")
        return cls(
            shape=(m, n), bits=bits, group_size=gs,
            qweight=_expect(tensors, "qweight", torch.int32, (m, bitpack.packed_width(n, bits))),
            scales=_expect(tensors, "scales", torch.float16, (m, n_groups)),
            qzeros=None if sym else _expect(tensors, "qzeros", torch.int32, (n_groups, bitpack.packed_width(m, bits))),
            g_idx=g_idx,
        )

    def stored_bits(self) -> int:
        return sum(t.numel() * t.element_size() * 8 for t in self.tensors().values())


@dataclass(frozen=True)
class OutlierQuantWeight:
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
        rowptr = _expect(tensors, "outlier_rowptr", torch.int32, (m + 1,))
        col = _expect(tensors, "outlier_col", _col_dtype(n), (nnz,))
        val = _expect(tensors, "outlier_val", torch.float16, (nnz,))
        if int(rowptr[0]) != 0 or int(rowptr[-1]) != nnz or bool((rowptr[1:] < rowptr[:-1]).any()):
            raise FormatError("tensor 'outlier_rowptr' is not a valid CSR row pointer")
        if nnz and (int(col.min()) < 0 or int(col.max()) >= n):
            raise FormatError(f"tensor 'outlier_col' has columns outside 0..{n - 1}")
        return cls(dense.shape, dense.bits, dense.group_size, dense.qweight, dense.scales, dense.qzeros, dense.g_idx,
                   outlier_rowptr=rowptr, outlier_col=col, outlier_val=val)

    def stored_bits(self) -> int:
        return sum(t.numel() * t.element_size() * 8 for t in self.tensors().values())


def _col_dtype(n: int) -> torch.dtype:
    return torch.int16 if n <= 32768 else torch.int32


FORMATS = {GroupQuantWeight.kind: GroupQuantWeight, OutlierQuantWeight.kind: OutlierQuantWeight}


def _register_more() -> None:
    from .mixed import MixedBinaryWeight  # its module builds on this one, so it is imported last

    FORMATS[MixedBinaryWeight.kind] = MixedBinaryWeight
    from .quipw import QuipWeight  # QuIP#'s lattice codes + RHT signs

    FORMATS[QuipWeight.kind] = QuipWeight
    from .ggufw import GGUFWeight  # GGUF blocks exactly as llama.cpp reads them (lowbit.gguf)

    FORMATS[GGUFWeight.kind] = GGUFWeight


def from_tensors(tensors: dict[str, torch.Tensor], meta: dict):
    """Rebuild a packed weight of any registered format from its tensors and metadata."""
    kind = meta.get("kind") if isinstance(meta, dict) else None
    if not isinstance(kind, str) or kind not in FORMATS:  # (a list or dict from a damaged lowbit.json is unhashable)
        raise FormatError(f"unknown packed format {kind!r}")
    packed = FORMATS[kind].from_tensors(tensors, meta)
    extra = sorted(set(tensors) - set(packed.tensors()))
    if extra:  # a tensor the metadata does not account for (e.g. a g_idx with "g_idx": false) would be ignored
        raise FormatError(f"unexpected tensor '{extra[0]}' for a {kind} layer with this metadata")
    return packed


_register_more()
