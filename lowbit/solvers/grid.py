"""Uniform integer grids: the scalar quantizer every integer method shares.

A grid maps a weight ``w`` to an integer code ``q ∈ [0, 2^b − 1]`` and back to ``ŵ = scale·(q − zero)``.
It is fitted per row over a slice of columns (a group), so ``scale`` and ``zero`` have shape ``(m,)``.

* asymmetric: the range ``[min(w, 0), max(w, 0)]`` is mapped onto ``[0, 2^b − 1]``;
  ``scale = (max − min)/(2^b − 1)``, ``zero = round(−min/scale)``.
* symmetric (GPTQ's convention): ``scale = 2·max|w|/(2^b − 1)``, ``zero = 2^(b−1)``.

Scales are rounded to fp16 when fitted, so the grid the solver uses is exactly the grid stored on
disk.  An optional MSE search shrinks the range by factors 1.0 … 0.8 and keeps, per row, the factor
with the smallest squared error.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

FP16_MIN_NORMAL = 2.0 ** -14


@dataclass(frozen=True)
class UniformGrid:
    """An integer grid of ``bits`` bits, symmetric or asymmetric, optionally MSE-fitted."""

    bits: int
    sym: bool = False
    mse: bool = False
    mse_steps: int = 11
    mse_min_shrink: float = 0.8

    @property
    def maxq(self) -> int:
        return 2 ** self.bits - 1

    def fit(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fit per-row grids to ``w`` (m, k) -> ``scale`` (m,) float32 (fp16-exact), ``zero`` (m,) float32 integers."""
        w = w.float()
        xmin = w.min(dim=1).values.clamp(max=0)
        xmax = w.max(dim=1).values.clamp(min=0)
        if not self.mse:
            return self._from_range(xmin, xmax)
        best_scale, best_zero = self._from_range(xmin, xmax)
        best_err = self._error(w, best_scale, best_zero)
        for i in range(1, self.mse_steps):
            p = 1.0 - (1.0 - self.mse_min_shrink) * i / (self.mse_steps - 1)
            scale, zero = self._from_range(p * xmin, p * xmax)
            err = self._error(w, scale, zero)
            better = err < best_err
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
            best_err = torch.where(better, err, best_err)
        return best_scale, best_zero

    def _from_range(self, xmin: torch.Tensor, xmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.sym:
            amax = torch.maximum(-xmin, xmax)
            amax = torch.where(amax == 0, torch.ones_like(amax), amax)
            scale = (2 * amax / self.maxq)
            scale = scale.half().float().clamp(min=FP16_MIN_NORMAL)
            zero = torch.full_like(scale, float((self.maxq + 1) // 2))
            return scale, zero
        empty = (xmin == 0) & (xmax == 0)
        xmin = torch.where(empty, -torch.ones_like(xmin), xmin)
        xmax = torch.where(empty, torch.ones_like(xmax), xmax)
        scale = ((xmax - xmin) / self.maxq).half().float().clamp(min=FP16_MIN_NORMAL)
        zero = torch.round(-xmin / scale).clamp(0, self.maxq)
        return scale, zero

    def _error(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return (self.dequantize(self.quantize(w, scale, zero), scale, zero) - w).pow(2).sum(dim=1)

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Codes of ``w`` (m, k) or (m,) on a grid with per-row ``scale``/``zero`` (m,) -> float codes, same shape."""
        if w.dim() == 2:
            scale, zero = scale[:, None], zero[:, None]
        return torch.clamp(torch.round(w / scale) + zero, 0, self.maxq)

    def dequantize(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """``scale·(q − zero)`` with per-row ``scale``/``zero`` (m,) broadcast over columns."""
        if q.dim() == 2:
            scale, zero = scale[:, None], zero[:, None]
        return scale * (q - zero)
