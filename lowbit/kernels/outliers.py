"""GWQ's ``"int+outliers"`` weights on the fast path: the dense group kernel plus the sparse fp16 part.

``Ŵ = D + S`` (see :class:`~lowbit.packed.qweight.OutlierQuantWeight`), so for ``x`` (…, n)

    y = x Dᵀ + x Sᵀ,      (x Sᵀ)[t, i] = Σ_{k ∈ row i} val_k · x[t, col_k]

* few tokens (decoding): ``x Dᵀ`` by :func:`lowbit.kernels.group_cpu.matmul` (weights stay packed), the
  sparse part as one gather ``x[:, col] · val`` (T, nnz) and one ``index_add_`` over the rows — O(nnz);
* many tokens (prefill): ``Ŵ`` is built once (the group kernel's dequantization + the outliers added at
  their positions, exactly the reference ``dequantize``) and multiplied by BLAS.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import group_cpu


def supports(packed, x: torch.Tensor) -> bool:
    return getattr(packed, "kind", None) == "int+outliers" and group_cpu.supports(packed.dense, x)


def available() -> bool:
    return group_cpu.available()


def unavailable_reason() -> str | None:
    return group_cpu.unavailable_reason()


def plan(packed, int8_act: bool = False):
    """``x -> x Ŵᵀ`` (…, m) in ``x.dtype``; ``int8_act`` as in :func:`lowbit.kernels.group_cpu.plan` (dense part)."""
    m, n = packed.shape
    dense = group_cpu.plan(packed.dense, int8_act)
    rows, cols = packed.outlier_coords()
    val = packed.outlier_val.float()

    def run(x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, n)
        if x2.shape[0] > group_cpu.GEMV_MAX_TOKENS:
            w = group_cpu.dequantize(packed.dense)
            w[rows, cols] += val
            return F.linear(x, w.to(x.dtype))
        xf = x2.float()
        y = dense(xf)
        y.index_add_(1, rows, xf[:, cols] * val)
        return y.to(x.dtype).view(*x.shape[:-1], m)

    return run


def matmul(packed, x: torch.Tensor, int8_act: bool = False) -> torch.Tensor:
    """``y = x Ŵᵀ`` (…, m): :func:`plan` ``(packed, int8_act)(x)``."""
    return plan(packed, int8_act)(x)
