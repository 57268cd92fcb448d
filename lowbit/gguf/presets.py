"""llama.cpp's quantization presets (``llama-quantize``'s file types, ``LLAMA_FTYPE_MOSTLY_*``): which tensor gets
which GGUF type — re-implemented from the logic of ``llama_tensor_get_type_impl`` in ``src/llama-quant.cpp``
(llama.cpp as vendored in llama-cpp-python 0.3.36), for dense models (no experts, not Falcon, not 70B).

``preset_type(preset, name, layer, n_layers, shape, imatrix=…, n_gqa=…) -> type name``.  A preset has a
default type (:data:`DEFAULT`) and rules per tensor category (:data:`RULES`, data: ``(presets, category,
condition, type)``, the first that matches wins, as in llama.cpp's ``if/else`` chains).  Conditions see
``i`` (the layer), ``n`` (number of layers), ``gqa`` (``n_head / n_head_kv``) and ``imatrix`` (lowbit's GPTQ
and FOEM count as having one: the Hessian diagonal is what llama-imatrix measures).  The row-length fallback
(:func:`lowbit.gguf.types.resolve`) is applied afterwards by the caller, as llama.cpp does.

Names.  A GGUF type name (``Q4_K``, ``IQ2_XS``…) means that one type on every linear layer — llama-quantize's
``--pure``.  The preset names that are not also type names are used as they are (``Q4_K_M``, ``Q3_K_S``…);
the presets that share a type's name are spelled with llama.cpp's enum prefix: ``MOSTLY_Q2_K``,
``MOSTLY_IQ2_XS``, ``MOSTLY_IQ3_XXS``… (``mostly_q4_k_m`` is accepted as ``Q4_K_M`` too).

The token embedding and output head: :func:`preset_type` answers what llama.cpp would use for
``token_embd`` / ``output`` (category ``TOKEN_EMBD`` / ``OUTPUT``); ``--embedding-type auto`` (the default with
a preset) stores them so (:mod:`lowbit.gguf.embedding`), otherwise they stay float.
"""
from __future__ import annotations

import re

from ..errors import LowbitError
from .types import QUANT_TYPES, TYPES

DEFAULT = {  # llama_ftype_get_default_type
    "Q2_K_S": "Q2_K", "MOSTLY_Q2_K": "Q2_K", "IQ3_XS": "IQ3_S", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K",
    "Q3_K_L": "Q3_K", "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K",
    "MOSTLY_Q6_K": "Q6_K", "MOSTLY_IQ2_XXS": "IQ2_XXS", "MOSTLY_IQ2_XS": "IQ2_XS", "MOSTLY_IQ2_S": "IQ2_XS",
    "IQ2_M": "IQ2_S", "MOSTLY_IQ3_XXS": "IQ3_XXS", "MOSTLY_IQ4_NL": "IQ4_NL", "MOSTLY_IQ4_XS": "IQ4_XS",
    "MOSTLY_IQ3_S": "IQ3_S", "IQ3_M": "IQ3_S",
    "MOSTLY_Q4_0": "Q4_0", "MOSTLY_Q4_1": "Q4_1", "MOSTLY_Q5_0": "Q5_0", "MOSTLY_Q5_1": "Q5_1",
    "MOSTLY_Q8_0": "Q8_0",
}

IQ2_LOW = {"MOSTLY_IQ2_XXS", "MOSTLY_IQ2_XS", "MOSTLY_IQ2_S", "IQ2_M"}  # llama.cpp's IQ1/IQ2 branch (no IQ1 here)
IQ2_S_M = {"MOSTLY_IQ2_S", "IQ2_M"}


def more_bits(i: int, n: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the layers and every third one between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


_ALL = lambda **_: True  # noqa: E731

# (presets, category, condition(i, n, gqa, imatrix), type): first match in list order wins per category.
RULES: list[tuple[set[str], str, object, str]] = [
    # output head (and a tied embedding): llama.cpp keeps Q8_0 if already, else Q6_K; Q5_K for the IQ1/IQ2 presets
    ({"MOSTLY_IQ2_XXS", "MOSTLY_IQ2_XS", "MOSTLY_IQ3_XXS", "MOSTLY_IQ2_S", "IQ2_M"}, "OUTPUT", _ALL, "Q5_K"),
    ({"MOSTLY_Q8_0"}, "OUTPUT", _ALL, "Q8_0"),
    (set(DEFAULT), "OUTPUT", _ALL, "Q6_K"),
    ({"MOSTLY_IQ2_XXS", "MOSTLY_IQ2_XS"}, "TOKEN_EMBD", _ALL, "Q2_K"),
    ({"MOSTLY_IQ2_S", "IQ2_M", "MOSTLY_IQ3_XXS"}, "TOKEN_EMBD", _ALL, "IQ3_S"),
    # the IQ2 presets
    (IQ2_LOW, "ATTN_V", lambda gqa, **_: gqa >= 4, "Q4_K"),
    (IQ2_S_M, "ATTN_V", _ALL, "IQ3_S"),
    (IQ2_LOW, "ATTN_V", _ALL, "Q2_K"),
    (IQ2_S_M, "FFN_DOWN", lambda i, n, **_: i < n // 8, "IQ3_S"),
    (IQ2_LOW, "FFN_DOWN", lambda i, n, **_: i < n // 8, "Q2_K"),
    (IQ2_S_M, "ATTN_OUTPUT", _ALL, "IQ3_S"),
    # attn_v
    ({"MOSTLY_Q2_K"}, "ATTN_V", lambda gqa, **_: gqa >= 4, "Q4_K"),
    ({"MOSTLY_Q2_K"}, "ATTN_V", _ALL, "Q3_K"),
    ({"Q2_K_S"}, "ATTN_V", lambda gqa, **_: gqa >= 4, "Q4_K"),
    ({"MOSTLY_IQ3_XXS"}, "ATTN_V", lambda gqa, **_: gqa >= 4, "Q4_K"),
    ({"MOSTLY_IQ3_XXS"}, "ATTN_V", lambda imatrix, **_: not imatrix, "IQ3_S"),
    ({"IQ3_XS", "MOSTLY_IQ3_S"}, "ATTN_V", lambda gqa, **_: gqa >= 4, "Q4_K"),
    ({"IQ3_M"}, "ATTN_V", _ALL, "Q4_K"),
    ({"Q3_K_M"}, "ATTN_V", lambda i, **_: i < 2, "Q5_K"),
    ({"Q3_K_M"}, "ATTN_V", _ALL, "Q4_K"),
    ({"Q3_K_L"}, "ATTN_V", _ALL, "Q5_K"),
    ({"MOSTLY_IQ4_NL", "MOSTLY_IQ4_XS"}, "ATTN_V", lambda gqa, **_: gqa >= 4, "Q5_K"),
    ({"Q4_K_M", "Q5_K_M"}, "ATTN_V", lambda i, n, **_: more_bits(i, n), "Q6_K"),
    ({"Q4_K_S"}, "ATTN_V", lambda i, **_: i < 4, "Q5_K"),
    # attn_k / attn_q
    ({"IQ3_XS"}, "ATTN_K", _ALL, "IQ3_XXS"),
    ({"MOSTLY_IQ3_XXS"}, "ATTN_K", _ALL, "IQ2_S"),
    ({"IQ3_XS"}, "ATTN_Q", _ALL, "IQ3_XXS"),
    ({"MOSTLY_IQ3_XXS"}, "ATTN_Q", _ALL, "IQ2_S"),
    # ffn_down
    ({"MOSTLY_Q2_K"}, "FFN_DOWN", _ALL, "Q3_K"),
    ({"Q2_K_S"}, "FFN_DOWN", lambda i, n, **_: i < n // 8, "Q4_K"),
    ({"MOSTLY_IQ3_XXS"}, "FFN_DOWN", lambda i, n, imatrix, **_: not imatrix and i < n // 8, "Q4_K"),
    ({"MOSTLY_IQ3_XXS"}, "FFN_DOWN", lambda imatrix, **_: not imatrix, "Q3_K"),
    ({"Q3_K_M"}, "FFN_DOWN", lambda i, n, **_: i < n // 16, "Q5_K"),
    ({"Q3_K_M"}, "FFN_DOWN", _ALL, "Q4_K"),
    ({"IQ3_M"}, "FFN_DOWN", lambda i, n, **_: i < n // 8, "Q4_K"),
    ({"Q3_K_L"}, "FFN_DOWN", _ALL, "Q5_K"),
    ({"Q4_K_M", "Q5_K_M"}, "FFN_DOWN", lambda i, n, **_: more_bits(i, n), "Q6_K"),
    ({"MOSTLY_IQ4_NL", "MOSTLY_IQ4_XS"}, "FFN_DOWN", lambda i, n, imatrix, **_: not imatrix and i < n // 8, "Q5_K"),
    ({"Q4_K_S"}, "FFN_DOWN", lambda i, n, **_: i < n // 8, "Q5_K"),
    ({"MOSTLY_Q4_0"}, "FFN_DOWN", lambda i, n, imatrix, **_: imatrix and i < n // 8, "Q4_1"),
    ({"MOSTLY_Q5_0"}, "FFN_DOWN", lambda i, n, imatrix, **_: imatrix and i < n // 8, "Q5_1"),
    # attn_output
    ({"MOSTLY_Q2_K"}, "ATTN_OUTPUT", _ALL, "Q3_K"),
    ({"MOSTLY_IQ3_XXS"}, "ATTN_OUTPUT", _ALL, "IQ3_S"),
    ({"Q3_K_M", "IQ3_M"}, "ATTN_OUTPUT", _ALL, "Q4_K"),
    ({"Q3_K_L"}, "ATTN_OUTPUT", _ALL, "Q5_K"),
    # ffn_gate / ffn_up
    ({"IQ3_XS"}, "FFN_GATE", lambda i, n, **_: n // 8 <= i < 7 * n // 8, "IQ3_XXS"),
    ({"IQ3_XS"}, "FFN_UP", lambda i, n, **_: n // 8 <= i < 7 * n // 8, "IQ3_XXS"),
]
# the IQ2 presets' branch in llama.cpp is exclusive: their other categories (attn_k/q, ffn_gate/up) keep the default
_CATEGORY = [  # (pattern in a Hugging Face or GGUF tensor name, llama.cpp's tensor_category)
    (r"(^|\.)(lm_head|output)(\.weight)?$", "OUTPUT"), (r"(embed_tokens|token_embd)", "TOKEN_EMBD"),
    (r"(v_proj|attn_v)\b", "ATTN_V"), (r"(k_proj|attn_k)\b", "ATTN_K"), (r"(q_proj|attn_q)\b", "ATTN_Q"),
    (r"(o_proj|attn_output)\b", "ATTN_OUTPUT"), (r"(up_proj|ffn_up)\b", "FFN_UP"),
    (r"(gate_proj|ffn_gate)\b", "FFN_GATE"), (r"(down_proj|ffn_down)\b", "FFN_DOWN"),
]


def category(name: str) -> str:
    """llama.cpp's ``tensor_get_category`` for a Hugging Face (``model.layers.3.mlp.down_proj``) or GGUF name."""
    for pat, cat in _CATEGORY:
        if re.search(pat, name):
            return cat
    return "OTHER"


def layer_index(name: str) -> int | None:
    """The block index in ``model.layers.{i}.…`` / ``blk.{i}.…`` (None when the name has none)."""
    m = re.search(r"(?:layers|blk|h|blocks)\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def available() -> tuple[str, ...]:
    """The presets whose every type lowbit implements (the others wait for their types)."""
    return tuple(p for p in DEFAULT if all(t in TYPES for t in _types_of(p)))


def _types_of(preset: str) -> set[str]:
    return {DEFAULT[preset]} | {t for ps, cat, _, t in RULES if preset in ps and cat not in ("OUTPUT", "TOKEN_EMBD")}


def is_preset(name: str) -> bool:
    return name in DEFAULT


def canonical(name: str) -> str:
    """The canonical spelling of a ``--gguf-type``: a GGUF type name (one type everywhere) or a preset name,
    case-insensitive (``q4_k_m`` and ``mostly_q4_k_m`` -> ``Q4_K_M``; ``mostly_q2_k`` -> ``MOSTLY_Q2_K``, the
    preset, while ``q2_k`` is the type).  Raises :class:`LowbitError` naming the choices otherwise."""
    up = str(name).strip().upper()
    if up in QUANT_TYPES:
        return up
    if up.startswith("MOSTLY_") and up[7:] in DEFAULT:
        up = up[7:]
    if up in available():
        return up
    raise LowbitError(f"--gguf-type {name}: choose one of {', '.join(QUANT_TYPES)} "
                      f"(one type everywhere) or a llama.cpp preset {', '.join(available())}")


def preset_type(preset: str, name: str, layer: int | None, n_layers: int | None, shape: tuple[int, int],
                imatrix: bool = True, n_gqa: int | None = None, tied: bool = False) -> str:
    """The GGUF type llama.cpp's ``preset`` gives tensor ``name`` (weight ``shape`` = (out, in)) in block
    ``layer`` of ``n_layers`` (before the row-length fallback).  ``n_gqa`` (query heads per kv head) defaults
    to ``in // out`` of a ``v_proj`` (exact when ``n_head * head_dim == hidden``).  A name that is a plain type
    is returned as it is.  ``tied``: the embedding is also the output head (llama.cpp then gives it the head's type)."""
    preset = canonical(preset)
    if not is_preset(preset):
        return preset
    cat = category(name)
    if tied and cat == "TOKEN_EMBD":
        cat = "OUTPUT"
    i = layer if layer is not None else (layer_index(name) or 0)
    n = n_layers if n_layers is not None else i + 1
    gqa = n_gqa if n_gqa is not None else (max(1, shape[1] // max(1, shape[0])) if cat == "ATTN_V" else 1)
    if cat == "OUTPUT" and shape[1] % TYPES[DEFAULT[preset]].block:
        return "Q8_0"  # llama.cpp: an output head the default type's block does not divide gets Q8_0
    for ps, c, cond, t in RULES:
        if c == cat and preset in ps and cond(i=i, n=n, gqa=gqa, imatrix=imatrix):
            return t
    return DEFAULT[preset]
