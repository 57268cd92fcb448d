"""IQ4_NL: blocks of 32 weights, one fp16 scale, 16 non-uniform levels (usable on any row length divisible by 32).

Bytes per block: ``d`` (fp16), ``qs[16]`` (byte k = q[k] | q[k+16] << 4, as Q4_0).  Decode
``w = d·kvalues[q]`` with ``kvalues`` = −127 … 113 (16 int8 levels, denser near 0), taken from the
``gguf`` package (``gguf.quants.IQ4_NL.kvalues``), not pasted here.  Scale choice: candidates
``d = x_max/(−127 + i)``, i = −7…7, each refined by weighted least squares for its codes
(:func:`~.codec.fit_scale`); codes are the nearest level (midpoint search).
"""
from __future__ import annotations

import functools

import torch

from .codec import Codec, by_sub, f16, fit_scale
from .layout import bytes_f16, f16_bytes, pack_planes, split, unpack_planes


@functools.cache
def _kvalues() -> tuple[int, ...]:
    from gguf.quants import IQ4_NL

    return tuple(int(v) for v in IQ4_NL.kvalues)


class IQ4NL(Codec):
    name, block, sub, type_size, n_codes = "IQ4_NL", 32, 32, 18, 16

    def levels(self, device):
        return torch.tensor(_kvalues(), dtype=torch.float32, device=device)

    def nearest(self, t):
        lv = self.levels(t.device)
        return torch.bucketize(t.contiguous(), (lv[1:] + lv[:-1]) / 2).long()

    def fields(self, m, n, device):
        return {"d": torch.zeros(m, n // 32, device=device), "codes": torch.zeros(m, n, dtype=torch.int64, device=device)}

    def affine(self, f, s):
        return f["d"][:, s], None

    def fit_block(self, f, bi, w, imp):
        f["d"][:, bi] = f16(fit_scale(w.float(), imp, self, ntry=7, step=1.0))

    def fit_rows(self, f, W, imp):  # every block in one batched fit_scale
        f["d"].copy_(f16(fit_scale(*by_sub(W.float(), imp, 32), self, ntry=7, step=1.0)).T)

    def pack(self, f):
        m, n = f["codes"].shape
        nb = n // 32
        return torch.cat([f16_bytes(f["d"]), pack_planes(f["codes"].view(m, nb, 2, 16), 4)], -1).reshape(m, nb * 18)

    def unpack(self, blocks):
        m = blocks.shape[0]
        d, qs = split(blocks.view(m, -1, 18), (2, 16))
        return {"d": bytes_f16(d), "codes": unpack_planes(qs, 2, 4).reshape(m, -1)}
