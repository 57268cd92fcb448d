"""GWQ's ``"int+outliers"`` weights on the fast path: the dense group kernel plus the sparse fp16 part.

``Ŵ = D + S`` (see :class:`~lowbit.packed.qweight.OutlierQuantWeight`), so for ``x`` (…, n)

    y = x Dᵀ + x Sᵀ,      (x Sᵀ)[t, i] = Σ_{k ∈ row i} val_k · x[t, col_k]

* few tokens (decoding): ``x Dᵀ`` by :func:`lowbit.kernels.group_cpu.matmul` (weights stay packed), the
  sparse part by a small compiled CSR kernel (``csrc/outliers.cpp``) reading the stored ``rowptr``/``col``/``val``
  as they are — O(nnz), ≈ 3× faster than PyTorch's gather + ``index_add_`` on one thread;
* many tokens (prefill): ``Ŵ`` is built once (the group kernel's dequantization + the outliers added at
  their positions, exactly the reference ``dequantize``) and multiplied by BLAS.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import group_cpu
from .build import Extension
from .checks import cpu_tensor

EXT = Extension("outliers_cpu", "outliers.cpp", ("-O3", "-march=native", "-fopenmp"), "sparse outlier kernel")


def supports(packed, x: torch.Tensor) -> bool:
    """``"int+outliers"`` weights whose dense part :func:`lowbit.kernels.group_cpu.supports` takes and whose CSR
    tensors are ``outlier_rowptr`` int32 ``(m + 1,)``, ``outlier_col`` int16/int32 ``(nnz,)``, ``outlier_val``
    fp16 ``(nnz,)``, contiguous on the CPU."""
    if getattr(packed, "kind", None) != "int+outliers" or not group_cpu.supports(packed.dense, x):
        return False
    nnz = packed.outlier_val.numel()
    return (cpu_tensor(packed.outlier_rowptr, torch.int32, (packed.shape[0] + 1,))
            and cpu_tensor(packed.outlier_col, (torch.int16, torch.int32), (nnz,))
            and cpu_tensor(packed.outlier_val, torch.float16, (nnz,)))


def available() -> bool:
    return group_cpu.available() and EXT.available()


def unavailable_reason() -> str | None:
    return group_cpu.unavailable_reason() if not group_cpu.available() else EXT.reason()


def describe() -> str:
    return "CSR kernel for the outliers + group_cpu for the dense part"


def plan(packed, int8_act: bool = False):
    """``x -> x Ŵᵀ`` (…, m) in ``x.dtype``; ``int8_act`` as in :func:`lowbit.kernels.group_cpu.plan` (dense part)."""
    m, n = packed.shape
    dense = group_cpu.plan(packed.dense, int8_act)
    csr = (packed.outlier_rowptr, packed.outlier_col, packed.outlier_val)
    mod = EXT.load()

    def run(x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, n)
        if x2.shape[0] > group_cpu.GEMV_MAX_TOKENS:
            w = group_cpu.dequantize(packed.dense)
            rows, cols = packed.outlier_coords()
            w[rows, cols] += packed.outlier_val.float()
            return F.linear(x, w.to(x.dtype))
        xf = x2.float().contiguous()
        y = dense(xf).contiguous()
        mod.csr_add_(y, xf, *csr)
        return y.to(x.dtype).view(*x.shape[:-1], m)

    return run


def matmul(packed, x: torch.Tensor, int8_act: bool = False) -> torch.Tensor:
    """``y = x Ŵᵀ`` (…, m): :func:`plan` ``(packed, int8_act)(x)``."""
    return plan(packed, int8_act)(x)
