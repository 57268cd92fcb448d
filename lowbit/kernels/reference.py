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


def int8_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x̂``: each run of ``block`` values of ``x`` (…, n) (n a multiple of ``block``) rounded to int8 with its
    own scale ``d = max|x_b| / 127`` (``x̂ = d · round(x / d)``, half to even; ``d = 0`` gives 0) — the
    activations the int8-activation decode kernel multiplies with, in fp32."""
    xb = x.float().reshape(*x.shape[:-1], -1, block)
    d = xb.abs().amax(-1, keepdim=True) / 127.0
    q = torch.where(d > 0, torch.round(xb / torch.where(d > 0, d, torch.ones_like(d))), torch.zeros_like(xb))
    return (q * d).reshape(x.shape)
