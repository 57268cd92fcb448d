"""Bit-packing of integer codes into int32 words, exact for any width 1…8 bits.

Codes ``(…, n)`` with values in ``[0, 2^b)`` are padded to a multiple of 32 along the last dim and
written as a little-endian bit stream: code ``k`` occupies bits ``[k·b, (k+1)·b)`` of the stream, and
every 32 codes fill exactly ``b`` words.  So ``(…, n)`` codes -> ``(…, ceil(n/32)·b)`` int32 words.
A code may straddle two words (b = 3, 5, 6, 7); unpacking reads the low and the high word and masks.
"""
from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=None)
def _layout(bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Word index and bit shift of each of the 32 codes of a chunk (chunk = ``bits`` words)."""
    offsets = torch.arange(32, dtype=torch.int64) * bits
    return offsets // 32, offsets % 32


def packed_width(n: int, bits: int) -> int:
    """Number of int32 words that hold ``n`` codes of ``bits`` bits."""
    return -(-n // 32) * bits


def pack(codes: torch.Tensor, bits: int, chunk: int = 1 << 20) -> torch.Tensor:
    """Pack integer codes ``(…, n)`` in ``[0, 2^bits)`` -> int32 words ``(…, ceil(n/32)·bits)``.

    Large inputs go about ``chunk`` codes (whole rows) at a time: the int64 temporaries stay small, the
    words are the same (integer arithmetic)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    *lead, n = codes.shape
    if lead and codes.numel() > chunk and n:
        flat = codes.reshape(-1, n)
        rows = max(1, chunk // n)
        words = torch.cat([_pack(flat[r0:r0 + rows], bits) for r0 in range(0, flat.shape[0], rows)])
        return words.reshape(*lead, words.shape[-1])
    return _pack(codes, bits)


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    *lead, n = codes.shape
    chunks = -(-n // 32)
    c = torch.zeros(*lead, chunks * 32, dtype=torch.int64, device=codes.device)
    c[..., :n] = codes.to(torch.int64) & (2 ** bits - 1)
    c = c.reshape(*lead, chunks, 32)
    widx, shift = (t.to(codes.device) for t in _layout(bits))
    words = torch.zeros(*lead, chunks, bits + 1, dtype=torch.int64, device=codes.device)
    words.index_add_(-1, widx, c << shift)                   # low parts (bits beyond 32 spill over)
    words.index_add_(-1, widx + 1, c >> (32 - shift))        # high parts of straddling codes
    words = words[..., :bits] & 0xFFFFFFFF                    # the spill-over is carried in word+1
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words)
    return words.reshape(*lead, chunks * bits).to(torch.int32)


def unpack(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: int32 words ``(…, ceil(n/32)·bits)`` -> int64 codes ``(…, n)``."""
    *lead, width = words.shape
    chunks = width // bits
    w = words.to(torch.int64).reshape(*lead, chunks, bits) & 0xFFFFFFFF
    w = torch.cat([w, torch.zeros_like(w[..., :1])], dim=-1)  # a zero word after each chunk
    widx, shift = (t.to(words.device) for t in _layout(bits))
    lo = w[..., widx] >> shift
    hi = w[..., widx + 1] << (32 - shift)
    codes = (lo | hi) & (2 ** bits - 1)
    return codes.reshape(*lead, chunks * 32)[..., :n]
