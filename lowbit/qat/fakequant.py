"""The DL-QAT fake-quantized linear layer and its straight-through estimators.

For a linear ``y = x Ŵᵀ + b`` with frozen base weight ``W₀`` (m, n) and a fixed group grid
``s, z`` (m, G) (group ``g(j)`` of column ``j``; ``b``-bit codes in ``[0, 2^b − 1]``)::

    W'  = W₀ + B A                                   B (m, r) init 0, A (r, n) init U(−1/√n, 1/√n)
    q   = clamp(round(W' / s_g) + z_g, 0, 2^b − 1)   the direction, in the integer code domain
    s'  = fp16(m_G · s_G)                            m (m, G) init 1: the group magnitude
    Ŵ   = s'_g · (q − z_g)

Only ``m``, ``A`` and ``B`` are trainable.  Gradients: ``round`` is straight-through (identity),
``clamp`` keeps its exact gradient (0 for weights pushed outside the range), the fp16 rounding of
the scale is straight-through.  Because ``s'`` is rounded to fp16 in the forward pass too, ``Ŵ`` is
at every step bit-identical to what :meth:`FakeQuantLinear.export` stores: scales ``s'`` in fp16,
codes ``q``, zeros ``z`` — an ordinary :class:`~lowbit.packed.qweight.GroupQuantWeight`.

``fp16_min`` (GGUF's Q4_1/Q5_1, :mod:`.gguf`): the block stores ``ŵ = d·q + m`` with ``m`` in fp16, so the
offset is rounded as the block stores it, ``Ŵ = s'_g·q + fp16(−s'_g·z_g)`` (straight-through), in fp32 the
same two operations as ggml's decode.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..packed.qweight import GroupQuantWeight


class RoundSTE(torch.autograd.Function):
    """``round(x)`` forward (exactly ``torch.round``), identity backward."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


class Fp16STE(torch.autograd.Function):
    """``float32(fp16(x))`` forward, identity backward: the stored scale, trained as if exact."""

    @staticmethod
    def forward(ctx, x):
        return x.half().float()

    @staticmethod
    def backward(ctx, g):
        return g


class FakeQuantLinear(nn.Module):
    """A linear layer computing with the fake-quantized ``Ŵ`` of the module docstring.

    ``weight`` W₀ (m, n), ``scales``/``zeros`` (m, G) float (zeros integer-valued), ``col_groups``
    (n,) int64 group of every column, ``bits``, ``rank`` r, ``generator`` (private: A's init).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, scales: torch.Tensor, zeros: torch.Tensor,
                 col_groups: torch.Tensor, bits: int, group_size: int, rank: int, generator: torch.Generator,
                 sym: bool = False, fp16_min: bool = False):
        super().__init__()
        m, n = weight.shape
        self.out_features, self.in_features = m, n
        self.bits, self.group_size, self.sym, self.maxq = bits, group_size, sym, 2 ** bits - 1
        self.fp16_min = fp16_min
        self.register_buffer("w0", weight.detach().float().clone())
        self.register_buffer("scale", scales.detach().float().clone())   # s (m, G)
        self.register_buffer("zero", zeros.detach().float().clone())     # z (m, G)
        self.register_buffer("col_groups", col_groups.detach().long().clone())
        # contiguous groups that tile the row exactly: work on (m, G, gs) views instead of gathering
        G = scales.shape[1]
        self.tiled = G * group_size == n and torch.equal(self.col_groups, torch.arange(n) // group_size)
        self.magnitude = nn.Parameter(torch.ones(m, G))
        bound = 1.0 / n ** 0.5
        self.lora_a = nn.Parameter((torch.rand(rank, n, generator=generator) * 2 - 1) * bound)
        self.lora_b = nn.Parameter(torch.zeros(m, rank))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def _by_group(self, w: torch.Tensor, *per_group: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``w`` (m, n) and (m, G) tensors, arranged so they broadcast column by column."""
        if self.tiled:
            m, G = self.scale.shape
            return (w.view(m, G, self.group_size), *(t[:, :, None] for t in per_group))
        return (w, *(t[:, self.col_groups] for t in per_group))

    def quantized(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(Ŵ (m, n), codes q (m, n) float, s' (m, G))`` — differentiable in ``m``, ``A``, ``B``."""
        m, n = self.w0.shape
        with torch.autocast(self.w0.device.type, enabled=False):  # the weight math stays float32 under autocast
            w = self.w0 + self.lora_b @ self.lora_a                           # W' (m, n)
            s_eff = Fp16STE.apply(self.magnitude * self.scale)                # s' (m, G)
            wg, s, z, se = self._by_group(w, self.scale, self.zero, s_eff)
            q = torch.clamp(RoundSTE.apply(wg / s) + z, 0, self.maxq)
            w_hat = se * q + Fp16STE.apply(-(se * z)) if self.fp16_min else se * (q - z)
        return w_hat.reshape(m, n), q.reshape(m, n), s_eff

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w_hat = self.quantized()[0]
        return F.linear(x, w_hat.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def base_codes(self) -> torch.Tensor:
        """Codes of ``W₀`` alone on the grid (the initial solution) (m, n) int64."""
        wg, s, z = self._by_group(self.w0, self.scale, self.zero)
        return torch.clamp(torch.round(wg / s) + z, 0, self.maxq).reshape(self.w0.shape).long()

    @torch.no_grad()
    def export(self) -> tuple[GroupQuantWeight, dict]:
        """The packed weight: codes ``q``, fp16 scales ``s' = fp16(m·s)``, zeros ``z``; plus stats."""
        _, q, s_eff = self.quantized()
        codes = q.long()
        contiguous = torch.equal(self.col_groups, torch.arange(self.in_features, device=codes.device) // self.group_size)
        packed = GroupQuantWeight.from_codes(codes, s_eff, None if self.sym else self.zero, self.bits,
                                             self.group_size, None if contiguous else self.col_groups)
        return packed, self.stats(codes)

    @torch.no_grad()
    def stats(self, codes: torch.Tensor) -> dict:
        """What training did to the layer (the report): share of codes changed from :meth:`base_codes`, the
        magnitudes' range, ``‖BA‖``."""
        return {"codes_changed": float((codes != self.base_codes()).float().mean()),
                "magnitude_min": float(self.magnitude.min()), "magnitude_max": float(self.magnitude.max()),
                "lora_norm": float((self.lora_b @ self.lora_a).norm())}

    def trainable(self) -> list[nn.Parameter]:
        return [self.magnitude, self.lora_a, self.lora_b]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, rank={self.lora_a.shape[0]}")
