"""GGUF quantization types as one table, like ggml's ``type_traits``: adding a type is adding a row.

Each row (:class:`GGUFType`) has its block length, bytes per block, bits per weight, the type
llama.cpp falls back to for rows the block does not divide, and its codec (:class:`~.codec.Codec`):
the decode formula, how the block parameters are chosen, the per-column rounding the column-feedback
solvers call, and the packer that writes the exact bytes llama.cpp reads.  Families:
:mod:`.legacy` (Q4_0 … Q8_0, F16), :mod:`.kquants` (Q2_K … Q6_K), :mod:`.iq4nl` (IQ4_NL),
:mod:`.iquants` (IQ4_XS and the vector grids IQ3_XXS, IQ3_S, IQ2_XXS, IQ2_XS, IQ2_S: ``codec.unit`` = 8, the
columns the solvers quantize at once).

Fallback (llama.cpp ``tensor_type_fallback`` in ``src/llama-quant.cpp``): a row length ``n`` not a
multiple of the block gives Q2_K, Q3_K → Q4_0; Q4_K → Q5_0; Q5_K → Q5_1; Q6_K → Q8_0 (and the I-quants
→ IQ4_NL); if the fallback (or a 32-block type itself) still does not divide ``n``, F16.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import LowbitError
from .codec import Codec
from .iq4nl import IQ4NL
from .iquants import IQUANTS
from .kquants import KQUANTS
from .legacy import LEGACY, Float16


@dataclass(frozen=True)
class GGUFType:
    name: str
    codec: Codec
    fallback: str | None  # llama.cpp's type for rows the block does not divide (None: F16)

    @property
    def block(self) -> int:
        return self.codec.block

    @property
    def type_size(self) -> int:
        return self.codec.type_size

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.type_size / self.block

    def fits(self, n: int) -> bool:
        return n % self.block == 0


_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
             **{c.name: "IQ4_NL" for c in IQUANTS}}
TYPES: dict[str, GGUFType] = {c.name: GGUFType(c.name, c, _FALLBACK.get(c.name))
                              for c in (*LEGACY, IQ4NL(), *KQUANTS, *IQUANTS, Float16())}
QUANT_TYPES = tuple(n for n in TYPES if n != "F16")  # what --gguf-type accepts


def get(name: str) -> GGUFType:
    t = TYPES.get(str(name).upper())
    if t is None:
        raise LowbitError(f"--gguf-type {name!r}: choose one of {', '.join(QUANT_TYPES)}")
    return t


def resolve(name: str, n: int) -> tuple[GGUFType, str | None]:
    """The type a row of ``n`` weights gets when ``name`` is asked for, and why it differs (None if it does not)."""
    t = get(name)
    if t.fits(n):
        return t, None
    f = TYPES[t.fallback] if t.fallback else None
    if f is None or not f.fits(n):
        f = TYPES["F16"]
    return f, f"ncols {n} not divisible by {t.block} (required for {t.name}) -> {f.name}"
