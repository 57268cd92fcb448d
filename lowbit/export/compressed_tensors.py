"""Export a lowbit checkpoint as a compressed-tensors checkpoint (``pack-quantized``), the layout
vLLM and llm-compressor use, written through the ``compressed-tensors`` library itself.

A lowbit layer ``Ŵ[i, j] = s[i, g(j)]·(q[i, j] − z[i, g(j)])`` (``q, z`` in ``[0, 2^b)``) is
compressed-tensors' signed grid ``Ŵ = s·(q' − z')`` with ``q' = q − 2^(b−1)`` and
``z' = z − 2^(b−1)`` in ``[−2^(b−1), 2^(b−1))``: the same products, so the export is exact.  The
library's :class:`PackedQuantizationCompressor` is handed the dequantized weight (fp32, exact:
an fp16 scale times a small integer), ``weight_scale`` (m, G) and, for asymmetric grids,
``weight_zero_point`` (m, G) int8; it re-quantizes (``round(Ŵ/s) + z'``, exact) and writes::

    <layer>.weight_packed      int32 (m, n·b/32)   q' + 2^(b−1), 32 codes in b words along the input axis
    <layer>.weight_scale       fp16  (m, G)
    <layer>.weight_zero_point  int32 (m·b/32, G)   asymmetric only, z' packed along the output axis
    <layer>.weight_shape       int64 (2,)

Each layer is decompressed again by the library before anything is written and must give back
lowbit's weights bit for bit.  ``config.json`` gets the ``quantization_config`` the library's
:class:`ModelCompressor` writes (``quant_method: compressed-tensors``, ``format: pack-quantized``,
one config group per grid, the unquantized linears in ``ignore``).

These are the tensors vLLM's ``CompressedTensorsWNA16.create_weights`` allocates (``weight_packed`` packed
along dim 1, ``weight_scale`` in the model dtype, ``weight_zero_point`` int32 packed along dim 0) and what
compressed-tensors' own ``decompress`` unpacks.  transformers 5.24 loads the symmetric checkpoints with its
defaults; the asymmetric ones only with ``CompressedTensorsConfig(dequantize=True)``, because
compressed-tensors 0.20.1 gives the zero point its unpacked ``(m, G)`` shape on the meta device
(``pack_quantized/base.py:83-91``; see :mod:`lowbit.export.check`).  Not run here: vLLM itself (no GPU);
its Marlin kernels take group sizes 32/64/128 or per-row, and recent versions zero points only at 4 bits.

Refused (one line naming the layer and the reason): bit widths other than 4 and 8 (vLLM's WNA16
scheme has kernels for those only), partial last groups (the library needs ``G | n``) and
act-order ``g_idx`` without static groups (compressed-tensors removed ``actorder: group``).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ..errors import LowbitError
from ..packed.qweight import GroupQuantWeight
from .common import atomic_path, fp16_state, read_checkpoint

CT_BITS = (4, 8)  # vLLM's CompressedTensorsWNA16: uint4b8/uint8b128, with zero points uint4/uint8
SKIP_FILES = {"lowbit.json", "model.safetensors", "config.json"}


def _import():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise LowbitError("--format compressed-tensors needs the 'compressed-tensors' package "
                          "(pip install 'lowbit[interop]')") from None


def grid_key(name: str, p: GroupQuantWeight) -> tuple:
    """``(bits, sym, group_size or -1 per row)`` of one layer; refusals as LowbitError."""
    m, n = p.shape
    if p.bits not in CT_BITS:
        raise LowbitError(f"compressed-tensors export supports {'/'.join(map(str, CT_BITS))} bits (vLLM's WNA16 "
                          f"kernels); layer '{name}' has {p.bits}")
    if n % p.group_size:
        raise LowbitError(f"compressed-tensors export needs the group size to divide the input size; layer "
                          f"'{name}' has {n} inputs and group size {p.group_size} (a partial last group)")
    if p.g_idx is not None and not torch.equal(p.column_groups(), torch.arange(n) // p.group_size):
        raise LowbitError(f"layer '{name}' has act-order groups in permuted order (g_idx), which compressed-tensors "
                          f"cannot store (it removed actorder 'group'); quantize with static groups")
    return p.bits, p.sym, (-1 if p.group_size >= n else p.group_size)


def scheme(key: tuple, targets: list[str]):
    """The compressed-tensors :class:`QuantizationScheme` of one grid ``key`` (see :func:`grid_key`)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    bits, sym, group_size = key
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym,
                            strategy="channel" if group_size == -1 else "group",
                            group_size=None if group_size == -1 else group_size)
    return QuantizationScheme(targets=targets, weights=args, format="pack-quantized")


def compress_layer(p: GroupQuantWeight, sch) -> dict[str, torch.Tensor]:
    """The compressed tensors of one layer (local names), checked to decompress to ``p.dequantize()``."""
    from compressed_tensors.compressors import PackedQuantizationCompressor

    w = p.dequantize().float()                                        # (m, n), exact products
    half = 1 << (p.bits - 1)
    state = {"weight": w, "weight_scale": p.scales.float()}           # (m, G)
    if not p.sym:
        state["weight_zero_point"] = (p.zeros().round() - half).to(torch.int8)  # (m, G) in [−2^(b−1), 2^(b−1))
    out = PackedQuantizationCompressor.compress(state, sch)
    out["weight_scale"] = p.scales.to(torch.float16).contiguous()
    back = PackedQuantizationCompressor.decompress({**out, "weight_scale": p.scales.float()}, sch)["weight"]
    if not torch.equal(back.float(), w):
        raise LowbitError(f"compressed-tensors did not reproduce a layer exactly (max error "
                          f"{float((back.float() - w).abs().max()):.3g}); not writing a wrong checkpoint")
    return {k: v.contiguous() for k, v in out.items()}


def export_compressed_tensors(model_dir: str | os.PathLike, out: str | os.PathLike) -> dict:
    """Write the compressed-tensors folder ``out`` (atomically) from the lowbit checkpoint ``model_dir``.

    Returns ``{"out", "layers", "groups": [{"bits", "sym", "group_size", "layers"}], "bytes"}``."""
    _import()
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus
    from safetensors.torch import save_file

    from ..jsonio import dumps

    ck = read_checkpoint(model_dir)
    layers = ck.int_layers("compressed-tensors export")
    if not layers:
        raise LowbitError(f"{ck.path}: no quantized layers to export")
    keys = {name: grid_key(name, p) for name, p in layers.items()}
    by_key: dict[tuple, list[str]] = {}
    for name, k in keys.items():
        by_key.setdefault(k, []).append(name)
    # one grid: target every Linear, ignore the float ones; several: name each layer
    linears = [n for n in ck.others if n.endswith(".weight") and ck.others[n].dim() == 2
               and not n.rsplit(".", 2)[-2].startswith(("embed", "wte", "wpe", "tok_embeddings"))]
    ignore = sorted(({n[: -len(".weight")] for n in linears} | {"lm_head"}) - set(layers))  # a tied head too
    schemes = {k: scheme(k, ["Linear"] if len(by_key) == 1 else names) for k, names in by_key.items()}
    qconfig = QuantizationConfig(config_groups={f"group_{i}": s for i, s in enumerate(schemes.values())},
                                 format="pack-quantized", quantization_status=QuantizationStatus.COMPRESSED,
                                 ignore=ignore)

    state = fp16_state(ck, layers, lambda name, p: compress_layer(p, schemes[keys[name]]))

    config = dict(ck.config)
    config["torch_dtype"] = config["dtype"] = "float16"
    config.pop("quantization_config", None)
    with atomic_path(out, folder=True) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(dumps(config, indent=2, sort_keys=True) + "\n")
        ModelCompressor(quantization_config=qconfig).update_config(str(tmp))
        for f in sorted(ck.path.iterdir()):
            if f.is_file() and f.name not in SKIP_FILES:
                shutil.copy2(f, tmp / f.name)
    out = Path(out)
    groups = [{"bits": k[0], "sym": k[1], "group_size": k[2], "layers": len(v)} for k, v in by_key.items()]
    return {"out": str(out), "layers": len(layers), "groups": groups,
            "bytes": sum(f.stat().st_size for f in out.iterdir() if f.is_file())}
