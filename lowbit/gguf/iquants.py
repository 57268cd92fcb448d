"""GGUF's I-quants on 256-weight super-blocks: IQ4_XS (16 non-uniform levels) and the vector grids
IQ3_XXS, IQ3_S, IQ2_XXS, IQ2_XS, IQ2_S (codebooks of 4- or 8-dimensional points, one sign per weight).

=======  ===============================================================  ============================  =====
type     bytes per 256 weights                                            decode (sub-block s)          bpw
=======  ===============================================================  ============================  =====
IQ4_XS   d, scales_h (u16: 2 bits / sub), scales_l[4] (nibbles), qs[128]  ``d·(l_s − 32)·kvalues[q]``   4.25
IQ3_XXS  d, qs[64] (grid idx / 4 weights), 8 × u32 (4 × 7-bit signs | l<<28)  ``d·(½ + l)·½·g·σ``        3.0625
IQ3_S    d, qs[64] (idx & 255), qh[8] (idx bit 8), signs[32], scales[4]   ``d·(1 + 2l)·g·σ``            3.4375
IQ2_XXS  d, 8 × (u32: 4 grid idx bytes, u32: 4 × 7-bit signs | l<<28)     ``d·(½ + l)·¼·g·σ``           2.0625
IQ2_XS   d, 32 × u16 (idx 9 bits | 7-bit signs << 9), scales[8] (nibbles)  ``d·(½ + l)·¼·g·σ``           2.3125
IQ2_S    d, qs[32] (idx & 255), signs[32], qh[8] (idx bits 8–9), scales[8]  ``d·(½ + l)·¼·g·σ``           2.5625
=======  ===============================================================  ============================  =====

Sub-blocks (one 4-bit ``l``, 6-bit for IQ4_XS) hold 32 weights (IQ4_XS, IQ3_XXS, IQ3_S, IQ2_XXS) or 16 (IQ2_XS,
IQ2_S); ``d`` is fp16; ``g`` is the grid point (``dim`` = 8 for IQ2, 4 for IQ3) of the stored index, ``σ = ±1``
the sign of each weight.  IQ2_XXS/IQ2_XS/IQ3_XXS store 7 sign bits per 8 weights: ggml's ``ksigns`` table
makes the eighth the parity of the seven, so every 8 weights carry an even number of minus signs.  The grids
and ``ksigns`` come from the ``gguf`` package (``gguf.quants.IQ2_XXS.grid`` …), which ships them for its
dequantizer.  Every product is exact in fp32, so :meth:`VectorIQ.decode` equals ggml's dequantizer bit for bit.

**Quantizer.**  IQ4_XS is a scalar type like Q3_K/Q6_K (signed 6-bit sub-block scales, IQ4_NL's levels), solved
column by column.  The vector types are solved a *unit* of 8 weights (consecutive columns) at a time:

* nearest point: with the unit's scale ``δ`` (``= d·(½+l)·c``) and weights ``w_k`` (the columns' Hessian
  diagonal, as llama.cpp's importance matrix; 1 without), every grid point ``g`` costs
  ``Σ_k w_k (|x_k|/δ − g_k)²`` with the signs of ``x``.  Where the parity rule forbids the signs of ``x`` (an odd
  number of negatives), one weight's sign must flip, at the extra cost ``min_k 4 w_k (|x_k|/δ) g_k``, tried on
  the ``TOPK`` = 16 points of lowest unconstrained cost (two 4-d points of IQ3_XXS share one parity: the flip
  goes in whichever point is cheaper).  Without the parity rule the search is the exact weighted optimum.
* scales: a sub-block's float scale is searched over ``δ = max|x| / (g_max·f)`` for a few ``f`` (each refined
  by weighted least squares for its points), the super-block's ``d`` from the largest so that ``l = 15`` reaches
  it; the integer ``l`` is the better of the two nearest by the weighted error of its rounding.  In the
  column-feedback solvers ``d`` is fixed when a super-block's first column is reached and ``l`` when its
  sub-block's, from the then current weights, like the K-quants (:mod:`.kquants`).
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from .codec import Codec, _rows, by_sub, f16, fit_scale, werr
from .iq4nl import IQ4NL
from .kquants import QK, SymK, _steps
from .layout import bytes_f16, f16_bytes, pack_planes, split, unpack_planes


# ---------------------------------------------------------------------------------------------------- IQ4_XS
class IQ4XS(SymK):
    """IQ4_XS: ``w = d·(l − 32)·kvalues[q]``, sub-blocks of 32 with 6-bit ``l``; IQ4_NL's 16 levels."""

    def __init__(self):
        self.name, self.type_size, self.sub, self.bits = "IQ4_XS", 136, 32, 4
        self.smin, self.smax, self.n_codes, self.offset = -32, 31, 16, 0

    levels, nearest = IQ4NL.levels, IQ4NL.nearest

    def _fit(self, w, imp):
        return fit_scale(w, imp, self, ntry=7, step=1.0)

    def pack(self, f):
        m, n = f["codes"].shape
        nb = n // QK
        u = (f["sc"] + 32).view(m, nb, 8)
        sh = ((u >> 4) << (2 * torch.arange(8, device=u.device))).sum(-1)       # u16: 2 high bits per sub-block
        parts = [f16_bytes(f["d"]), torch.stack([sh & 255, sh >> 8], -1).to(torch.uint8),
                 pack_planes(u.view(m, nb, 4, 2).transpose(-1, -2) & 15, 4).view(m, nb, 4),
                 pack_planes(f["codes"].view(m, nb, 8, 2, 16), 4).view(m, nb, 128)]
        return torch.cat(parts, -1).reshape(m, nb * self.type_size)

    def unpack(self, blocks):
        m = blocks.shape[0]
        d, sh, sl, qs = split(blocks.view(m, -1, self.type_size), (2, 2, 4, 128))
        nb = d.shape[1]
        sh = sh[..., 0].long() | sh[..., 1].long() << 8
        hi = (sh[..., None] >> (2 * torch.arange(8, device=sh.device))) & 3
        lo = unpack_planes(sl, 2, 4).transpose(-1, -2).reshape(m, nb, 8)
        codes = unpack_planes(qs.reshape(m, nb, 8, 16), 2, 4).reshape(m, nb * QK)
        return {"d": bytes_f16(d), "sc": ((lo | hi << 4) - 32).reshape(m, -1), "codes": codes}


# ------------------------------------------------------------------------------------------- vector grids
@functools.cache
def grid(name: str) -> torch.Tensor:
    """The type's codebook (G, dim) float32 from the ``gguf`` package (values as ggml's grids decode)."""
    import gguf.quants as q

    cls = getattr(q, name)
    cls.init_grid()
    return torch.from_numpy(np.array(cls.grid, dtype=np.float32).reshape(cls.grid_shape))


@functools.cache
def _check_ksigns() -> None:
    """The 7-bit sign index this packer writes is what ggml's ``ksigns`` decodes: entry i = i | parity(i) << 7."""
    import gguf.quants as q

    ks = np.frombuffer(q.IQ2_XXS.ksigns, dtype=np.uint8).astype(int)
    par = np.array([bin(i).count("1") & 1 for i in range(128)])
    if not (ks == np.arange(128) | par << 7).all():
        raise RuntimeError("gguf's ksigns table is not the parity table this packer assumes")


def _u32(v: torch.Tensor) -> torch.Tensor:
    """(…,) integers < 2³² -> (…, 4) uint8 little-endian."""
    return torch.stack([(v >> (8 * i)) & 255 for i in range(4)], -1).to(torch.uint8)


def _from_u32(b: torch.Tensor) -> torch.Tensor:
    """(…, 4) uint8 -> (…,) int64."""
    b = b.long()
    return b[..., 0] | b[..., 1] << 8 | b[..., 2] << 16 | b[..., 3] << 24


def _sign_bits(neg: torch.Tensor) -> torch.Tensor:
    """(…, 8) 0/1 -> (…,) the byte with bit k = sign of weight k."""
    return (neg.long() << torch.arange(8, device=neg.device)).sum(-1)


def _bits_sign(b: torch.Tensor) -> torch.Tensor:
    return (b.long()[..., None] >> torch.arange(8, device=b.device)) & 1


class VectorIQ(Codec):
    """IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S: ``w = d·(½ + l_s)·mul · g[idx]_k · σ_k``.

    Fields: ``d`` (m, n/256) fp16-exact, ``ls`` (m, n/sub) in [0, 15], ``idx`` (m, n/dim) grid indices,
    ``codes`` (m, n) the sign bit of each weight (1 = negative)."""

    block = QK
    unit = 8                                  # weights the solvers quantize at once (one 7/8-bit sign group)
    FACTORS = (0.55, 0.65, 0.75, 0.85, 0.95, 1.05, 1.15)  # δ = max|x| / (g_max·f): candidate sub-block scales
    TOPK = 16                                 # parity: points (lowest unconstrained cost) tried with a flip
    rows_budget = 1 << 20                     # weights fitted at once: fit_delta batches 7 scales of each

    def __init__(self, name: str, type_size: int, sub: int, mul: float, parity: bool):
        self.name, self.type_size, self.sub, self.mul, self.parity = name, type_size, sub, mul, parity

    @property
    def grid(self) -> torch.Tensor:
        return grid(self.name)

    @property
    def dim(self) -> int:
        return self.grid.shape[1]

    def fields(self, m, n, device):
        z = lambda k: torch.zeros(m, k, dtype=torch.int64, device=device)  # noqa: E731
        return {"d": torch.zeros(m, n // QK, device=device), "ls": z(n // self.sub), "idx": z(n // self.dim),
                "codes": z(n)}

    # -- decode -----------------------------------------------------------------------------------
    def delta(self, f: dict, s) -> torch.Tensor:
        """``δ`` = d·(½ + l)·mul of sub-blocks ``s`` (an index or slice), fp32 as ggml computes it."""
        per = QK // self.sub
        d = f["d"].repeat_interleave(per, 1)[:, s] if isinstance(s, slice) else f["d"][:, s // per]
        return d * (0.5 + f["ls"][:, s].float()) * self.mul

    def decode(self, f):
        m, n = f["codes"].shape
        g = self.grid.to(f["idx"].device)[f["idx"]].reshape(m, n)
        sign = 1.0 - 2.0 * f["codes"].float()
        return (self.delta(f, slice(None)).repeat_interleave(self.sub, 1) * g * sign)

    def unit_values(self, f: dict, u: int) -> torch.Tensor:
        """Decoded values (m, 8) of unit ``u`` (weights 8u … 8u+7)."""
        c0, per = u * 8, 8 // self.dim
        g = self.grid.to(f["idx"].device)[f["idx"][:, u * per:(u + 1) * per]].reshape(-1, 8)
        return self.delta(f, c0 // self.sub)[:, None] * g * (1.0 - 2.0 * f["codes"][:, c0:c0 + 8].float())

    # -- nearest grid point -----------------------------------------------------------------------
    def encode(self, x: torch.Tensor, delta: torch.Tensor, imp: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Best points and signs of ``x`` (…, k) (k a multiple of 8) at per-unit scales ``delta`` (…, k/8), ``imp``
        (k,) or broadcastable to ``x`` (None = 1): ``(idx (…, k/dim), neg (…, k) 0/1, v (…, k))`` with ``v = g·σ``
        (unscaled).  Each unit of 8 weights is searched on its own (rows of one flat batch), so a unit gets the
        same answer in any batch.  The parity flip is searched only for the units that need it.  See the module
        docstring."""
        *lead, k = x.shape
        D, Gr = self.dim, self.grid.to(x.device)
        per = 8 // D
        R = x.numel() // 8
        xs = x.reshape(R, 8)
        dl = delta.reshape(R, 1)
        ok = dl != 0
        t = torch.where(ok, xs.abs() / torch.where(ok, dl, torch.ones_like(dl)), torch.zeros_like(xs))
        w = torch.ones(k, device=x.device) if imp is None else imp.float().to(x.device)
        w = w.expand(x.shape).reshape(R, 8)                                  # each unit's column weights
        neg = (xs < 0).long()
        odd = neg.sum(1) % 2 == 1 if self.parity else None
        idx = torch.empty(R, per, dtype=torch.int64, device=x.device)
        g2 = (Gr * Gr).T                                                      # (D, G)
        for r0, r1 in self._spans(R):
            base, wt, low = [], [], []
            for h in range(per):
                th, wh = t[r0:r1, h * D:(h + 1) * D], w[r0:r1, h * D:(h + 1) * D]
                wt.append(wh * th)
                base.append(wh @ g2 - 2 * wt[h] @ Gr.T)                       # (R', G) (+ Σ w t², constant)
                b, idx[r0:r1, h] = base[h].min(1)
                low.append(b)
            o = odd[r0:r1].nonzero().squeeze(1) if self.parity else None
            if o is None or not len(o):
                continue
            # the odd units: the flip cost on the TOPK points of lowest base cost (their best with a flip)
            cost, pt, kk = [], [], []
            for h in range(per):
                cb, ci = base[h][o].topk(self.TOPK, 1, largest=False)         # (O, K)
                fc = 4 * wt[h][o][:, None, :] * Gr[ci]                        # (O, K, D)
                fmin, fkk = fc.min(2)
                c, j = (cb + fmin).min(1)
                pt.append(ci.gather(1, j[:, None]).squeeze(1))
                cost.append(c - low[h][o])
                kk.append(fkk.gather(1, j[:, None]).squeeze(1) + h * D)
            h = torch.stack(cost, 1).argmin(1)                                # the half that takes the flip
            ar, ro = torch.arange(len(o), device=x.device), r0 + o
            idx[ro, h] = torch.stack(pt, 1)[ar, h]
            neg[ro, torch.stack(kk, 1)[ar, h]] ^= 1
        v = Gr[idx].reshape(R, 8) * (1.0 - 2.0 * neg.float())
        return idx.reshape(*lead, k // D), neg.reshape(*lead, k), v.reshape(*lead, k)

    # -- parameter choice -------------------------------------------------------------------------
    @property
    def per(self) -> int:
        return QK // self.sub

    def fit_delta(self, x: torch.Tensor, imp: torch.Tensor | None) -> torch.Tensor:
        """Per row the float sub-block scale ``δ`` (…, m) of ``x`` (…, m, sub) with the lowest weighted error (``imp``
        (sub,) or broadcastable to ``x``); every factor of :attr:`FACTORS` in one batched :meth:`encode`."""
        k, F = x.shape[-1], len(self.FACTORS)
        gmax = float(self.grid.max())
        amax = x.abs().amax(-1)
        div = torch.tensor([gmax * fct for fct in self.FACTORS], device=x.device).view(F, *[1] * amax.dim())
        d0 = amax / div                                                       # (F, …, m): max|x| / (g_max·f)
        _, _, v = self.encode(x.expand(F, *x.shape), d0[..., None].expand(*d0.shape, k // 8), imp)
        w = torch.ones(k, device=x.device) if imp is None else imp.float().to(x.device)
        den = (w * v * v).sum(-1)
        d = torch.where(den > 0, (w * x * v).sum(-1) / torch.where(den > 0, den, torch.ones_like(den)), d0).clamp_min(0)
        e = werr(x, d[..., None] * v, imp)
        best_d, best_e = torch.zeros_like(amax), torch.full_like(amax, float("inf"))
        for i in range(F):  # the first factor of lowest error
            better = e[i] < best_e
            best_d, best_e = torch.where(better, d[i], best_d), torch.where(better, e[i], best_e)
        return best_d

    def _pick_l(self, x: torch.Tensor, imp: torch.Tensor | None, dl: torch.Tensor, d: torch.Tensor):
        """The integer ``l`` (…, m) of sub-blocks ``x`` (…, m, sub) with float scales ``dl`` and super-block ``d``
        (…, m): of the two nearest ``δ/(d·mul) − ½`` the one whose rounding has the lower weighted error.  Also
        that rounding, the points (…, m, sub/dim) and signs (…, m, sub) at the chosen scale."""
        ls = torch.stack(_steps(dl - 0.5 * d * self.mul, d * self.mul, 0, 15))  # (2, …, m)
        delta = d * (0.5 + ls.float()) * self.mul                              # as :meth:`delta`
        idx, neg, v = self.encode(x.expand(2, *x.shape), delta[..., None].expand(*delta.shape, x.shape[-1] // 8), imp)
        e = werr(x, delta[..., None] * v, imp)
        second = e[1] < e[0]
        pick = lambda t: torch.where(second[..., None], t[1], t[0])  # noqa: E731
        return torch.where(second, ls[1], ls[0]), pick(idx), pick(neg)

    def fit_block(self, f, bi, w, imp):
        dl = self.fit_delta(*by_sub(w, imp, self.sub)).T                      # (m, per): every sub-block at once
        f["d"][:, bi] = f16(dl.amax(1) / (15.5 * self.mul))

    def fit_sub(self, f, si, w, imp):
        d = f["d"][:, si * self.sub // QK]
        f["ls"][:, si] = self._pick_l(w, imp, self.fit_delta(w, imp), d)[0]

    def fit_rows(self, f, W, imp):
        """All scales of the rows ``W`` (m', n); returns the rounding of ``W`` under them, ``(idx, neg)`` (m', n/dim),
        (m', n): the search at the chosen ``l`` is the one :meth:`round_unit` would run."""
        m = W.shape[0]
        x, imps = by_sub(W, imp, self.sub)                                    # (ns, m, sub)
        dl = self.fit_delta(x, imps)                                          # (ns, m), shared by d and l
        f["d"].copy_(f16(dl.T.reshape(m, -1, self.per).amax(2) / (15.5 * self.mul)))
        ls, idx, neg = self._pick_l(x, imps, dl, f["d"].repeat_interleave(self.per, 1).T)
        f["ls"].copy_(ls.T)
        return idx.transpose(0, 1).reshape(m, -1), neg.transpose(0, 1).reshape(m, -1)

    def round_unit(self, f: dict, u: int, x: torch.Tensor, imp: torch.Tensor | None) -> torch.Tensor:
        """Store the best points and signs of unit ``u`` for its current weights ``x`` (m, 8); its values (m, 8)."""
        c0, per = u * 8, 8 // self.dim
        delta = self.delta(f, c0 // self.sub)
        idx, neg, _ = self.encode(x, delta[:, None], imp)
        f["idx"][:, u * per:(u + 1) * per] = idx
        f["codes"][:, c0:c0 + 8] = neg
        return self.unit_values(f, u)

    def quantize(self, W, imp=None):
        m, n = W.shape
        W = W.float()
        f = self.fields(m, n, W.device)
        for r0, r1 in self._row_chunks(m, n):
            g = _rows(f, r0, r1)
            idx, neg = self.fit_rows(g, W[r0:r1], imp)
            g["idx"].copy_(idx)
            g["codes"].copy_(neg)
        if m % self._chunk() == 1:
            # Unit by unit (:meth:`round_unit`) the last row is a search of its own, and BLAS multiplies a single
            # row by another kernel (matrix-vector) whose float sums differ: search it that way, as that code did.
            g = _rows(f, m - 1, m)
            for u in range(n // 8):
                self.round_unit(g, u, W[m - 1:, 8 * u:8 * u + 8], None if imp is None else imp[8 * u:8 * u + 8])
        return f

    def _chunk(self) -> int:
        """Units per grid-search matmul of the per-unit code this replaces (decides which rows it multiplied alone)."""
        return max(1, (1 << 23) // self.grid.shape[0])

    def _spans(self, R: int) -> list[tuple[int, int]]:
        """Row ranges of :meth:`encode`'s search: about 1 MiB cost matrices (cache-sized), and a range of one row
        (BLAS's matrix-vector kernel, other float sums than the matrix product) exactly where the per-unit code had
        one: the last row when ``R % _chunk() == 1``.  Every other row is searched inside a matrix product, whose
        rows do not depend on each other."""
        step = max(2, (1 << 18) // self.grid.shape[0])
        alone = R % self._chunk() == 1
        end = R - 1 if alone and R > 1 else R
        cuts = list(range(0, end, step))
        if len(cuts) > 1 and end - cuts[-1] == 1:  # no lone row inside
            cuts.pop()
        spans = list(zip(cuts, cuts[1:] + [end]))
        return spans + [(R - 1, R)] if end < R else spans

    # -- bytes ------------------------------------------------------------------------------------
    def pack(self, f):
        _check_ksigns()
        m, n = f["codes"].shape
        nb = n // QK
        d = f16_bytes(f["d"])
        ls, idx = f["ls"].view(m, nb, -1), f["idx"].view(m, nb, -1)
        sgn = _sign_bits(f["codes"].view(m, nb, QK // 8, 8))                      # (m, nb, 32) one byte per unit
        nib = lambda v: (v[..., 0::2] | v[..., 1::2] << 4).to(torch.uint8)         # noqa: E731
        if self.name in ("IQ2_XXS", "IQ3_XXS"):
            s7 = (sgn & 127).view(m, nb, 8, 4)
            aux = (s7 << (7 * torch.arange(4, device=s7.device))).sum(-1) | ls << 28  # (m, nb, 8)
            if self.name == "IQ2_XXS":
                qs = torch.cat([idx.view(m, nb, 8, 4).to(torch.uint8), _u32(aux)], -1).view(m, nb, 64)
                parts = [d, qs]
            else:
                parts = [d, idx.to(torch.uint8), _u32(aux).view(m, nb, 32)]
        elif self.name == "IQ2_XS":
            q16 = idx | (sgn & 127) << 9
            parts = [d, torch.stack([q16 & 255, q16 >> 8], -1).to(torch.uint8).view(m, nb, 64), nib(ls)]
        elif self.name == "IQ2_S":
            qh = ((idx >> 8).view(m, nb, 8, 4) << (2 * torch.arange(4, device=idx.device))).sum(-1)
            parts = [d, (idx & 255).to(torch.uint8), sgn.to(torch.uint8), qh.to(torch.uint8), nib(ls)]
        else:  # IQ3_S
            qh = ((idx >> 8).view(m, nb, 8, 8) << torch.arange(8, device=idx.device)).sum(-1)
            parts = [d, (idx & 255).to(torch.uint8), qh.to(torch.uint8), sgn.to(torch.uint8), nib(ls)]
        return torch.cat(parts, -1).reshape(m, nb * self.type_size)

    def unpack(self, blocks):
        m = blocks.shape[0]
        b = blocks.view(m, -1, self.type_size)
        nb = b.shape[1]
        unnib = lambda v: torch.stack([v.long() & 15, v.long() >> 4], -1).view(m, nb, -1)  # noqa: E731

        def parity_signs(s7):  # (…, ) 7-bit indices -> (…, 8) sign bits with the eighth the parity
            bits = _bits_sign(s7)
            bits[..., 7] = bits[..., :7].sum(-1) % 2
            return bits

        if self.name in ("IQ2_XXS", "IQ3_XXS"):
            if self.name == "IQ2_XXS":
                d, qs = split(b, (2, 64))
                qs = qs.reshape(m, nb, 8, 8)
                idx, aux = qs[..., :4].long().reshape(m, nb, 32), _from_u32(qs[..., 4:])
            else:
                d, qs, sc = split(b, (2, 64, 32))
                idx, aux = qs.long(), _from_u32(sc.reshape(m, nb, 8, 4))
            ls = aux >> 28
            s7 = (aux[..., None] >> (7 * torch.arange(4, device=b.device))) & 127      # (m, nb, 8, 4)
            codes = parity_signs(s7)
        elif self.name == "IQ2_XS":
            d, qs, sc = split(b, (2, 64, 8))
            q16 = qs.reshape(m, nb, 32, 2).long()
            q16 = q16[..., 0] | q16[..., 1] << 8
            idx, codes, ls = q16 & 511, parity_signs(q16 >> 9), unnib(sc)
        elif self.name == "IQ2_S":
            d, qs, sg, qh, sc = split(b, (2, 32, 32, 8, 8))
            hi = (qh.long()[..., None] >> (2 * torch.arange(4, device=b.device))) & 3
            idx, codes, ls = qs.long() | hi.reshape(m, nb, 32) << 8, _bits_sign(sg), unnib(sc)
        else:
            d, qs, qh, sg, sc = split(b, (2, 64, 8, 32, 4))
            idx, codes, ls = qs.long() | _bits_sign(qh).reshape(m, nb, 64) << 8, _bits_sign(sg), unnib(sc)
        return {"d": bytes_f16(d), "ls": ls.reshape(m, -1), "idx": idx.reshape(m, -1),
                "codes": codes.reshape(m, nb * QK)}


IQUANTS = (IQ4XS(), VectorIQ("IQ3_XXS", 98, 32, 0.5, True), VectorIQ("IQ3_S", 110, 32, 2.0, False),
           VectorIQ("IQ2_XXS", 66, 32, 0.25, True), VectorIQ("IQ2_XS", 74, 16, 0.25, True),
           VectorIQ("IQ2_S", 82, 16, 0.25, False))
