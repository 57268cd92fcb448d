"""Fast exact E8P encoding by E8 lattice decoding (Conway & Sloane), with :func:`e8p.encode` as the fallback.

Every E8P codeword is ``z + ¼·1`` with ``z ∈ E8 = D8 ∪ D̂8`` (see :mod:`lowbit.packed.codebooks`), so the codebook is a finite
subset of the shifted lattice ``E8 + ¼``.  For x (..., 8):

1. ``z = nearest E8 point of (x − ¼)``: the D8 decoder (round every coordinate; if the sum is odd, re-round the
   coordinate with the largest rounding error the other way) applied to ``y`` and to ``y − ½`` (then ``+ ½``),
   keep the closer — O(8) per vector.
2. If ``z + ¼`` is a codeword it is the nearest codeword (the codebook lies inside the lattice).  Membership:
   ``z ∈ D̂8`` → shift bit t = 0, D̂8 point ``d = z``; ``z ∈ D8`` → ``z + ¼ = (z + ½) − ¼``, t = 1, ``d = z + ½``.
   The pattern ``|d|`` is looked up in a base-3 table over {½, 3/2, 5/2}⁸ (6 561 entries → row of ``abs_table``
   or −1); the sign bits are ``d_j < 0`` for j < 7 (d ∈ D̂8 satisfies the parity rule by construction).
3. Vectors whose nearest lattice point is not a codeword (large norm, rare at the solver's scales) are encoded
   exhaustively by :func:`e8p.encode`.  The result equals ``e8p.encode`` up to exact ties.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from . import e8p


@lru_cache(maxsize=None)
def _pattern_lookup() -> torch.Tensor:
    """(6561,) int64: base-3 key of a pattern (digits (2a − 1)/2 ∈ {0, 1, 2}, coordinate j weight 3^j) -> row."""
    digits = ((e8p.abs_table() * 2 - 1) / 2).round().long()                 # (256, 8)
    keys = (digits * 3 ** torch.arange(8)).sum(-1)
    table = torch.full((3 ** 8,), -1, dtype=torch.int64)
    table[keys] = torch.arange(256)
    return table


def _nearest_d8(y: torch.Tensor) -> torch.Tensor:
    """Nearest point of D8 (integer vectors with even sum) to each y (N, 8)."""
    f = torch.round(y)
    odd = (f.sum(-1).remainder(2) != 0)
    if odd.any():
        err = y - f
        j = err.abs().argmax(-1)
        rows = odd.nonzero()[:, 0]
        step = torch.where(err[rows, j[rows]] >= 0, 1.0, -1.0).to(f.dtype)
        f[rows, j[rows]] += step
    return f


def nearest_e8(y: torch.Tensor) -> torch.Tensor:
    """Nearest point of E8 = D8 ∪ (D8 + ½) to each y (N, 8)."""
    a = _nearest_d8(y)
    b = _nearest_d8(y - 0.5) + 0.5
    closer_b = (y - b).pow(2).sum(-1) < (y - a).pow(2).sum(-1)
    return torch.where(closer_b[:, None], b, a)


def encode(x: torch.Tensor) -> torch.Tensor:
    """Nearest E8P code of each x (..., 8) -> (...,) int64 in [0, 2^16); same contract as :func:`e8p.encode`."""
    if x.shape[-1] != 8:
        raise ValueError(f"E8P encodes vectors of 8, got last dim {x.shape[-1]}")
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    flat = x.reshape(-1, 8).to(work)
    z = nearest_e8(flat - e8p.SHIFT)
    integer = (z == z.round()).all(-1)                                         # z ∈ D8  -> t = 1
    d = torch.where(integer[:, None], z + 0.5, z)
    digits = ((d.abs() * 2 - 1) / 2).round().long()
    ok = (digits <= 2).all(-1)
    keys = (digits.clamp(0, 2) * 3 ** torch.arange(8, device=x.device)).sum(-1)
    idx = _pattern_lookup().to(x.device)[keys]
    ok &= idx >= 0
    sig = ((d[:, :7] < 0).long() << torch.arange(7, device=x.device)).sum(-1)
    codes = idx.clamp_min(0) | (sig << 8) | (integer.long() << 15)
    bad = (~ok).nonzero()[:, 0]
    if bad.numel():
        codes[bad] = e8p.encode(flat[bad])
    return codes.reshape(x.shape[:-1])
