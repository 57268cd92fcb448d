"""``QuantLinear``: an ``nn.Linear`` stand-in that holds a packed weight and computes with it.

The packed tensors are registered as buffers (so ``.to(device)``, ``state_dict`` and memory
accounting see the real, small tensors).  ``forward`` is the reference path: dequantize the whole
weight to the input's dtype and call ``F.linear``; ``y = x Ŵᵀ + b`` with ``x`` (…, n), ``Ŵ`` (m, n).
"""
from __future__ import annotations

import dataclasses
import functools

import torch
from torch import nn


@functools.cache
def _kernels():
    """:mod:`lowbit.kernels`, imported on first use (it imports the packed formats)."""
    from .. import kernels

    return kernels


class QuantLinear(nn.Module):
    """A linear layer whose weight is a packed quantized weight (any registered format)."""

    def __init__(self, qweight, bias: torch.Tensor | None = None):
        super().__init__()
        self._template = qweight
        self.out_features, self.in_features = qweight.shape
        self._names = list(qweight.tensors())
        for name, t in qweight.tensors().items():
            self.register_buffer(name, t)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @property
    def packed(self):
        """The packed weight, rebuilt around the current buffers (on their current device)."""
        return dataclasses.replace(self._template, **{n: getattr(self, n) for n in self._names})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``y = x Ŵᵀ + b`` via :func:`lowbit.kernels.plan`: the fast kernel for this format where there is
        one (weights stay packed), else the reference ``x @ packed.dequantize(x.dtype).T``.  The plan is
        cached per (backend, dtype, device, autograd) and rebuilt when a buffer is replaced."""
        kernels = _kernels()
        key, bufs, cached = kernels.plan_key(x), self._buffers, self.__dict__.get("_plan")
        if cached is None or cached[0] != key or any(bufs[n] is not t for n, t in zip(self._names, cached[1])):
            cached = self.__dict__["_plan"] = (key, [bufs[n] for n in self._names], kernels.plan(self.packed, x))
        y = cached[2](x)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        meta = self._template.meta()
        return f"in_features={self.in_features}, out_features={self.out_features}, " + ", ".join(
            f"{k}={v}" for k, v in meta.items() if k not in ("shape",))
