"""Wrap a model's decoder linears in :class:`FakeQuantLinear` and, after training, fold them into
ordinary packed integer weights (:class:`QuantLinear` holding a ``GroupQuantWeight``).

Export is exact: codes ``q = clamp(round((W₀ + BA)/s) + z, 0, 2^b − 1)`` and scales ``s' = fp16(m·s)``
are the very tensors the fake-quantized forward used, so the exported model computes the same
logits as the trained fake-quantized model, with zero inference overhead (no LoRA, no magnitude).
With ``--gguf-type`` every layer becomes its GGUF type's blocks instead (:mod:`.gguf`: exact for the legacy
types, the trained weight projected onto the others).
"""
from __future__ import annotations

import torch
from torch import nn

from ..models.arch import ArchSpec, blocks_of, linears_of
from ..models.modules import replace_module
from ..packed.qlinear import QuantLinear
from ..packed.qweight import GroupQuantWeight
from .fakequant import FakeQuantLinear


def wrap(model: nn.Module, spec: ArchSpec, inits: dict[str, tuple[GroupQuantWeight, torch.Tensor]], rank: int,
         seed: int, fp16_min: frozenset = frozenset()) -> dict[str, FakeQuantLinear]:
    """Replace every decoder linear named in ``inits`` ``{full name: (initial packed grid, W₀ (m, n))}``
    by a :class:`FakeQuantLinear` on that grid (the grid's scales and zeros; its codes are recomputed
    from W₀).  LoRA ``A`` factors are drawn, layer by layer in model order, from one private
    generator seeded with ``seed``.  Layers named in ``fp16_min`` round their offset to fp16 (GGUF Q4_1/Q5_1,
    :class:`FakeQuantLinear`).  Returns ``{full name: module}``."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, block in enumerate(blocks_of(model, spec)):
        for name, lin in linears_of(block).items():
            full = f"{spec.blocks}.{i}.{name}"
            if full not in inits:
                continue
            packed, w0 = inits[full]
            device = lin.weight.device
            mod = FakeQuantLinear(w0.cpu(), None if lin.bias is None else lin.bias.cpu(), packed.scales.float(),
                                  packed.zeros(), packed.column_groups(), packed.bits, packed.group_size, rank, gen,
                                  sym=packed.sym, fp16_min=full in fp16_min).to(device)
            replace_module(block, name, mod)
            out[full] = mod
    return out


def trainable_params(modules: dict[str, FakeQuantLinear]) -> dict[str, nn.Parameter]:
    """``{"<layer>.magnitude" | ".lora_a" | ".lora_b": parameter}`` — everything DL-QAT trains."""
    return {f"{name}.{attr}": getattr(mod, attr) for name, mod in modules.items()
            for attr in ("magnitude", "lora_a", "lora_b")}


def unique_param_count(model: nn.Module) -> int:
    """Parameters of ``model``, tied/shared tensors counted once."""
    seen, total = set(), 0
    for p in model.parameters():
        key = (p.untyped_storage().data_ptr(), p.storage_offset(), p.numel())
        if key not in seen:
            seen.add(key)
            total += p.numel()
    return total


def trainable_fraction(modules: dict[str, FakeQuantLinear], total_params: int) -> float:
    """``Σ_layers (m·G + r·(m + n)) / P``: magnitudes and LoRA factors over the FP model's ``P`` parameters."""
    return sum(p.numel() for p in trainable_params(modules).values()) / total_params


@torch.no_grad()
def export(model: nn.Module, modules: dict[str, FakeQuantLinear], gguf: dict | None = None) -> dict[str, tuple]:
    """Replace every :class:`FakeQuantLinear` by a :class:`QuantLinear` of its exported weight (with ``gguf``
    ``{full name: LayerPlan}``: its GGUF blocks, :func:`lowbit.qat.gguf.to_gguf`); returns ``{full name: (packed,
    info)}`` like the calibration runner."""
    from .gguf import to_gguf

    results = {}
    for full, mod in modules.items():
        packed, info = mod.export() if gguf is None else to_gguf(mod, gguf[full])
        replace_module(model, full, QuantLinear(packed, mod.bias).to(mod.w0.device))
        results[full] = (packed, info)
    return results
