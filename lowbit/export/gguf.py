"""Export a lowbit checkpoint as one GGUF file (llama.cpp's format), quantized layers kept lossless.

**Lossless re-encoding.**  A lowbit layer ``Ŵ[i, j] = s[i, g(j)]·(q[i, j] − z[i, g(j)])`` becomes GGUF
blocks of 32 consecutive inputs of one row when every aligned 32-column block lies in one group
(group size a multiple of 32, or per-row, with 32 | n; a ``g_idx`` is accepted when constant on
each block).  Block layouts (``d``, ``m`` fp16; 4-bit ``qs`` byte k = u[k] | u[k+16] << 4; ``qh``
a little-endian uint32 whose bit k is bit 4 of u[k]):

* ``Q4_0`` [d, qs]      ``w = d·(u − 8)``   u = q − z + 8    lowbit w2–4 sym (z = 2^(b−1))
* ``Q5_0`` [d, qh, qs]  ``w = d·(u − 16)``  u = q − z + 16   lowbit w5 sym
* ``Q8_0`` [d, int8 u]  ``w = d·u``         u = q − z        lowbit w6–8 sym, w6–7 asym (|q − z| ≤ 127)
* ``Q4_1`` [d, m, qs]   ``w = d·u + m``     u = q, m = fp16(−d·z)   lowbit w2–4 asym
* ``Q5_1`` [d, m, qh, qs]                   u = q, m = fp16(−d·z)   lowbit w5 asym

with ``d = s`` (lowbit scales are fp16 already).  The offset types are bit-exact: ``d·(u − o)`` and
``s·(q − z)`` are the same fp16 × small-integer product, exact in fp32.  ``Q4_1``/``Q5_1`` round
``m = −d·z`` to fp16: ``|d·z| < 2^(e+1)`` with 11 significant bits, so the error is at most
``ulp16(d·z)/2 ≤ d·z·2^−11 ≤ d·(2^b − 1)·2^−11`` — below 0.75 % of one grid step ``d`` for 4 bits
(1.5 % for 5 bits), in absolute terms ≤ 2^−11 of the group's largest |w| for 4 bits.

**GGUF-native layers** (packed kind ``gguf``, from ``lowbit quantize --gguf-type TYPE``: every type of
:data:`lowbit.gguf.TYPES`, K-quants and IQ4_NL included) already hold llama.cpp's block bytes and are
written unchanged — so is a GGUF token embedding (``--embedding-type``, ``lowbit.json`` role ``token_embd``)
as ``token_embd`` and an untied GGUF head as ``output``; a tied one is ``token_embd`` alone, as llama.cpp
writes it (llama.cpp uses it as the head when ``output`` is absent).

Anything else (other group sizes, act-order ``g_idx`` with mixed groups in a block, w8 asym, GWQ
outliers, Squeeze10 cells) is refused, or with ``requantize=TYPE`` only those layers are
dequantized and re-quantized by ``gguf.quants.quantize`` (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, F16, F32).

**Layout.**  Tensor names follow llama.cpp (``token_embd``, ``blk.N.attn_q`` …, ``output_norm``,
``output`` when untied) via ``gguf.get_tensor_name_map``.  Gemma3 (``gemma3_text``): llama.cpp's RMS norm
multiplies by its weight, Gemma's by ``1 + w``, so every ``*norm.weight`` is written as ``1 + w`` (as
``convert_hf_to_gguf`` does; transformers' GGUF loader subtracts the 1 again); the ``√hidden`` embedding
scale is applied by both runtimes, so the table is written as stored.  For llama-arch models the rows of
``attn_q``/``attn_k`` (weights and biases) are permuted as llama.cpp's converter does,
``w.reshape(h, 2, rows/h/2, …).swapaxes(1, 2)`` (``h`` = heads, kv heads for K), which transformers'
GGUF loader inverts.  1-D tensors (norms, biases) are F32, 2-D unquantized tensors F16 or F32.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ..errors import LowbitError
from ..gguf import TYPES
from ..packed.qweight import GroupQuantWeight
from .common import atomic_path, read_checkpoint
from .gguf_meta import ARCHS, NORM_PLUS_ONE, add_model_metadata, add_tokenizer, check_arch

OFFSET_TYPES = {"Q4_0": (8, 0, 15), "Q5_0": (16, 0, 31), "Q8_0": (0, -128, 127)}  # offset o, u range
AFFINE_TYPES = {"Q4_1": 15, "Q5_1": 31}                                             # u = q in [0, max]
REQUANT_TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "F16", "F32")
LOSSLESS_RULE = ("w2-4 sym -> Q4_0, w2-4 asym -> Q4_1, w5 sym -> Q5_0, w5 asym -> Q5_1, "
                 "w6-8 sym and w6-7 asym -> Q8_0, with group size a multiple of 32 (or per-row) and 32 | inputs")


def lossless_type(p) -> str | None:
    """The GGUF type that stores packed weight ``p`` exactly, or None."""
    if not isinstance(p, GroupQuantWeight):
        return None
    m, n = p.shape
    if n % 32 or p.group_size % 32 and p.group_size != n:
        return None
    if p.g_idx is not None:
        g = p.g_idx.view(-1, 32)
        if not bool((g == g[:, :1]).all()):
            return None
    b, sym = p.bits, p.sym
    if b <= 4:
        return "Q4_0" if sym else "Q4_1"
    if b == 5:
        return "Q5_0" if sym else "Q5_1"
    if sym or b <= 7:
        return "Q8_0"
    return None


def encode_blocks(p: GroupQuantWeight, qtype: str) -> np.ndarray:
    """GGUF blocks of ``qtype`` holding ``p`` exactly (Q4_1/Q5_1: up to fp16 rounding of m): (m, n/32·bytes) uint8.

    Builds the type's fields (``d``, ``m``, codes) and writes them with its packer from :data:`lowbit.gguf.TYPES`."""
    m, n = p.shape
    nb = n // 32
    first = p.column_groups()[::32]                                    # group of each block (nb,)
    d = p.scales[:, first].float()                                     # (m, nb), fp16-exact
    z = p.zeros()[:, first].round().to(torch.int64)                     # (m, nb)
    q = p.codes().view(m, nb, 32)
    codec = TYPES[qtype].codec
    fields = {"d": d}
    if qtype in OFFSET_TYPES:
        off, lo, hi = OFFSET_TYPES[qtype]
        u = q - z[..., None] + off
        if int(u.min()) < lo or int(u.max()) > hi:
            raise LowbitError(f"internal: codes do not fit {qtype}")
        fields["codes"] = (u + codec.offset - off).reshape(m, n)       # Q8_0's codes are int8 + 128
    else:
        mins = (-(d * z.float())).half()
        if not bool(torch.isfinite(mins).all()):
            raise LowbitError(f"{qtype}: a block minimum −scale·zero overflows fp16")
        if int(q.max()) > AFFINE_TYPES[qtype]:
            raise LowbitError(f"internal: codes do not fit {qtype}")
        fields.update(m=mins.float(), codes=q.reshape(m, n))
    return np.ascontiguousarray(codec.pack(fields).numpy())


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's Q/K row order: ``w.reshape(h, 2, rows/h/2, …).swapaxes(1, 2)``, any trailing shape."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _float(t: torch.Tensor, dtype: str) -> np.ndarray:
    """1-D tensors (norms, biases) as float32; 2-D ones in ``dtype``."""
    if t.dim() <= 1 or dtype == "f32":
        return t.float().numpy()
    return t.to(torch.float16).numpy()


def export_gguf(model_dir: str | os.PathLike, out: str | os.PathLike, requantize: str | None = None,
                dtype: str = "f16") -> dict:
    """Write ``out`` (one .gguf, atomically) from the lowbit checkpoint ``model_dir``.

    ``requantize``: GGUF type for layers that cannot be stored losslessly (default: refuse them).
    ``dtype``: ``f16`` or ``f32`` for 2-D unquantized tensors (embeddings, untied head); 1-D are F32.
    Returns ``{"out", "bytes", "types": {type: count}, "lossless": n, "requantized": n}``."""
    import gguf

    types = gguf.GGMLQuantizationType
    if requantize is not None and requantize.upper() not in REQUANT_TYPES:
        raise LowbitError(f"--requantize must be one of {', '.join(REQUANT_TYPES)}, got {requantize!r}")
    if dtype not in ("f16", "f32"):
        raise LowbitError(f"--dtype must be f16 or f32, got {dtype!r}")
    ck = read_checkpoint(model_dir)
    model_type = check_arch(ck)
    arch, permute = ARCHS[model_type]
    plus_one = model_type in NORM_PLUS_ONE
    n_blocks = int(ck.config["num_hidden_layers"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_blocks)
    heads = int(ck.config["num_attention_heads"])
    kv_heads = int(ck.config.get("num_key_value_heads") or heads)

    plan = {}
    for name, p in ck.layers.items():
        qt = p.gguf_type if p.kind == "gguf" else lossless_type(p)
        if qt is None and requantize is None:
            desc = (f"w{p.bits} {'sym' if p.sym else 'asym'} group size {p.group_size}"
                    + (" with act-order g_idx" if getattr(p, "g_idx", None) is not None else "")
                    if isinstance(p, GroupQuantWeight) else f"format '{p.kind}'")
            raise LowbitError(f"layer '{name}' ({desc}) has no lossless GGUF type; exportable: {LOSSLESS_RULE}; "
                              f"or pass --requantize TYPE")
        plan[name] = (qt, False) if qt is not None else (requantize.upper(), True)

    def gguf_name(hf: str) -> str:
        g = names.get_name(hf, try_suffixes=(".weight", ".bias"))
        if g is None:
            raise LowbitError(f"{ck.path}: tensor '{hf}' has no GGUF name for architecture '{arch}'")
        return g

    def arrange(g: str, a: np.ndarray) -> np.ndarray:
        if permute and ".attn_q." in g:
            return permute_rows(a, heads)
        if permute and ".attn_k." in g:
            return permute_rows(a, kv_heads)
        return a

    tensors = []  # (gguf name, array, raw dtype or None)
    for name, p in ck.layers.items():
        qt, requant = plan[name]
        g = gguf_name(name + ".weight")
        if p.kind == "gguf":  # llama.cpp's blocks already: written unchanged
            blocks = p.blocks.numpy()
            tensors.append((g, arrange(g, blocks.view(np.float16) if qt == "F16" else blocks),
                            None if qt == "F16" else types[qt]))
        elif not requant:
            tensors.append((g, arrange(g, encode_blocks(p, qt)), types[qt]))
        else:
            w = arrange(g, p.dequantize(torch.float32).numpy())
            if qt not in ("F16", "F32") and w.shape[1] % 32:
                raise LowbitError(f"layer '{name}': {w.shape[1]} inputs is not a multiple of 32, cannot be {qt}")
            tensors.append((g, np.ascontiguousarray(gguf.quants.quantize(w, types[qt])),
                            None if qt in ("F16", "F32") else types[qt]))
        if name in ck.biases:
            gb = gguf_name(name + ".bias")
            tensors.append((gb, arrange(gb, ck.biases[name].float().numpy()), None))
    for hf, t in ck.others.items():
        if hf.endswith("rotary_emb.inv_freq"):
            continue
        g = gguf_name(hf)
        a = _float(t, dtype)
        if plus_one and hf.endswith("norm.weight"):  # Gemma's RMSNorm scales by (1 + w), llama.cpp's by w
            a = a + np.float32(1)
        tensors.append((g, arrange(g, a), None))

    counts = Counter(qt for qt, _ in plan.values())
    main_type = counts.most_common(1)[0][0] if counts else ("F16" if dtype == "f16" else "F32")
    file_type = {"Q4_0": "MOSTLY_Q4_0", "Q4_1": "MOSTLY_Q4_1", "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1",
                 "Q8_0": "MOSTLY_Q8_0", "F16": "MOSTLY_F16", "F32": "ALL_F32", "IQ4_NL": "MOSTLY_IQ4_NL",
                 "Q2_K": "MOSTLY_Q2_K", "Q3_K": "MOSTLY_Q3_K_S", "Q4_K": "MOSTLY_Q4_K_S", "Q5_K": "MOSTLY_Q5_K_S",
                 "Q6_K": "MOSTLY_Q6_K"}.get(main_type, f"MOSTLY_{main_type}")  # one K type: llama.cpp's _S name
    # (the I-quants are their own file types' names: MOSTLY_IQ2_XS, MOSTLY_IQ4_XS, ...)
    with atomic_path(out, folder=False) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        add_model_metadata(w, ck, arch, Path(out).stem)
        w.add_file_type(int(gguf.LlamaFileType[file_type]))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(w, ck)
        for g, a, raw in sorted(tensors, key=lambda x: _order(x[0])):
            w.add_tensor(g, a, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return {"out": str(out), "bytes": Path(out).stat().st_size, "types": dict(counts),
            "lossless": sum(not r for _, r in plan.values()), "requantized": sum(r for _, r in plan.values())}


def _order(name: str) -> tuple:
    """llama.cpp's usual order: token_embd, blocks in index order, then output_norm and output."""
    parts = name.split(".")
    if parts[0] == "blk":
        return (1, int(parts[1]), name)
    return (0 if parts[0] == "token_embd" else 2, 0, name)
