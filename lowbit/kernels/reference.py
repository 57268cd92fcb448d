"""Reference kernels in plain PyTorch: the ground truth every fast kernel is tested against.

``matmul(packed, x)``: ``y = x Ŵᵀ`` with ``x`` (…, n) and ``Ŵ = packed.dequantize()`` (m, n) ->
``y`` (…, m) in ``x.dtype``.  Works for every packed format (it only needs ``dequantize``), on any
device, with autograd; it materializes the whole float weight for the duration of the call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def matmul(packed, x: torch.Tensor) -> torch.Tensor:
    """``x`` (…, n) -> ``x @ packed.dequantize(x.dtype).T`` (…, m)."""
    return F.linear(x, packed.dequantize(x.dtype))


def dequantize(packed) -> torch.Tensor:
    """``Ŵ`` (m, n) fp32."""
    return packed.dequantize(torch.float32)
