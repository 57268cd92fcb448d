"""Export a lowbit checkpoint as a Hugging Face GPTQ checkpoint (AutoGPTQ / GPTQModel "gptq" v1 format).

For each quantized linear ``W`` (m, n) with ``b`` bits and ``G`` groups the folder holds::

    <layer>.qweight  int32 (n·b/32, m)  codes packed along the INPUT axis: for every output column j,
                                        input rows are a little-endian bit stream, code i at bits
                                        [i·b, (i+1)·b); for b = 2/4/8 word k holds codes
                                        k·(32/b) … (k+1)·(32/b)−1, the first in the low bits; for b = 3
                                        every 32 codes fill 3 words with codes 10 and 21 straddling
                                        (AutoGPTQ's 3-bit packing is exactly this stream).
    <layer>.qzeros   int32 (G, m·b/32)  zero points packed the same way along the OUTPUT axis, stored
                                        as zero − 1 in v1 ("gptq"), as zero in v2 ("gptq_v2").
    <layer>.scales   fp16  (G, m)
    <layer>.g_idx    int32 (n,)         group of every input column (i // group_size unless act-order
                                        ran without static groups).
    <layer>.bias     fp16  (m,)         when the linear has one

and dequantization is ``W[j, i] = scales[g_idx[i], j] · (q[i, j] − zero[g_idx[i], j])``.  Symmetric
grids use ``zero = 2^(b−1)`` (stored as 2^(b−1) − 1 in v1), as AutoGPTQ does.  Every other tensor
is stored in fp16 under its transformers name; config.json gets a ``quantization_config``; the
tokenizer and generation files are copied.

Lowbit's ``qweight`` (m, ceil(n/32)·b) already is this bit stream along the input axis, so the GPTQ
``qweight`` is its transpose when 32 divides n.  GPTQ needs 32 | n and 32 | m (its buffers are
``n // 32 · b`` words), groups that divide n (no partial last group), one bit width and group size
for all layers, and, in v1, no zero point equal to 0 (zero − 1 would underflow: use v2).

**Which checkpoint format.**  The default (``checkpoint_format=None``) is what the loaders accept
without flags: symmetric grids as classic ``gptq`` (v1), asymmetric grids as ``gptq_v2``.  GPTQModel
(≥ 7) refuses an asymmetric v1 checkpoint unless its ``meta.quantizer`` names GPTQModel ≥ 0.9.0
(``models/loader.py``: old AutoGPTQ v1 files stored zero − 1 with an underflow at 0), and lowbit does
not write another tool's name; GPTQModel and vLLM (``GPTQConfig.checkpoint_format``,
``gptq_gemm(use_v2_format)``) both read v2 zero points as stored.  vLLM sends symmetric 4/8-bit
checkpoints to its Marlin kernels and everything else to ``gptq_gemm``.  Refused with the reason:
bit widths other than 2/3/4/8 (vLLM's ``GPTQConfig``) and group sizes outside GPTQModel's CPU/torch
kernels (``GPTQ_GROUP_SIZES``).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from .. import __version__
from ..errors import LowbitError
from ..jsonio import dumps
from ..packed import bitpack
from ..packed.qweight import GroupQuantWeight
from .common import atomic_path, fp16_state, read_checkpoint

GPTQ_BITS = (2, 3, 4, 8)                             # vLLM GPTQConfig; GPTQModel's torch kernel has these too
GPTQ_GROUP_SIZES = (-1, 16, 32, 64, 128, 256, 512, 1024)  # GPTQModel TorchLinear.SUPPORTS_GROUP_SIZE (-1 = per row)
FORMATS = ("gptq", "gptq_v2")
SKIP_FILES = {"lowbit.json", "model.safetensors", "config.json"}


def gptq_tensors(p: GroupQuantWeight, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """The four GPTQ tensors of one packed weight (shapes in the module docstring)."""
    m, n = p.shape
    b = p.bits
    zeros = p.zeros().round().to(torch.int64)                       # (m, G)
    if checkpoint_format == "gptq":
        zeros = zeros - 1                                           # v1 stores zero − 1
    return {
        "qweight": p.qweight[:, : n * b // 32].t().contiguous(),   # (n·b/32, m)
        "qzeros": bitpack.pack(zeros.t(), b)[:, : m * b // 32].contiguous(),  # (G, m·b/32)
        "scales": p.scales.t().contiguous(),                        # (G, m) fp16
        "g_idx": p.column_groups().to(torch.int32).contiguous(),    # (n,)
    }


def _check_layer(name: str, p: GroupQuantWeight, group_size: int, checkpoint_format: str) -> None:
    m, n = p.shape
    if p.bits not in GPTQ_BITS:
        raise LowbitError(f"GPTQ export supports {'/'.join(map(str, GPTQ_BITS))} bits; layer '{name}' has {p.bits}")
    if n % 32 or m % 32:
        raise LowbitError(f"GPTQ export needs layer shapes divisible by 32; layer '{name}' is {m}x{n}")
    if n % p.group_size:
        raise LowbitError(f"GPTQ export needs the group size to divide the input size; layer '{name}' has "
                          f"{n} inputs and group size {p.group_size} (a partial last group)")
    expected = n if group_size == -1 else min(group_size, n)
    if p.group_size != expected:
        raise LowbitError(f"GPTQ export needs one group size for all layers; layer '{name}' has {p.group_size}")
    if group_size not in GPTQ_GROUP_SIZES and p.group_size != n:
        raise LowbitError(f"GPTQ export supports group sizes {', '.join(map(str, GPTQ_GROUP_SIZES[1:]))} or per-row "
                          f"(GPTQModel's kernels); layer '{name}' has {p.group_size}")
    if checkpoint_format == "gptq" and not p.sym and bool((p.zeros() == 0).any()):
        raise LowbitError(f"layer '{name}' has zero points equal to 0, which GPTQ v1 cannot store (it stores "
                          f"zero − 1); export with --checkpoint-format gptq_v2")


def export_gptq(model_dir: str | os.PathLike, out: str | os.PathLike, checkpoint_format: str | None = None) -> dict:
    """Write the GPTQ checkpoint folder ``out`` (atomically) from the lowbit checkpoint ``model_dir``;
    ``checkpoint_format`` None: ``gptq`` for symmetric grids, ``gptq_v2`` for asymmetric ones.

    Returns ``{"out", "layers", "bits", "group_size", "sym", "desc_act", "checkpoint_format", "bytes"}``."""
    from safetensors.torch import save_file

    if checkpoint_format is not None and checkpoint_format not in FORMATS:
        raise LowbitError(f"--checkpoint-format must be one of {', '.join(FORMATS)}, got {checkpoint_format!r}")
    ck = read_checkpoint(model_dir)
    layers = ck.int_layers("GPTQ export")
    if not layers:
        raise LowbitError(f"{ck.path}: no quantized layers to export")
    first = next(iter(layers.values()))
    bits, sym = first.bits, first.sym
    checkpoint_format = checkpoint_format or ("gptq" if sym else "gptq_v2")
    cfg = ck.meta.get("config", {})
    group_size = int(cfg.get("group_size", first.group_size))
    for name, p in layers.items():
        if (p.bits, p.sym) != (bits, sym):
            raise LowbitError(f"GPTQ export needs one bit width and grid for all layers; layer '{name}' "
                              f"is w{p.bits} {'sym' if p.sym else 'asym'}")
        _check_layer(name, p, group_size, checkpoint_format)
    desc_act = any(p.g_idx is not None and bool((p.g_idx[1:] < p.g_idx[:-1]).any()) for p in layers.values())

    state = fp16_state(ck, layers, lambda name, p: gptq_tensors(p, checkpoint_format))

    config = dict(ck.config)
    config["torch_dtype"] = config["dtype"] = "float16"
    config["quantization_config"] = {
        "quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": desc_act, "sym": sym,
        "true_sequential": True, "static_groups": bool(cfg.get("static_groups", False)) and not desc_act,
        "damp_percent": cfg.get("damp", 0.01), "checkpoint_format": checkpoint_format, "pack_dtype": "int32",
        "meta": {"quantizer": [f"lowbit:{__version__}"], "lowbit_method": ck.meta.get("method")},
    }
    with atomic_path(out, folder=True) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(dumps(config, indent=2, sort_keys=True) + "\n")
        for f in sorted(ck.path.iterdir()):
            if f.is_file() and f.name not in SKIP_FILES:
                shutil.copy2(f, tmp / f.name)
    out = Path(out)
    return {"out": str(out), "layers": len(layers), "bits": bits, "group_size": group_size, "sym": sym,
            "desc_act": desc_act, "checkpoint_format": checkpoint_format,
            "bytes": sum(f.stat().st_size for f in out.iterdir() if f.is_file())}
