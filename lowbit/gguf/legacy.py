"""GGUF's legacy types: blocks of 32 weights with one fp16 scale (and an fp16 minimum), plus F16.

==========  =====================  ===================================  ==========================
type        bytes (per 32 weights)  decode                               code range
==========  =====================  ===================================  ==========================
Q4_0        d, qs[16]               ``w = d·(q − 8)``                     q ∈ [0, 15]
Q4_1        d, m, qs[16]            ``w = d·q + m``                       q ∈ [0, 15]
Q5_0        d, qh[4], qs[16]        ``w = d·(q − 16)``                    q ∈ [0, 31]
Q5_1        d, m, qh[4], qs[16]     ``w = d·q + m``                       q ∈ [0, 31]
Q8_0        d, int8[32]             ``w = d·(q − 128)``  (int8 = q − 128)  q ∈ [1, 255]
==========  =====================  ===================================  ==========================

``qs`` byte k = q[k] & 15 | (q[k+16] & 15) << 4; ``qh`` is a little-endian uint32 whose bit k is bit 4 of
q[k].  Parameters are ggml's reference choice (what ``llama-quantize`` does without an importance
matrix, and ``gguf.quants.quantize`` bit for bit): Q4_0/Q5_0 ``d = x_max/−8`` (−16), ``x_max`` the
signed entry of largest magnitude; Q8_0 ``d = max|x|/127``; Q4_1/Q5_1 ``d = (max − min)/15`` (31),
``m = min``; codes ``trunc(x/d + 8.5)`` (``trunc((x − min)/d + 0.5)``; Q8_0 round half away from
zero) with ``1/d`` taken from the fp32 ``d`` before it is stored as fp16 — exactly the reference.
The column-feedback solvers round every column by the same rule against the block's stored values.

F16 (block 1) is llama.cpp's last fallback for rows that are not a multiple of 32.
"""
from __future__ import annotations

import torch

from .codec import Codec, f16
from .layout import bytes_f16, f16_bytes, pack_planes, split, unpack_planes


class Legacy(Codec):
    """Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (see the module docstring)."""

    block = sub = 32

    def __init__(self, name: str, bits: int, has_min: bool):
        self.name, self.bits, self.has_min = name, bits, has_min
        self.n_codes = 256 if bits == 8 else 2 ** bits
        self.offset = 0 if has_min else self.n_codes // 2
        self.type_size = 2 + 2 * has_min + (4 if bits == 5 else 0) + (32 if bits == 8 else 16)

    def fields(self, m, n, device):
        nb = n // 32
        f = {"d": torch.zeros(m, nb, device=device), "id": torch.zeros(m, nb, device=device),
             "codes": torch.zeros(m, n, dtype=torch.int64, device=device)}
        if self.has_min:
            f["m"] = torch.zeros(m, nb, device=device)
            f["lo"] = torch.zeros(m, nb, device=device)
        return f

    def affine(self, f, s):
        return f["d"][:, s], (f["m"][:, s] if self.has_min else None)

    def fit_block(self, f, bi, w, imp):
        w = w.float()
        if self.has_min:
            lo, hi = w.min(dim=-1).values, w.max(dim=-1).values
            d = (hi - lo) / (self.n_codes - 1)
            f["m"][:, bi], f["lo"][:, bi] = f16(lo), lo
        elif self.bits == 8:
            d = w.abs().max(dim=-1).values / 127
        else:
            d = w.gather(-1, w.abs().argmax(dim=-1, keepdim=True)).squeeze(-1) / -self.offset
        f["d"][:, bi] = f16(d)
        f["id"][:, bi] = torch.where(d == 0, torch.zeros_like(d), 1 / torch.where(d == 0, torch.ones_like(d), d))

    def fit_rows(self, f, W, imp):  # every block at once: bi = slice(None), w (m, n/32, 32)
        self.fit_block(f, slice(None), W.reshape(W.shape[0], -1, 32), imp)

    def round(self, f, s, x):
        idv = f["id"][:, s, None]
        if self.has_min:
            q = torch.trunc((x - f["lo"][:, s, None]) * idv + 0.5)
        elif self.bits == 8:
            v = x * idv
            a = v.abs()
            q = torch.sign(v) * (torch.floor(a) + torch.floor(2 * (a - torch.floor(a)))) + self.offset
        else:
            q = torch.trunc(x * idv + (self.offset + 0.5))
        return q.clamp_(0, self.n_codes - 1).long()

    def derive(self, f):
        """Fill the solver-only fields from stored ``d`` (and ``m``): ``1/d`` and the minimum :meth:`round` uses
        (parameters fixed elsewhere, :mod:`.refit`)."""
        d = f["d"]
        f["id"] = torch.where(d == 0, torch.zeros_like(d), 1 / torch.where(d == 0, torch.ones_like(d), d))
        if self.has_min:
            f["lo"] = f["m"].clone()

    def pack(self, f):
        codes = f["codes"]
        m, n = codes.shape
        nb = n // 32
        c = codes.view(m, nb, 32)
        parts = [f16_bytes(f["d"])]
        if self.has_min:
            parts.append(f16_bytes(f["m"]))
        if self.bits == 8:
            parts.append((c - 128).to(torch.int8).view(torch.uint8))
        else:
            if self.bits == 5:
                parts.append(pack_planes(c.view(m, nb, 4, 8).transpose(-1, -2), 1, shift=4))
            parts.append(pack_planes(c.view(m, nb, 2, 16), 4))
        return torch.cat(parts, dim=-1).reshape(m, nb * self.type_size)

    def unpack(self, blocks):
        m = blocks.shape[0]
        b = blocks.view(m, -1, self.type_size)
        nb = b.shape[1]
        sizes = (2,) + ((2,) if self.has_min else ()) + ((4,) if self.bits == 5 else ()) + (self.type_size - 2 - 2 * self.has_min - 4 * (self.bits == 5),)
        parts = split(b, sizes)
        f = {"d": bytes_f16(parts[0].reshape(m, nb, 2))}
        if self.has_min:
            f["m"] = bytes_f16(parts[1].reshape(m, nb, 2))
        if self.bits == 8:
            f["codes"] = (parts[-1].contiguous().view(torch.int8).long() + 128).reshape(m, nb * 32)
            return f
        q = unpack_planes(parts[-1], 2, 4).reshape(m, nb, 32)
        if self.bits == 5:
            q = q | (unpack_planes(parts[-2], 8, 1).transpose(-1, -2).reshape(m, nb, 32) << 4)
        f["codes"] = q.reshape(m, nb * 32)
        return f


class Float16(Codec):
    """F16: every weight its own fp16 (``codes`` hold the fp16 bit patterns as integers)."""

    name, block, sub, type_size = "F16", 1, 1, 2

    def fields(self, m, n, device):
        return {"codes": torch.zeros(m, n, dtype=torch.int64, device=device)}

    def decode(self, f):
        return f["codes"].to(torch.int16).view(torch.float16).float()

    def values(self, f, s, codes):
        return codes.to(torch.int16).view(torch.float16).float()

    def fit_block(self, f, bi, w, imp):
        pass

    def fit_all(self, f, W, imp):
        pass

    def round(self, f, s, x):
        return x.to(torch.float16).view(torch.int16).long()

    def quantize(self, W, imp=None):
        return {"codes": self.round(None, 0, W.float())}

    def pack(self, f):
        return f["codes"].to(torch.int16).contiguous().view(torch.uint8)

    def unpack(self, blocks):
        return {"codes": blocks.contiguous().view(torch.int16).long()}


LEGACY = (Legacy("Q4_0", 4, False), Legacy("Q4_1", 4, True), Legacy("Q5_0", 5, False),
          Legacy("Q5_1", 5, True), Legacy("Q8_0", 8, False))
