"""What every GGUF type implements (:class:`Codec`), and the weighted parameter searches they share.

A block of a GGUF type decodes sub-block by sub-block as

    ŵ = a_s · level[q] + b_s        q an integer code, s = the weight's sub-block,

where ``a_s``, ``b_s`` come from the block's stored fields exactly as ggml computes them in fp32
(e.g. Q4_K: ``a = d·sc``, ``b = −dmin·m``) and ``level`` is ``q − offset`` (or IQ4_NL's 16 levels).
``a·level`` is exact in fp32 for every type (≤ 24 significant bits), so the only rounding is the
one ``+ b`` that ggml does too: :meth:`Codec.decode` equals ggml's / the ``gguf`` package's dequantizer bit
for bit.

Fields are a dict of tensors for a whole (m, n) matrix: per-block ``(m, n/block)``, per-sub-block
``(m, n/sub)``, ``codes`` ``(m, n)`` int64.  The solvers fill them column by column:
:meth:`Codec.fit_block` when a block's first column is reached (super-block ``d``/``dmin``, or all of a
32-weight block's parameters), :meth:`Codec.fit_sub` at a sub-block's first column (its integer
scale/min), :meth:`Codec.round` for every column.  ``imp`` (k,) weights each column's squared error
in those fits (the Hessian diagonal for GPTQ/FOEM, as an importance matrix does; ``None`` = 1).

**Batching.**  Every fit is per row and per sub-block, so RTN and act-order (:meth:`Codec.fit_all`) fit all
blocks of a chunk of rows in one call, and :meth:`Codec.fit_block` all sub-blocks of its block; the fits take
``x`` (…, m, k) with batch axes in front (:func:`by_sub`: views of the same memory), so each reduction sums
the same floats in the same order as the per-sub-block call did, and the results are bit-identical to
:meth:`Codec.fit_blockwise` (the reference loop; tests/test_gguf_speedups.py).  (With several threads torch
may split a large column-strided sum over rows at other points than a smaller call would, as it already
did for large layers; single-threaded the bytes are those of the per-block code.)
"""
from __future__ import annotations

import torch


class Codec:
    """Base class of a GGUF type's block codec; subclasses set the class attributes and the fields."""

    name: str
    block: int          # weights per block (32, or 256 for K-quants)
    sub: int            # weights per sub-block with its own (integer) scale; = block for one-scale blocks
    type_size: int      # bytes per block
    offset: int = 0     # level = code − offset (uniform types)
    unit: int = 1       # columns the solvers quantize at once (the vector grids of :mod:`.iquants`: 8)
    n_codes: int = 16

    # -- fields -----------------------------------------------------------------------------------
    def fields(self, m: int, n: int, device) -> dict[str, torch.Tensor]:
        """Zero-filled fields for an (m, n) matrix."""
        raise NotImplementedError

    def affine(self, f: dict, s) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(a, b)`` of sub-blocks ``s`` (an index or slice) in fp32, as ggml computes them (b None = 0)."""
        raise NotImplementedError

    def levels(self, device) -> torch.Tensor:
        return torch.arange(self.n_codes, device=device, dtype=torch.float32) - self.offset

    def decode(self, f: dict) -> torch.Tensor:
        """The float weight (m, n) float32, bit-identical to ggml's dequantizer."""
        codes = f["codes"]
        m, n = codes.shape
        a, b = self.affine(f, slice(None))
        lv = self.levels(codes.device)[codes].view(m, n // self.sub, self.sub)
        w = a[..., None] * lv
        if b is not None:
            w = w + b[..., None]
        return w.reshape(m, n)

    def values(self, f: dict, s: int, codes: torch.Tensor) -> torch.Tensor:
        """Decoded values (m, k) of ``codes`` (m, k) in sub-block ``s`` (an index; or ``slice(None)`` with
        ``codes`` (m, n/sub, sub): every sub-block at once)."""
        a, b = self.affine(f, s)
        w = a[..., None] * self.levels(codes.device)[codes]
        return w if b is None else w + b[..., None]

    # -- bytes ------------------------------------------------------------------------------------
    def pack(self, f: dict) -> torch.Tensor:
        """The exact bytes llama.cpp reads: (m, n/block·type_size) uint8."""
        raise NotImplementedError

    def unpack(self, blocks: torch.Tensor) -> dict:
        """Inverse of :meth:`pack` (fields without solver-only entries)."""
        raise NotImplementedError

    # -- parameter choice and rounding ------------------------------------------------------------
    def fit_block(self, f: dict, bi: int, w: torch.Tensor, imp: torch.Tensor | None) -> None:
        """Fix block ``bi``'s block-level fields from its current weights ``w`` (m, block)."""
        raise NotImplementedError

    def fit_sub(self, f: dict, si: int, w: torch.Tensor, imp: torch.Tensor | None) -> None:
        """Fix sub-block ``si``'s integer scale/min from its current weights ``w`` (m, sub) (default: none)."""

    def nearest(self, t: torch.Tensor) -> torch.Tensor:
        """Code of the level nearest to ``t`` (uniform levels; ties away from the half step as torch.round)."""
        return (torch.round(t) + self.offset).clamp_(0, self.n_codes - 1).long()

    def round(self, f: dict, s: int, x: torch.Tensor) -> torch.Tensor:
        """Codes (m, k) of the weights ``x`` (m, k) in sub-block ``s``: the nearest decodable value (``s`` =
        ``slice(None)``, ``x`` (m, n/sub, sub): every sub-block at once; elementwise, so the same codes)."""
        a, b = self.affine(f, s)
        a = a[..., None]
        t = x if b is None else x - b[..., None]
        t = torch.where(a != 0, t / torch.where(a != 0, a, torch.ones_like(a)), torch.zeros_like(t))
        return self.nearest(t)

    rows_budget: int = 1 << 22  # weights whose fits run batched at once in :meth:`fit_all`/:meth:`quantize`

    def fit_all(self, f: dict, W: torch.Tensor, imp: torch.Tensor | None) -> None:
        """Every block's and sub-block's parameters from ``W`` (m, n) (RTN, act-order with static groups): what
        :meth:`fit_block` and then :meth:`fit_sub` of each of its sub-blocks give on the same weights.  Rows go
        in chunks (:meth:`_row_chunks`) through :meth:`fit_rows`, every block of a chunk at once."""
        for r0, r1 in self._row_chunks(*W.shape):
            self.fit_rows(_rows(f, r0, r1), W[r0:r1], imp)

    def fit_rows(self, f: dict, W: torch.Tensor, imp: torch.Tensor | None) -> None:
        """:meth:`fit_all` of the rows ``W`` (m', n) (``f`` their fields); types batch it, this is the loop."""
        self.fit_blockwise(f, W, imp)

    def fit_blockwise(self, f: dict, W: torch.Tensor, imp: torch.Tensor | None) -> None:
        """The reference for :meth:`fit_all`: block by block, :meth:`fit_block`, then :meth:`fit_sub` of each of
        its sub-blocks."""
        n = W.shape[1]
        for c0 in range(0, n, self.block):
            self.fit_block(f, c0 // self.block, W[:, c0:c0 + self.block], _cols(imp, c0, self.block))
            for s0 in range(c0, c0 + self.block, self.sub):
                self.fit_sub(f, s0 // self.sub, W[:, s0:s0 + self.sub], _cols(imp, s0, self.sub))

    def round_rows(self, f: dict, W: torch.Tensor, imp: torch.Tensor | None) -> None:
        """Set ``f``'s codes to the nearest decodable values of ``W`` (m', n) under its fitted parameters."""
        m, n = W.shape
        f["codes"].copy_(self.round(f, slice(None), W.reshape(m, n // self.sub, self.sub)).reshape(m, n))

    def quantize(self, W: torch.Tensor, imp: torch.Tensor | None = None) -> dict:
        """Round-to-nearest on this type: fields of ``W`` (m, n), n a multiple of ``block``."""
        m, n = W.shape
        W = W.float()
        f = self.fields(m, n, W.device)
        for r0, r1 in self._row_chunks(m, n):
            g = _rows(f, r0, r1)
            self.fit_rows(g, W[r0:r1], imp)
            self.round_rows(g, W[r0:r1], imp)
        return f

    def _row_chunks(self, m: int, n: int) -> list[tuple[int, int]]:
        """Row ranges of about :attr:`rows_budget` weights, a multiple of 256 rows each.  Every fit is per row;
        torch sums a reduction whose rows are its fastest axis in groups of 4 (or 4 vector widths) of rows, so
        a chunk starting at a multiple of 256 gives each row the float sums a whole-matrix call gives it."""
        step = max(256, self.rows_budget // max(n, 1) // 256 * 256)
        return [(r0, min(r0 + step, m)) for r0 in range(0, m, step)]


def _rows(f: dict, r0: int, r1: int) -> dict:
    """The fields of rows ``r0 … r1−1`` (views: writing them writes ``f``)."""
    return {k: v[r0:r1] for k, v in f.items()}


def _cols(imp: torch.Tensor | None, c0: int, k: int) -> torch.Tensor | None:
    return None if imp is None else imp[c0:c0 + k]


def by_sub(x: torch.Tensor, imp: torch.Tensor | None, sub: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x`` (m, k) -> (k/sub, m, sub), ``imp`` (k,) -> (k/sub, 1, sub): every sub-block as a batch, rows second to
    last — the same memory (views), so each batched reduction over the last axis runs, row for row, the float sum
    the per-sub-block one (m, sub) ran (torch's order depends on the strides and on the rows being the next axis)."""
    m, k = x.shape
    xs = x.reshape(m, k // sub, sub).transpose(0, 1)
    return xs, (None if imp is None else imp.reshape(k // sub, 1, sub))


def _weights(x: torch.Tensor, imp: torch.Tensor | None) -> torch.Tensor:
    return torch.ones_like(x) if imp is None else imp.float().to(x.device).expand_as(x)


def fit_affine(x: torch.Tensor, imp: torch.Tensor | None, nmax: int, nstep: int = 20, rmin: float = -1.0,
               rdelta: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``x`` (…, m, k): ``(a > 0, b ≤ 0)`` minimising ``Σ_j w_j (a·q_j + b − x_j)²`` over codes
    ``q_j ∈ [0, nmax]``.  Candidates: inverse scales ``(nmax + rmin + rdelta·i)/(max − min)``, i = 0…nstep,
    (``min`` clamped ≤ 0) round the codes; each is followed by the weighted least-squares ``(a, b)`` for its
    codes (``b`` clamped to ≤ 0, then ``a = Σwqx/Σwq²``); the lowest weighted error wins.  Returns (…, m), (…, m).
    ``imp`` (k,) or broadcastable to ``x``; batch axes go before the rows (see :func:`by_sub`)."""
    w = _weights(x, imp)
    lo = x.min(dim=-1).values.clamp(max=0)
    hi = x.max(dim=-1).values
    rng = hi - lo
    live = rng > 0
    safe = torch.where(live, rng, torch.ones_like(rng))
    best_a = torch.where(live, rng / nmax, torch.zeros_like(rng))
    best_b = lo.clone()
    q0 = torch.round((x - lo[..., None]) / torch.where(live, best_a, torch.ones_like(rng))[..., None]).clamp_(0, nmax)
    best_e = (w * (best_a[..., None] * q0 + best_b[..., None] - x) ** 2).sum(-1)
    sw = w.sum(-1)
    for i in range(nstep + 1):
        iscale = (nmax + rmin + rdelta * i) / safe
        q = torch.round(iscale[..., None] * (x - lo[..., None])).clamp_(0, nmax)
        swq, swq2 = (w * q).sum(-1), (w * q * q).sum(-1)
        swx, swqx = (w * x).sum(-1), (w * q * x).sum(-1)
        D = sw * swq2 - swq * swq
        ok = D > 0
        Ds = torch.where(ok, D, torch.ones_like(D))
        a = (sw * swqx - swx * swq) / Ds
        b = (swq2 * swx - swq * swqx) / Ds
        pos = b > 0
        a = torch.where(pos, swqx / torch.where(swq2 > 0, swq2, torch.ones_like(swq2)), a)
        b = torch.where(pos, torch.zeros_like(b), b)
        e = (w * (a[..., None] * q + b[..., None] - x) ** 2).sum(-1)
        better = ok & live & (a > 0) & torch.isfinite(e) & (e < best_e)
        best_a, best_b, best_e = (torch.where(better, a, best_a), torch.where(better, b, best_b),
                                  torch.where(better, e, best_e))
    return best_a, best_b


def fit_scale(x: torch.Tensor, imp: torch.Tensor | None, codec: Codec, ntry: int, step: float) -> torch.Tensor:
    """Per row of ``x`` (…, m, k): the scale ``a`` minimising ``Σ_j w_j (a·level[q_j] − x_j)²`` (symmetric types).

    Candidates ``a = x_max / (level[0] + step·i)``, i = −ntry…ntry (``x_max`` the signed entry of largest
    magnitude, ``level[0]`` the most negative level: the largest weight lands on the wide end), each
    refined by least squares ``a = Σw·x·L / Σw·L²`` for its codes; the lowest weighted error wins.  (…, m)."""
    w = _weights(x, imp)
    lv = codec.levels(x.device)
    idx = x.abs().argmax(dim=-1, keepdim=True)
    xm = x.gather(-1, idx).squeeze(-1)
    best_a = xm / float(lv[0])
    best_e = torch.full_like(xm, float("inf"))
    for i in range(-ntry, ntry + 1):
        a0 = xm / (float(lv[0]) + step * i)
        nz = a0 != 0
        t = x / torch.where(nz, a0, torch.ones_like(a0))[..., None]
        L = lv[codec.nearest(t)]
        swl2 = (w * L * L).sum(-1)
        a = torch.where(swl2 > 0, (w * x * L).sum(-1) / torch.where(swl2 > 0, swl2, torch.ones_like(swl2)), a0)
        e = (w * (a[..., None] * L - x) ** 2).sum(-1)
        better = nz & torch.isfinite(e) & (e < best_e)
        best_a, best_e = torch.where(better, a, best_a), torch.where(better, e, best_e)
    return torch.where(torch.isfinite(best_e), best_a, torch.zeros_like(best_a))


def werr(x: torch.Tensor, v: torch.Tensor, imp: torch.Tensor | None) -> torch.Tensor:
    """Weighted squared error per row: ``Σ_j w_j (v_j − x_j)²`` (…, m) of ``x``, ``v`` (…, m, k)."""
    return (_weights(x, imp) * (v - x) ** 2).sum(-1)


def f16(x: torch.Tensor) -> torch.Tensor:
    """Round to fp16 and back (the value GGUF stores)."""
    return x.to(torch.float16).float()
