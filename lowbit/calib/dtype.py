"""The activation dtype of the calibration runner and of DL-QAT's training (``--calib-dtype``)."""
from __future__ import annotations

import torch


def calib_dtype(name: str, device: str) -> torch.dtype:
    """``float32`` / ``bfloat16`` / ``float16`` as named; ``auto`` = bfloat16 where the hardware runs it fast
    (CUDA with bf16 support, else float16; CPU with oneDNN bf16, else float32)."""
    if name != "auto":
        return getattr(torch, name)
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    fast_bf16 = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)()
    return torch.bfloat16 if fast_bf16 else torch.float32
