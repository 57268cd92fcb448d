"""Fast CPU kernel for :class:`~lowbit.packed.quipw.QuipWeight` (kind ``"quip"``, codebook ``"e8p"``, 2–4 bits).

``y = x Wᵀ`` with ``W = Uᵀ W̃ V`` (see :mod:`lowbit.packed.quipw`) is computed as
``y = rht_inverse(xv @ W̃ᵀ, s_u, out_kind)``, ``xv = rht_forward(x, s_v, in_kind)``: the two O(n log n)
transforms (the Hadamard kind in the kernel, one call each, the same operations in the same order as
:mod:`lowbit.packed.rht`; the FFT kind in torch) and the middle product, which is the kernel's.
The kernel reads the stored codes as they are — ``codes`` int16 ``(m, n/8)`` (E8P) and, for 3/4 bits,
``codes2`` uint8 (E8 residual) or int16 (second E8P stage) — and the stage ``scales``:

* few tokens (``M ≤ GEMV_MAX_TOKENS``, i.e. decoding): fused decode-and-dot, ``W̃`` is never materialised.
  Per 8-weight E8P code: 8 floats of the abs pattern from a 256×8 table (parity of coordinate 7 folded in),
  signs flipped by XOR with a 128×8 mask table indexed by the 7 sign bits, FMA with the 8 values of ``x``;
  the ±¼ shift is applied as ``¼·Σ_c ±Σ(x chunk)`` in a separate 8-codes-per-step pass; one scale per
  stage per row.  AVX2+FMA where the CPU has it (8 lanes), a portable scalar loop otherwise;
* many tokens (prefill): ``W̃`` (m, n) fp32 is decoded once into a temporary by the kernel (bit-identical
  to :meth:`QuipWeight.rotated`) and multiplied with BLAS, i.e. exactly :meth:`QuipWeight.matmul`, faster.

Math is fp32 whatever ``x.dtype`` (like :meth:`QuipWeight.matmul`); the result is cast back to ``x.dtype``.
The C++ source (``csrc/quip_cpu.cpp``) is compiled on first use with ``torch.utils.cpp_extension``
(``-O3 -march=native -fopenmp -ffp-contract=off``) into ``$LOWBIT_CACHE/kernels`` (default
``~/.cache/lowbit/kernels``).  Importing this module never compiles; :func:`available` does, once per
process, and returns ``False`` (with the reason in :func:`unavailable_reason`) when there is no compiler.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from ..packed import codebooks
from ..packed.rht import hadamard_factor, hadamard_matrix, rht_forward, rht_inverse
from .build import Extension
from .checks import cpu_input, cpu_tensor

EXT = Extension("quip_cpu", "quip_cpu.cpp", ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off"),
                "QuIP# CPU kernel")
GEMV_MAX_TOKENS = 4  # above this many rows of x: decode W̃ once + BLAS GEMM
_EMPTY = torch.empty(0, dtype=torch.int16)
_EMPTY_F = torch.empty(0, dtype=torch.float32)
_CODES2 = {"e8res": torch.uint8, "e8p": torch.int16}  # the second stage's stored dtype


def _load():
    """Compile (first time on this machine) and import the extension; ``None`` if that fails."""
    return EXT.load()


def available() -> bool:
    """Whether the compiled kernel can be used in this process (compiles it on the first call)."""
    return EXT.available()


def unavailable_reason() -> str | None:
    return EXT.reason()


def has_avx2() -> bool:
    """Whether the compiled kernel has the AVX2 path (else the scalar one runs)."""
    return available() and _load().has_avx2()


def describe() -> str:
    return "AVX2" if has_avx2() else "portable scalar loop (the CPU has no AVX2+FMA)"


def supports(packed, x: torch.Tensor) -> bool:
    """E8P QuIP# weights (2, 3, 4 bits) stored as the kernel reads them — ``codes`` int16 ``(m, n/8)``, ``codes2``
    uint8 (3 bits) or int16 (4 bits) ``(m, n/8)``, float ``scales`` (one per stage; cast to fp32 as the reference
    does), sign planes or vectors, all on the CPU — and ``x`` (…, n) float32/bf16/fp16 on the CPU; the scalar
    codebook is left to the reference."""
    if (getattr(packed, "kind", None) != "quip" or getattr(packed, "codebook", None) != "e8p"
            or packed.bits not in (2, 3, 4) or packed.shape[1] % 8):
        return False
    (m, n), stages = packed.shape, packed.stages
    signs = [t for t in (packed.su, packed.sv) if t is not None]
    return (cpu_input(x, n) and cpu_tensor(packed.codes, torch.int16, (m, n // 8))
            and (packed.codes2 is None) == (len(stages) == 1)
            and (packed.codes2 is None or cpu_tensor(packed.codes2, _CODES2[stages[1]], (m, n // 8)))
            and packed.scales.is_floating_point() and packed.scales.device.type == "cpu"
            and packed.scales.numel() == len(stages)
            and all(t.device.type == "cpu" for t in signs) and len(signs) in (0, 2))


@lru_cache(maxsize=None)
def _tables() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``A`` (256, 8) fp32 abs patterns with coordinate 7 negated where the pattern parity is odd,
    ``S`` (128, 8) int32 sign-bit XOR masks of the 7 sign bits (coordinate 7: their popcount parity),
    ``R`` (256, 8) fp32 residual codebook."""
    A = codebooks.abs_table().clone()
    A[:, 7] *= 1.0 - 2.0 * codebooks.pattern_parity().float()
    sig = torch.arange(128)
    neg7 = (sig[:, None] >> torch.arange(7)) & 1
    neg = torch.cat([neg7, (neg7.sum(-1) & 1)[:, None]], dim=1).bool()
    S = torch.where(neg, torch.tensor(-2 ** 31, dtype=torch.int32), torch.tensor(0, dtype=torch.int32))
    return A.contiguous(), S.contiguous(), codebooks.residual_codebook().float().contiguous()


@lru_cache(maxsize=None)
def _hadamard(n: int) -> tuple[torch.Tensor, int]:
    """``(H_K (K, K) fp32, P)`` with ``n = K·P`` (the decomposition :func:`hadamard_transform` uses)."""
    K, P = hadamard_factor(n)
    return hadamard_matrix(K).float().contiguous(), P


def _rht(x: torch.Tensor, signs: torch.Tensor | None, kind: str, inverse: bool, fast: bool) -> torch.Tensor:
    """``rht_forward`` / ``rht_inverse`` of :mod:`lowbit.packed.rht` on (M, n) fp32; the Hadamard kind runs in
    the compiled kernel (one call instead of ~6 torch ops per butterfly level) unless ``fast`` is False."""
    if kind == "none":
        return x
    if kind == "hadamard" and fast:
        H, P = _hadamard(x.shape[-1])
        s = _EMPTY_F if signs is None else signs.float().contiguous()
        return _load().rht(x, s, H, P, inverse)
    return (rht_inverse if inverse else rht_forward)(x, signs, kind)


def _args(packed):
    codes2 = _EMPTY if packed.codes2 is None else packed.codes2.contiguous()
    return (packed.codes.contiguous(), codes2, packed.scales.float().contiguous())


def rotated(packed, scalar: bool = False) -> torch.Tensor:
    """``W̃`` (m, n) fp32 — same as ``packed.rotated()``, bit for bit."""
    return _load().rotated(*_args(packed), packed.shape[1], *_tables(), scalar)


def rotated_matmul(packed, xv: torch.Tensor, scalar: bool = False) -> torch.Tensor:
    """``xv @ W̃ᵀ`` for an already input-rotated ``xv`` (M, n) fp32 -> (M, m) fp32."""
    xv = xv.float().contiguous()
    if xv.shape[0] <= GEMV_MAX_TOKENS:
        return _load().gemv(xv, *_args(packed), *_tables(), scalar)
    return xv @ rotated(packed, scalar).T


def plan(packed, scalar: bool = False, fast_rht: bool = True):
    """``x -> x Wᵀ`` for this weight, with the sign vectors unpacked once (unpacking the 1-bit planes costs
    more than a decode step): ``x`` (…, n) float -> (…, m) in ``x.dtype`` (no bias).  ``scalar`` forces the
    portable (non-AVX2) decode loop, ``fast_rht=False`` the torch Hadamard transforms (tests)."""
    m, n = packed.shape
    su, sv = packed.signs()

    def run(x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:  # (torch.fft refuses empty batches)
            return x.new_zeros(*x.shape[:-1], m)
        xv = _rht(x.reshape(-1, n).float(), sv, packed.in_kind, False, fast_rht)
        y = _rht(rotated_matmul(packed, xv, scalar), su, packed.out_kind, True, fast_rht)
        return y.to(x.dtype).view(*x.shape[:-1], m)

    return run


def matmul(packed, x: torch.Tensor, scalar: bool = False, fast_rht: bool = True) -> torch.Tensor:
    """``y = x Wᵀ`` (…, m): :func:`plan` ``(packed, scalar, fast_rht)(x)``."""
    return plan(packed, scalar, fast_rht)(x)
