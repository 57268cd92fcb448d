"""Byte helpers every GGUF block packer shares (little-endian, as ggml writes its structs).

All functions work on torch ``uint8``/integer tensors on any device; ``…`` is any leading shape
(rows, blocks).  Codes are non-negative integers; a "plane" packing puts the same bit (or bit
pair, nibble) of ``P`` runs of ``L`` consecutive codes side by side in ``L`` bytes.
"""
from __future__ import annotations

import torch


def f16_bytes(x: torch.Tensor) -> torch.Tensor:
    """``x`` (…,) float (fp16-exact) -> (…, 2) uint8: the fp16's two bytes, little-endian."""
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(*x.shape, 2)


def bytes_f16(b: torch.Tensor) -> torch.Tensor:
    """(…, 2) uint8 -> (…,) float32: the fp16 they hold."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def pack_planes(codes: torch.Tensor, width: int, shift: int = 0) -> torch.Tensor:
    """``codes`` (…, P, L) -> (…, L) uint8: byte ``l`` holds bits ``shift … shift+width−1`` of code ``(p, l)``
    at bit ``p·width``  (``P·width ≤ 8``)."""
    mask = (1 << width) - 1
    planes = (codes.to(torch.int32) >> shift) & mask
    pos = torch.arange(codes.shape[-2], device=codes.device, dtype=torch.int32)[:, None] * width
    return (planes << pos).sum(dim=-2).to(torch.uint8)


def unpack_planes(b: torch.Tensor, planes: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_planes` (``shift = 0``): (…, L) uint8 -> (…, planes, L) int64."""
    pos = torch.arange(planes, device=b.device, dtype=torch.int32)[:, None] * width
    return ((b.to(torch.int32)[..., None, :] >> pos) & ((1 << width) - 1)).long()


def split(b: torch.Tensor, sizes: tuple[int, ...]) -> list[torch.Tensor]:
    """(…, Σsizes) -> the consecutive byte fields of one block, each (…, size)."""
    return list(torch.split(b, list(sizes), dim=-1))
