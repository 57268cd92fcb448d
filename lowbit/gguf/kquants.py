"""GGUF's K-quants: super-blocks of 256 weights whose sub-blocks have integer scales (and mins).

=====  ==================================================  ==================================  ====
type   bytes per 256 weights                               decode (sub-block s)                bpw
=====  ==================================================  ==================================  ====
Q2_K   scales[16] (sc | m << 4), qs[64], d, dmin            ``w = d·sc_s·q − dmin·m_s``, q < 4   2.625
Q3_K   hmask[32], qs[64], scales[12] (6-bit), d             ``w = d·(sc_s − 32)·(q − 4)``, q < 8  3.4375
Q4_K   d, dmin, scales[12] (6-bit sc, m), qs[128]           ``w = d·sc_s·q − dmin·m_s``, q < 16  4.5
Q5_K   d, dmin, scales[12], qh[32], qs[128]                 ``w = d·sc_s·q − dmin·m_s``, q < 32  5.5
Q6_K   ql[128], qh[64], scales[16] (int8), d                ``w = d·sc_s·(q − 32)``, q < 64      6.5625
=====  ==================================================  ==================================  ====

Sub-blocks hold 16 weights (Q2_K, Q3_K, Q6_K) or 32 (Q4_K, Q5_K); ``d``/``dmin`` are fp16.  Bit layouts
(weight index k inside the super-block, the inverse of ggml's / the ``gguf`` package's dequantizers):

* 2-bit planes (Q2_K, Q3_K low bits): k = 128h + 32p + l → byte 32h + l, bits 2p…2p+1;
* nibbles (Q4_K, Q5_K low bits): k = 64c + 32p + l → byte 32c + l, nibble p;
* 1-bit planes (Q3_K hmask = bit 2, Q5_K qh = bit 4): k = 32i + l → byte l, bit i;
* Q6_K: low nibble of k = 128a + 64p + l in ql[64a + l] nibble p, bits 4–5 of k = 128a + 32t + l in
  qh[32a + l] bits 2t;
* 12-byte 6-bit scales: Q3_K u = sc + 32: byte b < 8 = u_b & 15 | (u_{b+8} & 15) << 4, byte 8 + b =
  Σ_c (u_{4c+b} >> 4) << 2c; Q4_K/Q5_K (sc, m), j < 4: byte j = sc_j | (sc_{j+4} >> 4) << 6, byte 4 + j =
  m_j | (m_{j+4} >> 4) << 6, byte 8 + j = sc_{j+4} & 15 | (m_{j+4} & 15) << 4.

**Parameter choice** (column-feedback order): when a super-block's first column is reached, every
sub-block's float scale (and min) is fitted to the current weights (weighted least squares over
candidate grids, :func:`~.codec.fit_affine` / :func:`~.codec.fit_scale`, columns weighted by ``imp``)
and ``d = max_s scale_s / sc_max`` (``dmin`` likewise for the mins; signed types
``d = −scale_max/32`` resp. ``/128``, ``scale_max`` the scale of largest magnitude) is fixed in fp16.
When a sub-block's first column is reached its float scale/min is fitted again to the then current
(error-updated) weights and its integer ``sc`` (``m``) chosen among the two nearest multiples of
``d`` (``dmin``) by the weighted error of the resulting codes.
"""
from __future__ import annotations

import itertools

import torch

from .codec import Codec, by_sub, f16, fit_affine, fit_scale, werr
from .layout import bytes_f16, f16_bytes, pack_planes, split, unpack_planes

QK = 256


class KQuant(Codec):
    """Common to the K-quants: super-block fields ``d`` (m, nb), sub-block ``sc`` (m, nsub), codes."""

    block = QK
    has_min = False

    @property
    def per(self) -> int:
        return QK // self.sub

    def fields(self, m, n, device):
        nb, ns = n // QK, n // self.sub
        f = {"d": torch.zeros(m, nb, device=device), "sc": torch.zeros(m, ns, dtype=torch.int64, device=device),
             "codes": torch.zeros(m, n, dtype=torch.int64, device=device)}
        if self.has_min:
            f["dmin"] = torch.zeros(m, nb, device=device)
            f["mn"] = torch.zeros(m, ns, dtype=torch.int64, device=device)
        return f

    def _super(self, t: torch.Tensor, s) -> torch.Tensor:
        """Super-block field ``t`` (m, nb) at sub-blocks ``s``."""
        if isinstance(s, slice):
            return t.repeat_interleave(self.per, dim=1)[:, s]
        return t[:, s // self.per]

    def affine(self, f, s):
        a = self._super(f["d"], s) * f["sc"][:, s].float()
        if not self.has_min:
            return a, None
        return a, -(self._super(f["dmin"], s) * f["mn"][:, s].float())

    def _choose(self, f, si, w, imp, cands: dict[str, list[torch.Tensor]]) -> None:
        """Set the integer fields of sub-block ``si`` to the candidate combination with the lowest weighted error
        (``si`` = ``slice(None)``: every sub-block at once, ``w`` (m, ns, sub), ``imp`` (ns, 1, sub), candidates
        (m, ns))."""
        every = isinstance(si, slice)
        best = None
        for combo in itertools.product(*cands.values()):
            for k, v in zip(cands, combo):
                f[k][:, si] = v
            v = self.values(f, si, self.round(f, si, w))
            e = werr(w.transpose(0, 1), v.transpose(0, 1), imp).T if every else werr(w, v, imp)
            if best is None:
                best = (e, list(combo))
            else:
                better = e < best[0]
                best = (torch.where(better, e, best[0]), [torch.where(better, v, b) for v, b in zip(combo, best[1])])
        for k, v in zip(cands, best[1]):
            f[k][:, si] = v


def _steps(x: torch.Tensor, unit: torch.Tensor, lo: int, hi: int) -> list[torch.Tensor]:
    """The two integers nearest ``x/unit`` (floor and floor + 1), clamped to [lo, hi] (0 where unit is 0)."""
    ok = unit != 0
    t = torch.where(ok, x / torch.where(ok, unit, torch.ones_like(unit)), torch.zeros_like(x))
    base = torch.floor(t).clamp(lo, hi)
    return [base.long(), (base + 1).clamp(lo, hi).long()]


def _signed_max(a: torch.Tensor) -> torch.Tensor:
    """(…, k) -> (…,): the entry of largest magnitude (the first of equals), with its sign."""
    return a.gather(-1, a.abs().argmax(-1, keepdim=True)).squeeze(-1)


class AffineK(KQuant):
    """Q2_K, Q4_K, Q5_K: ``w = d·sc·q − dmin·m`` with unsigned ``sc, m ≤ smax``."""

    has_min = True

    def __init__(self, name: str, bits: int, sub: int, smax: int, type_size: int):
        self.name, self.bits, self.sub, self.smax, self.type_size = name, bits, sub, smax, type_size
        self.n_codes = 2 ** bits

    def _fits(self, w, imp):
        """Every sub-block's float scale and minimum ``(a, −b)`` of :func:`~.codec.fit_affine` for ``w`` (m, k):
        (m, k/sub) each, all sub-blocks in one batched call."""
        a, b = fit_affine(*by_sub(w, imp, self.sub), self.n_codes - 1)
        return a.T, -b.T

    def fit_block(self, f, bi, w, imp):
        a, mins = self._fits(w, imp)
        f["d"][:, bi] = f16(a.amax(1) / self.smax)
        f["dmin"][:, bi] = f16(mins.amax(1) / self.smax)

    def fit_rows(self, f, W, imp):
        m = W.shape[0]
        a, mins = self._fits(W, imp)
        f["d"].copy_(f16(a.reshape(m, -1, self.per).amax(2) / self.smax))
        f["dmin"].copy_(f16(mins.reshape(m, -1, self.per).amax(2) / self.smax))
        self._choose(f, slice(None), W.reshape(m, -1, self.sub), by_sub(W, imp, self.sub)[1],
                     {"sc": _steps(a, self._super(f["d"], slice(None)), 0, self.smax),
                      "mn": _steps(mins, self._super(f["dmin"], slice(None)), 0, self.smax)})

    def fit_sub(self, f, si, w, imp):
        a, b = fit_affine(w, imp, self.n_codes - 1)
        bi = si // self.per
        self._choose(f, si, w, imp, {"sc": _steps(a, f["d"][:, bi], 0, self.smax),
                                     "mn": _steps(-b, f["dmin"][:, bi], 0, self.smax)})

    def pack(self, f):
        codes = f["codes"]
        m, n = codes.shape
        nb = n // QK
        c = codes.view(m, nb, QK)
        sc, mn = f["sc"].view(m, nb, self.per), f["mn"].view(m, nb, self.per)
        d, dmin = f16_bytes(f["d"]), f16_bytes(f["dmin"])
        if self.bits == 2:
            parts = [(sc | mn << 4).to(torch.uint8), pack_planes(c.view(m, nb, 2, 4, 32), 2).view(m, nb, 64), d, dmin]
        else:
            lo, hi = sc[..., :4], sc[..., 4:]
            mlo, mhi = mn[..., :4], mn[..., 4:]
            scales = torch.cat([lo | (hi >> 4) << 6, mlo | (mhi >> 4) << 6, (hi & 15) | (mhi & 15) << 4], -1)
            parts = [d, dmin, scales.to(torch.uint8)]
            if self.bits == 5:
                parts.append(pack_planes(c.view(m, nb, 8, 32), 1, shift=4))
            parts.append(pack_planes(c.view(m, nb, 4, 2, 32), 4).view(m, nb, 128))
        return torch.cat(parts, -1).reshape(m, nb * self.type_size)

    def unpack(self, blocks):
        m = blocks.shape[0]
        b = blocks.view(m, -1, self.type_size)
        nb = b.shape[1]
        if self.bits == 2:
            scales, qs, d, dmin = split(b, (16, 64, 2, 2))
            sc, mn = (scales & 15).long(), (scales >> 4).long()
            codes = unpack_planes(qs.reshape(m, nb, 2, 32), 4, 2)
        else:
            sizes = (2, 2, 12) + ((32,) if self.bits == 5 else ()) + (128,)
            parts = split(b, sizes)
            d, dmin, s12, qs = parts[0], parts[1], parts[2].long(), parts[-1]
            b0, b1, b2 = s12[..., :4], s12[..., 4:8], s12[..., 8:]
            sc = torch.cat([b0 & 63, (b2 & 15) | (b0 >> 6) << 4], -1)
            mn = torch.cat([b1 & 63, (b2 >> 4) | (b1 >> 6) << 4], -1)
            codes = unpack_planes(qs.reshape(m, nb, 4, 32), 2, 4)
            if self.bits == 5:
                codes = codes.reshape(m, nb, QK) | (unpack_planes(parts[3], 8, 1).reshape(m, nb, QK) << 4)
        return {"d": bytes_f16(d), "dmin": bytes_f16(dmin), "sc": sc.reshape(m, -1), "mn": mn.reshape(m, -1),
                "codes": codes.reshape(m, nb * QK)}


class SymK(KQuant):
    """Q3_K, Q6_K: ``w = d·sc·(q − offset)`` with signed ``sc ∈ [smin, smax]``."""

    def __init__(self, name: str, bits: int, smin: int, smax: int, type_size: int):
        self.name, self.bits, self.smin, self.smax, self.type_size = name, bits, smin, smax, type_size
        self.sub, self.n_codes, self.offset = 16, 2 ** bits, 2 ** (bits - 1)

    def _fit(self, w, imp):
        return fit_scale(w, imp, self, ntry=9 if self.bits == 3 else 4, step=0.1 if self.bits == 3 else 0.5)

    def _fits(self, w, imp):
        """Every sub-block's float scale of ``w`` (m, k): (m, k/sub), all sub-blocks in one batched call."""
        return self._fit(*by_sub(w, imp, self.sub)).T

    def fit_block(self, f, bi, w, imp):
        f["d"][:, bi] = f16(_signed_max(self._fits(w, imp)) / self.smin)

    def fit_rows(self, f, W, imp):
        m = W.shape[0]
        a = self._fits(W, imp)
        f["d"].copy_(f16(_signed_max(a.reshape(m, -1, self.per)) / self.smin))
        self._choose(f, slice(None), W.reshape(m, -1, self.sub), by_sub(W, imp, self.sub)[1],
                     {"sc": _steps(a, self._super(f["d"], slice(None)), self.smin, self.smax)})

    def fit_sub(self, f, si, w, imp):
        self._choose(f, si, w, imp, {"sc": _steps(self._fit(w, imp), f["d"][:, si // self.per], self.smin, self.smax)})

    def pack(self, f):
        codes = f["codes"]
        m, n = codes.shape
        nb = n // QK
        c = codes.view(m, nb, QK)
        d = f16_bytes(f["d"])
        if self.bits == 3:
            u = (f["sc"] + 32).view(m, nb, 16)
            scales = torch.cat([(u[..., :8] & 15) | (u[..., 8:] & 15) << 4,
                                pack_planes(u.view(m, nb, 4, 4), 2, shift=4).long()], -1).to(torch.uint8)
            parts = [pack_planes(c.view(m, nb, 8, 32), 1, shift=2), pack_planes(c.view(m, nb, 2, 4, 32), 2).view(m, nb, 64),
                     scales, d]
        else:
            parts = [pack_planes(c.view(m, nb, 2, 2, 64), 4).view(m, nb, 128),
                     pack_planes(c.view(m, nb, 2, 4, 32), 2, shift=4).view(m, nb, 64),
                     f["sc"].view(m, nb, 16).to(torch.int8).view(torch.uint8), d]
        return torch.cat(parts, -1).reshape(m, nb * self.type_size)

    def unpack(self, blocks):
        m = blocks.shape[0]
        b = blocks.view(m, -1, self.type_size)
        nb = b.shape[1]
        if self.bits == 3:
            hmask, qs, s12, d = split(b, (32, 64, 12, 2))
            s12 = s12.long()
            low = torch.cat([s12[..., :8] & 15, s12[..., :8] >> 4], -1)
            high = unpack_planes(s12[..., 8:], 4, 2).reshape(m, nb, 16)
            sc = (low | high << 4) - 32
            codes = (unpack_planes(qs.reshape(m, nb, 2, 32), 4, 2).reshape(m, nb, QK)
                     | unpack_planes(hmask, 8, 1).reshape(m, nb, QK) << 2)
        else:
            ql, qh, scales, d = split(b, (128, 64, 16, 2))
            sc = scales.contiguous().view(torch.int8).long()
            codes = (unpack_planes(ql.reshape(m, nb, 2, 64), 2, 4).reshape(m, nb, QK)
                     | unpack_planes(qh.reshape(m, nb, 2, 32), 4, 2).reshape(m, nb, QK) << 4)
        return {"d": bytes_f16(d), "sc": sc.reshape(m, -1), "codes": codes.reshape(m, nb * QK)}


KQUANTS = (AffineK("Q2_K", 2, 16, 15, 84), SymK("Q3_K", 3, -32, 31, 110), AffineK("Q4_K", 4, 32, 63, 144),
           AffineK("Q5_K", 5, 32, 63, 176), SymK("Q6_K", 6, -128, 127, 210))
