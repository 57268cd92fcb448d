"""The checks every kernel's ``supports()`` makes: each tensor the C++ reads, as the C++ reads it.

A weight whose buffers were converted (``model.to(torch.bfloat16)`` turns fp16 scales into bf16), moved
(CUDA, meta) or made non-contiguous is not the layout a kernel was written for; ``supports()`` then says
no and the dispatcher takes the reference path instead of the C++ raising (or reading garbage).
"""
from __future__ import annotations

import torch

FLOATS = (torch.float32, torch.bfloat16, torch.float16)  # the activation dtypes the kernels take


def cpu_input(x: torch.Tensor, n: int) -> bool:
    """``x`` (…, n) float32/bf16/fp16 on the CPU."""
    return x.device.type == "cpu" and x.dtype in FLOATS and x.dim() >= 1 and x.shape[-1] == n


def cpu_tensor(t: torch.Tensor | None, dtypes: torch.dtype | tuple[torch.dtype, ...],
               shape: tuple[int, ...] | int) -> bool:
    """``t`` is a contiguous CPU tensor of one of ``dtypes`` with exactly ``shape`` (an int: any shape of that
    many dimensions)."""
    if t is None or t.device.type != "cpu" or not t.is_contiguous():
        return False
    if t.dtype not in (dtypes if isinstance(dtypes, tuple) else (dtypes,)):
        return False
    return t.dim() == shape if isinstance(shape, int) else tuple(t.shape) == tuple(shape)


def words(n: int, bits: int) -> int:
    """int32 words of a row of ``n`` codes of ``bits`` bits (:func:`lowbit.packed.bitpack.packed_width`)."""
    return -(-n // 32) * bits
