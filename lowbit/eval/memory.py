"""What a model costs: bytes of weights in memory, stored bits per quantized weight, peak RSS."""
from __future__ import annotations

import resource
import sys

from torch import nn

from ..packed.qlinear import QuantLinear


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer as held in memory (shared/tied storage counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def bits_per_weight(model: nn.Module) -> float:
    """All stored bits of the quantized linears (codes, scales, zeros, indices…) per weight of those
    linears; 16.0 for a model without quantized linears (its linears are counted as fp16)."""
    bits = weights = 0
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            bits += mod.packed.stored_bits()
            weights += mod.in_features * mod.out_features
    return bits / weights if weights else 16.0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)
