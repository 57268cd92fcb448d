"""GWQ's ``"int+outliers"`` weights on the fast path: the dense group kernel plus the sparse fp16 part.

``Ŵ = D + S`` (see :class:`~lowbit.packed.qweight.OutlierQuantWeight`), so for ``x`` (…, n)

    y = x Dᵀ + x Sᵀ,      (x Sᵀ)[t, i] = Σ_{k ∈ row i} val_k · x[t, col_k]

* few tokens (decoding): ``x Dᵀ`` by :func:`lowbit.kernels.group_cpu.matmul` (weights stay packed), the
  sparse part by a small compiled CSR kernel (:mod:`.outliers_src`) reading the stored ``rowptr``/``col``/``val``
  as they are — O(nnz), ≈ 3× faster than PyTorch's gather + ``index_add_`` on one thread;
* many tokens (prefill): ``Ŵ`` is built once (the group kernel's dequantization + the outliers added at
  their positions, exactly the reference ``dequantize``) and multiplied by BLAS.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import group_cpu
from .build import load_extension
from .outliers_src import SOURCE

_state: dict = {}


def _load():
    return load_extension(_state, "lowbit_outliers_cpu", SOURCE, ["-O3", "-march=native", "-fopenmp"],
                          "sparse outlier kernel")


def supports(packed, x: torch.Tensor) -> bool:
    return getattr(packed, "kind", None) == "int+outliers" and group_cpu.supports(packed.dense, x)


def available() -> bool:
    return group_cpu.available() and _load() is not None


def unavailable_reason() -> str | None:
    if not group_cpu.available():
        return group_cpu.unavailable_reason()
    _load()
    return _state.get("error")


def plan(packed, int8_act: bool = False):
    """``x -> x Ŵᵀ`` (…, m) in ``x.dtype``; ``int8_act`` as in :func:`lowbit.kernels.group_cpu.plan` (dense part)."""
    m, n = packed.shape
    dense = group_cpu.plan(packed.dense, int8_act)
    csr = (packed.outlier_rowptr, packed.outlier_col, packed.outlier_val)
    mod = _load()

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
