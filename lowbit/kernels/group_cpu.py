"""Fast CPU kernel for :class:`~lowbit.packed.qweight.GroupQuantWeight` (kind ``"int"``), any width 1–8.

The kernel reads the canonical packed tensors as they are (no repacking, no extra memory):
``qweight`` int32 ``(m, ceil(n/32)·b)``, ``scales`` fp16 ``(m, G)``, ``qzeros`` int32
``(G, ceil(m/32)·b)`` or none, ``g_idx`` int32 ``(n,)`` or none.  For ``x`` ``(…, n)``:

* few tokens (``M ≤ GEMV_MAX_TOKENS``, i.e. decoding): fused unpack-and-dot,
  ``y[t, i] = Σ_g s[i,g] · Σ_{j∈g} (q[i,j] − z[i,g]) · x[t,j]``, reading ``b/8`` bytes per weight
  instead of 4 (fp32) or 2 (bf16).  With AVX-512 BF16 (b ≤ 7, contiguous groups of a multiple of 32)
  the codes become exact bf16 numbers and ``x`` is split into 1 (bf16), 2 (fp16) or 3 (fp32) bf16
  parts that sum to it exactly, so the products are exact and only the fp32 summation order differs
  from the reference; otherwise an fp32 FMA path: AVX-512 (any width, group size, ``g_idx``),
  AVX2 (8 lanes; contiguous groups, group size and ``n`` multiples of 8) or scalar;
* many tokens (prefill): ``Ŵ = s·(q − z)`` is written to a temporary fp32 ``(m, n)`` by the kernel
  (bit-identical to the reference dequantization, freed after the call) and multiplied by the BLAS
  GEMM of ``x.dtype``, so prefill is exactly the reference computation, only faster.

The C++ source (``csrc/group_cpu.cpp`` with ``group_cpu_avx2.h``, ``group_cpu_bf16.h``, ``group_cpu_q8.h``) is
compiled on first use by :class:`lowbit.kernels.build.Extension` (``-O3 -march=native``; the AVX-512, AVX2 or
scalar path by ``#if``) into ``$LOWBIT_CACHE/kernels`` (default ``~/.cache/lowbit/kernels``).  Importing this
module never compiles; :func:`available` does, once per process, and returns ``False`` (with the reason in
:func:`unavailable_reason`) when there is no compiler or the build fails.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .build import Extension
from .checks import cpu_input, cpu_tensor, words

EXT = Extension("group_cpu", "group_cpu.cpp", ("-O3", "-march=native", "-fopenmp"), "CPU kernel")
GEMV_MAX_TOKENS = 4  # above this many rows of x, dequantize-to-temporary + GEMM measured faster
_EMPTY = torch.empty(0, dtype=torch.int32)
# bf16 parts that represent x exactly (8 significant bits each): bf16 1, fp16 (11 bits) 2, fp32 (24) 3
_SPLITS = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 3}


def _load():
    """Compile (first time on this machine) and import the extension; ``None`` if that fails."""
    return EXT.load()


def available() -> bool:
    """Whether the compiled kernel can be used in this process (compiles it on the first call)."""
    return EXT.available()


def unavailable_reason() -> str | None:
    return EXT.reason()


def describe() -> str:
    """The paths compiled in, e.g. ``"AVX-512; int8 activations (AVX2)"`` (the kernel must be available)."""
    mod = _load()
    path = ("AVX-512 with BF16 dot products" if mod.has_bf16() else "AVX-512" if mod.has_avx512()
            else "AVX2" if mod.has_avx2() else "portable scalar loops (the CPU has no AVX2+FMA)")
    return path + ("; int8 activations (AVX2)" if mod.has_q8() else "")


def supports(packed, x: torch.Tensor) -> bool:
    """Every ``GroupQuantWeight`` with 1–8 bits whose tensors are the canonical CPU layout: ``qweight`` int32
    ``(m, ceil(n/32)·b)``, ``scales`` fp16 ``(m, G)``, ``qzeros`` int32 ``(G, ceil(m/32)·b)`` or none, ``g_idx``
    int32 ``(n,)`` or none, all contiguous; ``x`` (…, n) float32/bf16/fp16 on the CPU."""
    if getattr(packed, "kind", None) != "int" or not 1 <= packed.bits <= 8:
        return False
    (m, n), b = packed.shape, packed.bits
    G = -(-n // packed.group_size)
    return (cpu_input(x, n) and cpu_tensor(packed.qweight, torch.int32, (m, words(n, b)))
            and cpu_tensor(packed.scales, torch.float16, (m, G))
            and (packed.qzeros is None or cpu_tensor(packed.qzeros, torch.int32, (G, words(m, b))))
            and (packed.g_idx is None or cpu_tensor(packed.g_idx, torch.int32, (n,))))


def _args(packed):
    return (packed.qweight, packed.scales, _EMPTY if packed.qzeros is None else packed.qzeros,
            _EMPTY if packed.g_idx is None else packed.g_idx)


def dequantize(packed) -> torch.Tensor:
    """``Ŵ`` (m, n) fp32 — same as ``packed.dequantize(torch.float32)``, bit for bit."""
    return _load().dequantize(*_args(packed), packed.shape[1], packed.bits, packed.group_size)


def int8_supported(packed) -> bool:
    """Whether the int8-activation decode path applies: AVX2 build, 2/3/4/8-bit codes, contiguous groups,
    ``n`` and the group size multiples of the activation block (32; 64 for 2-bit)."""
    qb = 64 if packed.bits == 2 else 32
    return (packed.bits in (2, 3, 4, 8) and packed.g_idx is None and packed.shape[1] % qb == 0
            and packed.group_size % qb == 0 and _load() is not None and _load().has_q8())


def plan(packed, int8_act: bool = False):
    """``x -> x Ŵᵀ`` for this weight, with the per-weight decisions taken once (what a layer calls per token).

    ``x`` (…, n) float -> (…, m) in ``x.dtype`` (no bias).  ``int8_act``: for few tokens, round ``x`` to int8
    blocks first and use integer dot products (see ``csrc/group_cpu_q8.h``) where :func:`int8_supported`;
    the result is then exactly ``x̂ Ŵᵀ`` with ``x̂ =`` :func:`lowbit.kernels.reference.int8_blocks` ``(x)``
    (up to fp32 summation order)."""
    n = packed.shape[1]
    mod, (qw, sc, qz, gi) = _load(), _args(packed)
    bits, gs = packed.bits, packed.group_size
    q8 = int8_act and int8_supported(packed)

    def run(x: torch.Tensor) -> torch.Tensor:  # the kernels take x (…, n) and return (…, m) in x.dtype
        if x.numel() > GEMV_MAX_TOKENS * n:
            return F.linear(x, dequantize(packed).to(x.dtype))
        return mod.gemm_q8(x, qw, sc, qz, bits, gs) if q8 else mod.gemm(x, qw, sc, qz, gi, bits, gs, _SPLITS[x.dtype])

    return run


def matmul(packed, x: torch.Tensor, int8_act: bool = False) -> torch.Tensor:
    """``y = x Ŵᵀ`` (…, m): :func:`plan` ``(packed, int8_act)(x)``."""
    return plan(packed, int8_act)(x)
