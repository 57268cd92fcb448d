"""GGUF-native packed weight: the layer's GGUF blocks, byte for byte what llama.cpp reads.

``Ŵ`` (m, n) is stored as ``blocks`` uint8 ``(m, n/block·type_size)``: row ``i`` is the
``n/block`` consecutive blocks of type ``gguf_type`` (a row of :data:`lowbit.gguf.TYPES`) for weight
row ``i``, in llama.cpp's layout.  ``dequantize`` unpacks the fields and decodes them with the
type's formula, bit-identical to ggml's / the ``gguf`` package's dequantizer; GGUF export writes
the bytes unchanged.  Bits per weight = ``8·type_size/block`` exactly (Q4_K 4.5, Q2_K 2.625).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import FormatError, PackedWeight, expect, register_format


@register_format
@dataclass(frozen=True)
class GGUFWeight(PackedWeight):
    kind = "gguf"
    shape: tuple[int, int]
    gguf_type: str
    blocks: torch.Tensor

    @classmethod
    def from_fields(cls, gguf_type: str, fields: dict) -> "GGUFWeight":
        from ..gguf import get

        codes = fields["codes"]
        return cls(tuple(codes.shape), get(gguf_type).name, get(gguf_type).codec.pack(fields).cpu().contiguous())

    @property
    def type(self):
        from ..gguf import get

        return get(self.gguf_type)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        codec = self.type.codec
        return codec.decode(codec.unpack(self.blocks)).to(dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"blocks": self.blocks}

    def meta(self) -> dict:
        return {"kind": self.kind, "shape": list(self.shape), "gguf_type": self.gguf_type}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "GGUFWeight":
        from ..gguf import TYPES

        try:
            m, n = (int(v) for v in meta["shape"])
            name = str(meta["gguf_type"])
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"bad layer metadata {meta!r}: {e}") from None
        t = TYPES.get(name)
        if t is None or m < 1 or n < 1 or not t.fits(n):
            raise FormatError(f"bad layer metadata {meta!r}: unknown GGUF type or a row length it cannot hold")
        blocks = expect(tensors, "blocks", torch.uint8, (m, n // t.block * t.type_size))
        return cls((m, n), name, blocks)
