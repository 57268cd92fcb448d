"""QuIP#'s codebooks as a packed weight decodes them: E8P (2 bits, 16 bits per 8 weights) and the 1-bit E8 residual.

Lattices.  ``D8 = {z ∈ Z⁸ : Σz even}``, ``D̂8 = D8 + ½·1`` (all coordinates in Z + ½, Σx even),
``E8 = D8 ∪ D̂8``.  Since ``D̂8 − ¼ = D8 + ¼``, the set ``(D̂8 + ¼) ∪ (D̂8 − ¼)`` is exactly ``E8 + ¼``.

Source set S (256 "absolute" patterns a ∈ (Z≥0 + ½)⁸, ``abs_table``):
* the 227 vectors of positive half-integers with ‖a‖² ≤ 10 — entries ½, 3/2, 5/2; with ``n₃`` entries
  3/2 and ``n₅`` entries 5/2, ‖a‖² = 2 + 2n₃ + 6n₅, so n₃ + 3n₅ ≤ 4: 1+8+28+56+70 + 8·(1+7) = 227.
  Each is |x| of some x ∈ D̂8 (signs can always be chosen to make Σx even);
* 29 of the 56 norm² = 12 patterns with five 3/2 and three ½.  [design] The paper fixes 29 such
  patterns without a rule we could derive; we take the first 29 in lexicographic order (in units of ½),
  so our code numbering is not bit-compatible with official QuIP# checkpoints.
Rows are ordered by (‖a‖², lexicographic), the 29 norm-12 rows last.

Codes (16 bits): ``c = i | σ << 8 | t << 15`` with ``i`` (8 bits) the pattern, ``σ`` (7 bits) the sign
flips of coordinates 0…6 (bit j set ⇒ x_j < 0), ``t`` the shift (0: +¼, 1: −¼).  The sign of
coordinate 7 is implied by parity: flipping one coordinate a_j changes Σx by 2a_j (odd), so
``x_7 < 0  ⇔  (Σa + #flips₀…₆) odd`` makes Σ(±a) even, i.e. ±a ∈ D̂8.  Codeword ``±a ± ¼·1``:
2^8·2^7·2 = 65 536 distinct points of E8 + ¼.

Residual (1 bit/weight, 3-bit RVQ): [paper, per methods.md] 256 points of E8: the origin, the 240 roots
(112 of the form ±e_i ± e_j, 128 of the form ½(±1)⁸ with an even number of minus signs) and 15 of the 16
vectors ±2e_i.  [design] The one left out is −2e_7.  Order: 0, integer roots, half-integer roots, ±2e_i.

The tables are generated from these definitions (built lazily, cached); finding the nearest codeword (the
encoder) is the solver's, in :mod:`lowbit.quip.e8p` and :mod:`lowbit.quip.lattice`.
"""
from __future__ import annotations

import itertools
from functools import lru_cache

import torch

DIM = 8
N_CODES = 1 << 16
SHIFT = 0.25


@lru_cache(maxsize=None)
def _abs_halves() -> tuple[tuple[int, ...], ...]:
    """The 256 patterns in units of ½ (odd positive integers)."""
    small = [v for v in itertools.product((1, 3, 5), repeat=DIM) if sum(h * h for h in v) <= 40]
    small.sort(key=lambda v: (sum(h * h for h in v), v))
    norm12 = sorted(v for v in itertools.product((1, 3), repeat=DIM) if v.count(3) == 5)[:29]
    assert len(small) == 227 and len(norm12) == 29
    return tuple(small + norm12)


def abs_table() -> torch.Tensor:
    """The 256 absolute patterns (256, 8) float32: 227 with ‖a‖² ≤ 10, then 29 with ‖a‖² = 12."""
    return torch.tensor(_abs_halves(), dtype=torch.float32) / 2


def pattern_parity() -> torch.Tensor:
    """(Σ a) mod 2 per pattern (256,) int64 (Σa is an integer: eight odd halves)."""
    return (torch.tensor(_abs_halves()).sum(-1) // 2) % 2


def decode_structured(codes: torch.Tensor) -> torch.Tensor:
    """Codewords from the bit fields (no table): codes (...,) int in [0, 2^16) -> (..., 8) float32."""
    c = codes.long()
    A, par = abs_table().to(c.device), pattern_parity().to(c.device)
    i, sig, t = c & 255, (c >> 8) & 127, (c >> 15) & 1
    neg7 = (sig[..., None] >> torch.arange(7, device=c.device)) & 1                  # (..., 7)
    neg_last = (par[i] + neg7.sum(-1)) & 1                                           # parity ⇒ sign of x_7
    neg = torch.cat([neg7, neg_last[..., None]], dim=-1)
    shift = SHIFT * (1 - 2 * t).float()
    return A[i] * (1 - 2 * neg).float() + shift[..., None]


@lru_cache(maxsize=None)
def _codebook_cached(device: str, dtype: torch.dtype) -> torch.Tensor:
    return decode_structured(torch.arange(N_CODES)).to(device=device, dtype=dtype)


def codebook(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The full E8P codebook (65 536, 8), row c = codeword of code c; built lazily, cached per device/dtype.

    The returned tensor is the shared cache: do not modify it in place.
    """
    return _codebook_cached(str(torch.device(device)), dtype)


def decode(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Table lookup: codes (...,) int -> codewords (..., 8)."""
    return codebook(codes.device, dtype)[codes.long()]


def pack(codes: torch.Tensor, dtype: torch.dtype = torch.int16) -> torch.Tensor:
    """Store 16-bit codes (..., k): int16 (..., k) bit-for-bit, or int32 (..., k/2) two per word (low half first)."""
    c = codes.long()
    if dtype == torch.int16:
        return torch.where(c >= 1 << 15, c - (1 << 16), c).to(torch.int16)
    if dtype == torch.int32:
        if c.shape[-1] % 2:
            raise ValueError(f"int32 packing needs an even last dim, got {c.shape[-1]}")
        w = c[..., 0::2] | (c[..., 1::2] << 16)
        return torch.where(w >= 1 << 31, w - (1 << 32), w).to(torch.int32)
    raise ValueError(f"pack dtype must be int16 or int32, not {dtype}")


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack``: int16 (..., k) or int32 (..., k/2) -> codes (..., k) int64 in [0, 2^16)."""
    w = packed.long()
    if packed.dtype == torch.int16:
        return w & 0xFFFF
    if packed.dtype == torch.int32:
        return torch.stack([w & 0xFFFF, (w >> 16) & 0xFFFF], dim=-1).reshape(*w.shape[:-1], -1)
    raise ValueError(f"cannot unpack {packed.dtype}")


# ---------------------------------------------------------------- 1-bit E8 residual codebook
@lru_cache(maxsize=None)
def _residual_cached() -> torch.Tensor:
    rows = [[0.0] * DIM]
    for i, j in itertools.combinations(range(DIM), 2):
        for si, sj in itertools.product((1.0, -1.0), repeat=2):
            v = [0.0] * DIM
            v[i], v[j] = si, sj
            rows.append(v)
    for signs in itertools.product((0.5, -0.5), repeat=DIM):
        if sum(s < 0 for s in signs) % 2 == 0:
            rows.append(list(signs))
    for s in (2.0, -2.0):
        for i in range(DIM):
            if not (s < 0 and i == DIM - 1):
                v = [0.0] * DIM
                v[i] = s
                rows.append(v)
    return torch.tensor(rows)


def residual_codebook(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The 1-bit E8 residual codebook (256, 8): origin, 240 roots, ±2e_i without −2e_7."""
    return _residual_cached().to(device=device, dtype=dtype)


def decode_residual(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Table lookup: codes (...,) int -> (..., 8)."""
    return residual_codebook(codes.device, dtype)[codes.long()]
