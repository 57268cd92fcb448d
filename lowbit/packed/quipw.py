"""QuIP#'s packed weight (kind ``"quip"``): lattice codes of the rotated weight, its scales and the RHT signs.

For ``W`` (m, n) the solver quantizes the incoherent weight ``W̃ = U W Vᵀ`` with ``U = T_m·diag(s_u)``,
``V = T_n·diag(s_v)`` (``T`` the orthonormal Hadamard or FFT transform of :mod:`lowbit.packed.rht`,
``s`` sign vectors).  What is stored, per stage ``k`` of the residual (RVQ) chain:

    W̃ ≈ Σ_k scales[k] · C_k        C_k (m, n) = the decoded codes of stage k, in codebook units
    W  = Uᵀ W̃ V = diag(s_u) T_mᵀ W̃ T_n diag(s_v)

Stages by ``(codebook, bits)``:

* ``e8p``, 2 bits: [E8P]                  — ``codes``  int16 ``(m, n/8)``: one 16-bit code per 8 weights;
* ``e8p``, 3 bits: [E8P, 1-bit E8]        — ``codes2`` uint8 ``(m, n/8)``: 8-bit codes of the 256-entry E8
  residual codebook, one per 8 weights;
* ``e8p``, 4 bits: [E8P, E8P]             — ``codes2`` int16 ``(m, n/8)``;
* ``scalar``, b bits: one uniform grid    — ``codes``  int32 ``(m, ceil(n/32)·b)`` (bit-packed), level
  ``q ∈ [0, 2^b)`` decodes to ``q − (2^b − 1)/2`` (symmetric, no zero point).

``scales`` float32 ``(stages,)``.  Signs: ``su`` (m,), ``sv`` (n,) as 1-bit planes (int32 ``(ceil(·/32),)``,
bit set = −1) or, after fine-tuning, as real fp16 vectors; absent with ``rht = False``
(``out_kind = in_kind = "none"``, ``W = W̃``).

Bits (``stored_bits``): codes ``bits·m·n`` exactly for E8P chains (16 bits / 8 weights per E8P stage, 8 bits / 8
weights for the residual), ``32·stages`` for the scales, ``32·(ceil(m/32) + ceil(n/32))`` for 1-bit signs or
``16·(m + n)`` for real ones.  The codebooks are not stored: they are regenerated from their definition
(:mod:`lowbit.packed.codebooks`), so they cost 0 bits.  E.g. 2-bit 576×576: ``(2·576² + 32 + 32·36)/576² ≈ 2.004``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import bitpack
from . import codebooks
from .base import FormatError, PackedWeight, expect, meta_int, meta_shape, meta_str, register_format
from .rht import KINDS, rht_forward, rht_inverse, transform  # noqa: F401  (re-exported: solvers and kernels use them)


def stages_of(codebook: str, bits: int) -> tuple[str, ...]:
    """The stage chain of a ``(codebook, bits)`` pair: ``("e8p",)``, ``("e8p", "e8res")``, ``("e8p", "e8p")``
    or ``("scalar",)``."""
    if codebook == "scalar" and 1 <= bits <= 8:
        return ("scalar",)
    chains = {2: ("e8p",), 3: ("e8p", "e8res"), 4: ("e8p", "e8p")}
    if codebook != "e8p" or bits not in chains:
        raise FormatError(f"no QuIP# stage chain for codebook {codebook!r} at {bits} bits")
    return chains[bits]


def pack_signs(s: torch.Tensor) -> torch.Tensor:
    """±1 (k,) -> 1-bit plane int32 ``(ceil(k/32),)``, bit set = negative."""
    return bitpack.pack((s < 0).long().cpu(), 1)


def unpack_signs(words: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_signs` -> (k,) float32 in {−1, +1}."""
    return 1.0 - 2.0 * bitpack.unpack(words, 1, k).float()


def stage_codes_shape(stage: str, m: int, n: int, bits: int) -> tuple[torch.dtype, tuple[int, int]]:
    """Stored dtype and shape of one stage's codes."""
    if stage == "e8p":
        return torch.int16, (m, n // 8)
    if stage == "e8res":
        return torch.uint8, (m, n // 8)
    return torch.int32, (m, bitpack.packed_width(n, bits))


def pack_stage(stage: str, codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (m, n/8) for E8 stages or (m, n) for ``scalar`` -> the stored tensor."""
    codes = codes.cpu()
    if stage == "e8p":
        return codebooks.pack(codes, torch.int16)
    if stage == "e8res":
        return codes.to(torch.uint8)
    return bitpack.pack(codes, bits)


def decode_stage(stage: str, stored: torch.Tensor, m: int, n: int, bits: int) -> torch.Tensor:
    """The stored codes of one stage -> values (m, n) float32 in codebook units."""
    if stage == "e8p":
        return codebooks.decode(codebooks.unpack(stored)).reshape(m, n)
    if stage == "e8res":
        return codebooks.decode_residual(stored.long()).reshape(m, n)
    return bitpack.unpack(stored, bits, n).float() - (2 ** bits - 1) / 2


@register_format
@dataclass(frozen=True)
class QuipWeight(PackedWeight):
    """A QuIP# weight: see the module docstring for the math, the tensors and their shapes."""

    kind = "quip"
    shape: tuple[int, int]
    bits: int
    codebook: str
    out_kind: str
    in_kind: str
    codes: torch.Tensor
    scales: torch.Tensor
    codes2: torch.Tensor | None = None
    su: torch.Tensor | None = None
    sv: torch.Tensor | None = None

    @property
    def stages(self) -> tuple[str, ...]:
        return stages_of(self.codebook, self.bits)

    @property
    def sign_mode(self) -> str:
        """"bits" (1-bit planes), "real" (fp16 vectors, fine-tuned) or "none" (no RHT)."""
        return "none" if self.su is None else ("real" if self.su.is_floating_point() else "bits")

    def signs(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(s_u (m,), s_v (n,))`` float32 (None without RHT)."""
        m, n = self.shape
        if self.su is None:
            return None, None
        if self.su.is_floating_point():
            return self.su.float(), self.sv.float()
        return unpack_signs(self.su, m).to(self.su.device), unpack_signs(self.sv, n).to(self.sv.device)

    def stage_terms(self) -> list[torch.Tensor]:
        """``[scales[k]·C_k]``, one (m, n) float32 per stage: the terms of ``W̃``."""
        m, n = self.shape
        stored = [self.codes, self.codes2]
        return [self.scales[k].float() * decode_stage(stage, stored[k], m, n, self.bits).to(self.codes.device)
                for k, stage in enumerate(self.stages)]

    def rotated(self) -> torch.Tensor:
        """``W̃ = Σ_k scales[k]·C_k`` (m, n) float32 — the weight in the rotated space."""
        out = torch.zeros(*self.shape, dtype=torch.float32, device=self.codes.device)
        for term in self.stage_terms():
            out += term
        return out

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W = Uᵀ W̃ V`` (m, n): decode, scale, inverse RHT on both sides."""
        su, sv = self.signs()
        w = rht_inverse(self.rotated(), sv, self.in_kind)                    # W̃ V   (rows)
        return rht_inverse(w.T, su, self.out_kind).T.contiguous().to(dtype)  # Uᵀ(·)  (columns)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``y = x Wᵀ`` (…, m) for x (…, n) without materialising W: ``y = Uᵀ(W̃ (V x))`` — the input RHT,
        the decoded (still rotated) weight, the inverse output RHT.  Decodes ``W̃`` each call."""
        su, sv = self.signs()
        xv = rht_forward(x.float(), sv, self.in_kind)
        return rht_inverse(xv @ self.rotated().T, su, self.out_kind).to(x.dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"codes": self.codes, "scales": self.scales}
        for k in ("codes2", "su", "sv"):
            if getattr(self, k) is not None:
                out[k] = getattr(self, k)
        return out

    def meta(self) -> dict:
        return {"kind": self.kind, "shape": list(self.shape), "bits": self.bits, "codebook": self.codebook,
                "out_kind": self.out_kind, "in_kind": self.in_kind, "signs": self.sign_mode}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "QuipWeight":
        m, n = meta_shape(meta)
        bits, codebook = meta_int(meta, "bits", 1, 8), meta_str(meta, "codebook", ("e8p", "scalar"))
        out_kind, in_kind = meta_str(meta, "out_kind", KINDS), meta_str(meta, "in_kind", KINDS)
        signs = meta_str(meta, "signs", ("bits", "real", "none"))
        stages = stages_of(codebook, bits)
        if codebook == "e8p" and n % 8:
            raise FormatError(f"an e8p layer needs a multiple of 8 columns, got {n}")
        if (signs == "none") != (out_kind == "none" == in_kind):
            raise FormatError(f"layer metadata: signs {signs!r} do not match the transforms {out_kind!r}/{in_kind!r}")
        stored = [expect(tensors, key, *stage_codes_shape(st, m, n, bits)) for key, st in zip(("codes", "codes2"), stages)]
        su = sv = None
        if signs == "bits":
            su = expect(tensors, "su", torch.int32, (bitpack.packed_width(m, 1),))
            sv = expect(tensors, "sv", torch.int32, (bitpack.packed_width(n, 1),))
        elif signs == "real":
            su, sv = expect(tensors, "su", torch.float16, (m,)), expect(tensors, "sv", torch.float16, (n,))
        return cls((m, n), bits, codebook, out_kind, in_kind, codes=stored[0],
                   scales=expect(tensors, "scales", torch.float32, (len(stages),)),
                   codes2=stored[1] if len(stored) > 1 else None, su=su, sv=sv)
