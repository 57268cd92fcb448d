"""The activation dtype of the calibration runner and of DL-QAT's training (``--calib-dtype``)."""
from __future__ import annotations

import torch


def calib_dtype(name: str, device: str) -> torch.dtype:
    """``float32`` / ``bfloat16`` / ``float16`` as named; ``auto`` = bfloat16 where the hardware runs it fast
    (CUDA with bf16 support, else float16; a CPU with native bf16 dot products, AVX512-BF16 or AMX, else
    float32).

    oneDNN *accepts* bf16 on any AVX-512 CPU (``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` is true there)
    but without the bf16 instructions it converts and multiplies in float32: measured on a 2-core AVX-512 Xeon
    without AVX512-BF16, a (512, 576) × (576, 1536) bf16 product ran at ≈ 0.4× the float32 speed, and the
    demo model's GPTQ took 236 s in bf16 against ≈ 100 s in float32 (BENCHMARKS.md, issue #17)."""
    if name != "auto":
        return getattr(torch, name)
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if native_cpu_bf16() else torch.float32


def native_cpu_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX tiles)."""
    cpu = torch.cpu
    return any(getattr(cpu, f, lambda: False)() for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))
