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
    """All stored bits of the quantized linears (codes, scales, zeros, indices…) and of a quantized embedding
    table (``--embedding-type``) per weight of those tensors, a tied table (the embedding and the head on one
    tensor) counted once; 16.0 for a model without quantized linears (its linears are counted as fp16)."""
    from ..packed.qembedding import QuantEmbedding

    bits = weights = 0
    seen = set()
    for mod in model.modules():
        if isinstance(mod, (QuantLinear, QuantEmbedding)):
            p = mod.packed
            key = tuple(t.data_ptr() for t in p.tensors().values())
            if key in seen:
                continue
            seen.add(key)
            bits += p.stored_bits()
            weights += p.shape[0] * p.shape[1]
    return bits / weights if weights else 16.0


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)
