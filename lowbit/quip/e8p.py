"""E8P encoding for the QuIP# solver: the exact nearest codeword of the E8P and E8-residual codebooks.

The codebooks (lattices, the 256 patterns, the 16-bit code layout, the residual set) are defined and decoded in
:mod:`lowbit.packed.codebooks`; their names are re-exported here.

Exact encoding (``encode``): for each shift t, y = x − t·1; for pattern a the best signs are
σ_j = sign(y_j), gain ``g = Σ a_j|y_j|``; if that violates parity, flipping the coordinate with the
smallest a_j|y_j| is optimal (any valid sign vector differs from σ in an odd number of places), so
``g −= 2·min_j a_j|y_j|``.  ``‖y − c‖² = ‖y‖² − 2g + ‖a‖²``: maximise ``2g − ‖a‖² − ‖y‖²`` over 256 patterns ×
2 shifts, chunked over vectors; the flip cost is only evaluated for a few candidates picked by an
upper bound, with an exact fallback (see ``encode``).
"""
from __future__ import annotations

import torch

from ..packed.codebooks import (DIM, N_CODES, SHIFT, abs_table, codebook, decode, decode_residual,  # noqa: F401
                                decode_structured, pack, pattern_parity, residual_codebook, unpack)

_pattern_parity = pattern_parity  # the name lowbit.kernels.quip_cpu imports


def encode(x: torch.Tensor, chunk: int = 8192, candidates: int = 8) -> torch.Tensor:
    """Exact nearest E8P codeword of each x (..., 8) -> codes (...,) int64 in [0, 2^16).

    Both shifts are scored at once as 512 (shift, pattern) pairs.  The parity-free score
    ``U = 2g − ‖a‖² − ‖y‖²`` is one matmul; since ``min_j a_j|y_j| ≥ ½·min_j|y_j|``, ``U − 2·viol·min|y|``
    bounds the exact score from above.  The exact score is evaluated for the ``candidates`` best bounds;
    rows whose best exact score is below the largest bound left out are re-scored over all 512
    (rare), so the result is exact.  Computed in float64 if x is float64, else float32.
    """
    if x.shape[-1] != DIM:
        raise ValueError(f"E8P encodes vectors of 8, got last dim {x.shape[-1]}")
    dev = x.device
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    flat = x.reshape(-1, DIM).to(work)
    A = abs_table().to(device=dev, dtype=work)                                      # (256, 8)
    A2 = A.pow(2).sum(-1)                                                            # (256,)
    A512, par = A.repeat(2, 1), pattern_parity().to(dev).repeat(2)                  # (512, 8), (512,)
    shifts = torch.tensor([SHIFT, -SHIFT], dtype=work, device=dev)
    pow7 = 1 << torch.arange(7, device=dev)
    k = min(candidates, 512)
    out = torch.empty(flat.shape[0], dtype=torch.int64, device=dev)
    for s in range(0, flat.shape[0], chunk):
        y = flat[s:s + chunk, None, :] - shifts[None, :, None]                       # (N, 2, 8)
        ay, neg = y.abs(), y < 0
        U = (2 * ay @ A.T - A2 - y.pow(2).sum(-1, keepdim=True)).reshape(-1, 512)
        viol = ((par + neg.sum(-1).repeat_interleave(256, dim=1)) & 1).bool()        # (N, 512)
        bound = U - 2 * viol * ay.amin(-1).repeat_interleave(256, dim=1)
        top, cand = bound.topk(k, dim=-1)                                            # (N, k)
        rows = torch.arange(y.shape[0], device=dev)[:, None]
        mn = (ay[rows, cand // 256] * A512[cand]).amin(-1)                           # (N, k, 8) -> (N, k)
        exact = U.gather(1, cand) - 4 * mn * viol.gather(1, cand)
        best, j = exact.max(-1)
        pick = cand.gather(1, j[:, None])[:, 0]                                      # (N,) in [0, 512)
        bad = (best < top[:, -1]).nonzero()[:, 0] if k < 512 else rows[:0, 0]
        if bad.numel():                                                              # full re-score
            mn_all = (ay[bad][:, :, None, :] * A).amin(-1).reshape(-1, 512)
            pick[bad] = (U[bad] - 4 * mn_all * viol[bad]).argmax(-1)
        r = rows[:, 0]
        t_bit, i = pick // 256, pick % 256
        neg_sel, ay_sel = neg[r, t_bit].clone(), ay[r, t_bit]                        # (N, 8)
        v = viol[r, pick]
        arg = (ay_sel * A[i]).argmin(-1)
        neg_sel[r[v], arg[v]] ^= True
        out[s:s + chunk] = i | ((neg_sel[:, :7].long() * pow7).sum(-1) << 8) | (t_bit << 15)
    return out.reshape(x.shape[:-1])


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values (..., 8) in x's dtype, codes (...,) int64)`` — the nearest codewords and their codes."""
    codes = encode(x)
    return decode(codes, x.dtype), codes


def encode_residual(x: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """Exact nearest residual codeword (brute force over 256) of x (..., 8) -> codes (...,) int64 in [0, 256)."""
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    C = residual_codebook(x.device, work)
    C2 = C.pow(2).sum(-1)
    flat = x.reshape(-1, DIM).to(work)
    out = torch.cat([(2 * flat[s:s + chunk] @ C.T - C2).argmax(-1) for s in range(0, flat.shape[0], chunk)]) \
        if flat.shape[0] else torch.empty(0, dtype=torch.int64, device=x.device)
    return out.reshape(x.shape[:-1])
