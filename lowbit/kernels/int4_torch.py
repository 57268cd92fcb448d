"""CUDA kernel for 4-bit :class:`~lowbit.packed.qweight.GroupQuantWeight`: torch's own int4 weight-only matmul.

torch ships the "tinygemm" int4 kernel (``aten._weight_int4pack_mm``, tensor cores, NVIDIA sm80+), the one
gpt-fast and torchao use, so lowbit does not carry CUDA code of its own.  The conventions (ATen's
``native/cuda/int4mm.cu`` and ``native/cpu/int4mm_kernel.cpp``, and torch's test helper
``_group_quantize_tensor``):

* lowbit stores ``Ŵ[i, j] = s[i, g] · (q[i, j] − z[i, g])``, ``q, z ∈ [0, 16)``, ``g = j // gs``;
* tinygemm decodes ``Ŵ[i, j] = (q[i, j] − 8) · S[g, i, 0] + S[g, i, 1]``,

so ``S[g, i] = (s[i, g], s[i, g] · (8 − z[i, g]))`` (symmetric: ``z = 8``, the second entry is 0).  In fp32 this
is exact: ``8 − z`` is an integer of magnitude ≤ 8 and ``s`` an fp16 (11 significant bits), so the product
and the decoded sum ``(q − 8)·s + s·(8 − z) = s·(q − z)`` need at most 16 bits.  The CUDA op takes bf16 only:
``S`` is rounded to bf16 (8 significant bits, unit roundoff 2⁻⁸), the decoded weight too (a bf16 FMA), products
are summed in fp32, and fp16/fp32 activations are cast to bf16 and the result back — which is why the
dispatcher uses it under ``"exact"`` for bf16 inputs only (where the reference also rounds ``Ŵ`` to bf16).

Layouts, for ``W`` (m, n), ``G = n / gs`` groups (:func:`layout` makes the part both variants share):

* codes ``(m, n)`` in ``[0, 16)``: the CUDA op ``_convert_weight_to_int4pack(uint8 (m, n/2), inner_k_tiles)``
  wants two codes per byte, the even column in the high nibble (``q[:, 2j] << 4 | q[:, 2j+1]``), and returns
  int32 ``(m/8, n/(16·inner_k_tiles), 32, inner_k_tiles/2)``; torch's CPU twin
  ``_convert_weight_to_int4pack_for_cpu(int32 (m, n), inner_k_tiles)`` takes one code per int32;
* ``scales_and_zeros`` ``(G, m, 2)`` in the compute dtype.

What the op accepts (:func:`refusal` says why not, and :func:`supports` declines, so the dispatcher runs the
reference path instead): 4 bits, contiguous groups (no ``g_idx``), ``gs ∈ {32, 64, 128, 256}``, no partial last
group (``n % gs == 0``), ``m`` a multiple of 8 (16 for the CPU twin).  ``inner_k_tiles`` is the largest of 8, 4,
2 with ``n % (16 · inner_k_tiles) == 0`` (``n`` is a multiple of 32 since ``gs`` is).  The repacking happens
once, in :func:`plan` (the layer caches the plan); a call is one ``_weight_int4pack_mm`` — the weight is never
dequantized.  The packed copy costs ``m·n/2`` bytes + ``4·G·m`` bytes on the device, beside the stored buffers.

The CPU twin is not registered for CPU inputs (:mod:`.group_cpu` serves those); it is here so the layout and
the convention are tested where there is no GPU: ``plan`` on CPU tensors runs it.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import torch

from ..packed import bitpack
from .checks import FLOATS, words

GROUP_SIZES = (32, 64, 128, 256)  # the q-group sizes both ops are compiled for
_ROW_CHUNK = 1 << 22  # codes unpacked about this many at a time (int64 temporaries stay small)


class _Variant(NamedTuple):
    """One device's ops around the shared :func:`layout`."""
    convert: Callable  # (q uint8 (m, n), inner_k_tiles) -> the op's packed weight
    mm: Callable       # (x (M, n) contiguous, packed weight, gs, scales_and_zeros) -> (M, m)
    m_multiple: int    # the rows must be a multiple of it
    dtypes: tuple      # what mm computes in; other inputs are cast to the first
    ops: tuple         # the aten ops it needs


def _nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes (m, n) -> uint8 (m, n/2), byte ``j`` = ``q[:, 2j] << 4 | q[:, 2j+1]`` (the CUDA op's input)."""
    return (codes[:, 0::2] << 4 | codes[:, 1::2]).contiguous()


VARIANTS = {
    "cuda": _Variant(lambda q, t: torch.ops.aten._convert_weight_to_int4pack(_nibbles(q), t),
                     lambda x, w, gs, sz: torch.ops.aten._weight_int4pack_mm(x, w, gs, sz),
                     8, (torch.bfloat16,), ("_convert_weight_to_int4pack", "_weight_int4pack_mm")),
    "cpu": _Variant(lambda q, t: torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), t),
                    lambda x, w, gs, sz: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, gs, sz),
                    16, (torch.bfloat16, torch.float16, torch.float32),
                    ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu")),
}


def _missing(variant: str) -> list[str]:
    return [op for op in VARIANTS[variant].ops if not hasattr(torch.ops.aten, op)]


def refusal(packed, m_multiple: int = VARIANTS["cuda"].m_multiple) -> str | None:
    """Why the op cannot take ``packed`` (``None``: it can) — the format and every tensor's dtype and shape
    (devices are :func:`supports`'s business)."""
    if getattr(packed, "kind", None) != "int" or packed.bits != 4:
        return "not a 4-bit integer weight"
    (m, n), gs = packed.shape, packed.group_size
    if packed.g_idx is not None:
        return "groups are not contiguous (g_idx)"
    if gs not in GROUP_SIZES:
        return f"group size {gs} is not one of {', '.join(map(str, GROUP_SIZES))}"
    if n % gs:
        return f"the last group is partial ({n} columns, group size {gs})"
    if m % m_multiple:
        return f"{m} rows is not a multiple of {m_multiple}"
    G = n // gs
    if packed.qweight.dtype != torch.int32 or tuple(packed.qweight.shape) != (m, words(n, 4)):
        return "qweight is not int32 (m, n/8)"
    if not packed.scales.is_floating_point() or tuple(packed.scales.shape) != (m, G):
        return "scales are not float (m, G)"
    if packed.qzeros is not None and (packed.qzeros.dtype != torch.int32
                                      or tuple(packed.qzeros.shape) != (G, words(m, 4))):
        return "qzeros are not int32 (G, m/8)"
    return None


@functools.cache
def _tensor_cores(index: int) -> bool:
    """Whether CUDA device ``index`` has what tinygemm needs (NVIDIA, compute capability ≥ 8.0)."""
    return torch.version.hip is None and torch.cuda.get_device_capability(index) >= (8, 0)


def _index(device: torch.device) -> int:
    return torch.cuda.current_device() if device.index is None else device.index


def unavailable_reason() -> str | None:
    """Why the CUDA op cannot run in this process (``None``: it can)."""
    if missing := _missing("cuda"):
        return f"torch {torch.__version__} has no aten.{missing[0]}"
    if torch.version.hip is not None:
        return "ROCm build: tinygemm's AMD path is not verified here"
    if not torch.cuda.is_available():
        return "no CUDA device"
    if not any(_tensor_cores(i) for i in range(torch.cuda.device_count())):
        return "no CUDA device of compute capability 8.0 or newer (tinygemm needs Ampere tensor cores)"
    return None


def available() -> bool:
    """Whether some CUDA device here can run the op (nothing to build)."""
    return unavailable_reason() is None


def cpu_available() -> bool:
    """Whether this torch has the CPU twin (``plan`` on CPU tensors)."""
    return not _missing("cpu")


def describe() -> str:
    names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()) if _tensor_cores(i)})
    return f"torch tinygemm int4 (aten._weight_int4pack_mm, bf16) on {', '.join(names)}"


def supports(packed, x: torch.Tensor) -> bool:
    """4-bit weights :func:`refusal` accepts, every tensor on ``x``'s CUDA device (sm80+, NVIDIA), ``x`` (…, n)
    float32/bf16/fp16."""
    if x.device.type != "cuda" or x.dtype not in FLOATS or x.dim() < 1 or refusal(packed) is not None:
        return False
    return (x.shape[-1] == packed.shape[1] and all(t.device == x.device for t in packed.tensors().values())
            and _tensor_cores(_index(x.device)))


def codes_u8(packed) -> torch.Tensor:
    """The codes ``q`` (m, n) as uint8 on the weight's device, unpacked a few rows at a time (the int64
    temporaries of :func:`lowbit.packed.bitpack.unpack` stay small)."""
    m, n = packed.shape
    rows = max(1, _ROW_CHUNK // max(n, 1))
    chunks = [bitpack.unpack(packed.qweight[r:r + rows], 4, n).to(torch.uint8) for r in range(0, m, rows)]
    return torch.cat(chunks) if chunks else torch.empty(0, n, dtype=torch.uint8, device=packed.qweight.device)


def layout(packed) -> tuple[torch.Tensor, torch.Tensor]:
    """The part of the conversion both ops share: ``(codes, scales_and_zeros)`` = uint8 ``q`` (m, n) and fp32
    ``S`` (G, m, 2) with ``S[g, i] = (s[i, g], s[i, g]·(8 − z[i, g]))``, so that
    ``(q − 8)·S[g, i, 0] + S[g, i, 1] = s·(q − z)`` exactly (see the module docstring)."""
    s = packed.scales.float()
    zt = s * (8.0 - packed.zeros().to(s.device))
    return codes_u8(packed), torch.stack([s, zt], dim=-1).transpose(0, 1).contiguous()


def inner_k_tiles(n: int) -> int:
    """The largest of 8, 4, 2 with ``n % (16 · t) == 0`` (wider tiles: 16-byte loads)."""
    return next(t for t in (8, 4, 2) if n % (16 * t) == 0)


def plan(packed, dtype: torch.dtype = torch.bfloat16):
    """``x -> x Ŵᵀ`` (…, m) in ``x.dtype``, the weight repacked once now.  CUDA tensors: the tinygemm op, which
    computes in bf16 whatever ``dtype`` says; CPU tensors: torch's CPU twin in ``dtype`` (bf16, fp16 or fp32)."""
    variant = VARIANTS["cuda" if packed.qweight.device.type == "cuda" else "cpu"]
    if (why := refusal(packed, variant.m_multiple)) is not None:
        raise ValueError(f"int4_torch cannot take this weight: {why}")
    (m, n), gs = packed.shape, packed.group_size
    cdt = dtype if dtype in variant.dtypes else variant.dtypes[0]
    codes, sz = layout(packed)
    w, sz = variant.convert(codes, inner_k_tiles(n)), sz.to(cdt)
    del codes

    def run(x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, n)
        if x2.shape[0] == 0:
            return x.new_zeros(*x.shape[:-1], m)
        y = variant.mm(x2.to(cdt).contiguous(), w, gs, sz)
        return y.to(x.dtype).reshape(*x.shape[:-1], m)

    return run


def matmul(packed, x: torch.Tensor) -> torch.Tensor:
    """``y = x Ŵᵀ`` (…, m): :func:`plan` ``(packed, x.dtype)(x)``."""
    return plan(packed, x.dtype)(x)
