"""Fast CPU kernel for :class:`~lowbit.packed.mixed.MixedBinaryWeight` (kind ``"bin+int"``, Squeeze10).

The kernel reads the stored tensors as they are — the bit plane ``qsign``, the flat ``qrest`` stream of the
high cells' remaining ``b − 1`` bits, the cell ``mask``, ``p1``/``p2`` fp16 and, with residual
binarization, ``qres``/``p3`` — so the weight stays at its stored size.  The only per-weight set-up
(:func:`plan`, once) is three int64 offsets per row: where the row starts in ``qrest`` (codes), in ``qres``
(bits) and in ``p3`` (cells).  For ``x`` (…, n):

* few tokens (``M ≤ GEMV_MAX_TOKENS``, i.e. decoding): per row, per cell ``g``, with ``S_g = Σ_{j∈g} x_j``
  (once per token) and ``B = Σ_{j∈g, t_j=1} x_j`` by table lookups on the bit plane (per token, 256 subset
  sums of every 8 columns, n·128 bytes; one lookup per byte of ``qsign``; cells are visited cell column by
  cell column so one column's tables stay in L1),

  - binary cell: ``μ·S_g + α·(2B − S_g)`` (``+ α₂·(2U − S_g)``, ``U`` from ``qres`` the same way),
  - high cell:   ``s·(2^(b−1)·B + Σ r_j x_j − z·S_g)`` (8 codes per 64-bit load; for ``b ≤ 4`` each lane keeps its
    code in place, ``r·2^(k(b−1))``, and multiplies ``x`` pre-scaled by ``2^(−k(b−1))``: exact, no variable shifts);

  AVX2 + FMA where the CPU has it, a portable scalar loop otherwise; rows in parallel (``at::parallel_for``);
* many tokens (prefill): ``Ŵ`` (m, n) fp32 is written to a temporary by the kernel (bit-identical to
  :meth:`MixedBinaryWeight.dequantize`) and multiplied by the BLAS GEMM of ``x.dtype`` — exactly the
  reference computation, faster.

Activations stay float (fp32 math, the result cast back to ``x.dtype``), so this is the ``"exact"`` kernel
of the dispatcher: the reference result up to fp32 summation order.  The C++ source (``csrc/mixed_cpu.cpp``)
is compiled on first use (``-O3 -march=native -fopenmp -ffp-contract=off``) into ``$LOWBIT_CACHE/kernels``;
importing this module never compiles, :func:`available` does, once per process.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .build import Extension
from .checks import cpu_input, cpu_tensor, words

EXT = Extension("mixed_cpu", "mixed_cpu.cpp", ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off"),
                "mixed binary/int CPU kernel")
GEMV_MAX_TOKENS = 4  # above this many rows of x: dequantize once + BLAS GEMM (as the other kernels)
_EMPTY_I = torch.empty(0, dtype=torch.int32)
_EMPTY_H = torch.empty(0, dtype=torch.float16)


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
    """Every ``MixedBinaryWeight`` (2–8 high bits, any group size, with or without residual) stored as the C++
    reads it — ``qsign`` int32 ``(m, ceil(n/32))``, ``qrest``/``mask`` int32 streams, ``p1``/``p2`` fp16
    ``(m, G)``, with residual ``qres`` int32 and ``p3`` fp16 streams, all contiguous on the CPU — and ``x`` (…, n)
    float32/bf16/fp16 on the CPU."""
    if getattr(packed, "kind", None) != "bin+int" or not 2 <= packed.high_bits <= 8:
        return False
    (m, n), G = packed.shape, -(-packed.shape[1] // packed.group_size)
    res = packed.binary_residual
    return (cpu_input(x, n) and cpu_tensor(packed.qsign, torch.int32, (m, words(n, 1)))
            and cpu_tensor(packed.qrest, torch.int32, 1) and cpu_tensor(packed.mask, torch.int32, (words(m * G, 1),))
            and cpu_tensor(packed.p1, torch.float16, (m, G)) and cpu_tensor(packed.p2, torch.float16, (m, G))
            and (not res or (cpu_tensor(packed.qres, torch.int32, 1) and cpu_tensor(packed.p3, torch.float16, 1))))


def _offsets(packed) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: first ``qrest`` code, first ``qres`` bit, first ``p3`` cell (int64 (m,) each)."""
    m, n = packed.shape
    gs, G = packed.group_size, packed.n_groups
    high = packed.high_cells()                                          # (m, G) bool
    lens = torch.full((G,), gs, dtype=torch.int64)
    lens[-1] = n - (G - 1) * gs
    hw = (high.long() * lens).sum(1)                                    # high weights per row
    excl = lambda v: torch.cumsum(v, 0) - v                             # noqa: E731  exclusive prefix sum
    return excl(hw).contiguous(), excl(n - hw).contiguous(), excl((~high).long().sum(1)).contiguous()


def _args(packed, offsets):
    res = packed.binary_residual
    return (packed.qsign, packed.qrest, packed.mask, packed.p1, packed.p2,
            packed.qres if res else _EMPTY_I, packed.p3 if res else _EMPTY_H,
            *offsets, packed.shape[1], packed.group_size, packed.high_bits)


def dequantize(packed) -> torch.Tensor:
    """``Ŵ`` (m, n) fp32 — same as ``packed.dequantize(torch.float32)``, bit for bit."""
    return _load().dequantize(*_args(packed, _offsets(packed)))


def plan(packed, scalar: bool = False):
    """``x -> x Ŵᵀ`` for this weight with the per-row offsets computed once: ``x`` (…, n) float -> (…, m) in
    ``x.dtype`` (no bias).  ``scalar`` forces the portable (non-AVX2) loop (tests)."""
    m, n = packed.shape
    mod, args = _load(), _args(packed, _offsets(packed))

    def run(x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.dtype == torch.float32 and 0 < x.shape[0] <= GEMV_MAX_TOKENS:
            return mod.gemv(x, *args, scalar)  # the decode step: no reshapes, no casts
        x2 = x.reshape(-1, n)
        if x2.shape[0] > GEMV_MAX_TOKENS:
            return F.linear(x, mod.dequantize(*args).to(x.dtype))
        if x2.shape[0] == 0:
            return x.new_zeros(*x.shape[:-1], m)
        y = mod.gemv(x2.float().contiguous(), *args, scalar)
        return y.to(x.dtype).view(*x.shape[:-1], m)

    return run


def matmul(packed, x: torch.Tensor, scalar: bool = False) -> torch.Tensor:
    """``y = x Ŵᵀ`` (…, m): :func:`plan` ``(packed, scalar)(x)``."""
    return plan(packed, scalar)(x)
