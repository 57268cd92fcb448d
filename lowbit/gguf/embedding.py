"""Which GGUF type the token embedding (``token_embd``) and the output head (``output``) get (``--embedding-type``).

``--embedding-type`` values (:func:`check_option` canonicalizes them):

* a GGUF type (``Q8_0``, ``Q6_K``…): the embedding table, and the output head when it is a separate tensor,
  are rounded to that type (RTN, as llama-quantize without an importance matrix);
* ``auto``: what llama-quantize gives ``token_embd`` / ``output`` for the ``--gguf-type`` file type, from
  ``llama_tensor_get_type_impl`` (:func:`lowbit.gguf.presets.preset_type`, categories ``TOKEN_EMBD`` /
  ``OUTPUT``).  A plain type name means llama-quantize's file type of that name *without* ``--pure``
  (``Q4_0`` → ``MOSTLY_Q4_0``; ``Q4_K`` → ``Q4_K_M``, its alias in ``tools/quantize``).  llama.cpp gives the
  output head ``Q6_K`` (``Q8_0`` when the file's default type's block does not divide the row or the file is
  Q8_0; ``Q5_K`` for the IQ2/IQ3_XXS files); a *tied* embedding is that head, so it gets the head's type; an
  untied embedding keeps the default type (``Q2_K`` / ``IQ3_S`` for the IQ2/IQ3_XXS files).  ``auto`` is the
  default whenever ``--gguf-type`` is a preset (unless ``--head-bits`` is given), since a preset is a
  whole-file recipe, the embedding and head included;
* ``F16``: keep them float (stored in the model's dtype, exported as F16) — the default otherwise.

Every answer then takes llama.cpp's row-length fallback (:func:`lowbit.gguf.types.resolve`): SmolLM2's
576-wide table asked as ``Q6_K`` becomes ``Q8_0``.
"""
from __future__ import annotations

from ..errors import LowbitError
from .presets import DEFAULT, canonical, is_preset, preset_type
from .types import QUANT_TYPES, resolve

ROLES = ("token_embd", "output")


def check_option(grid) -> str | None:
    """The canonical ``embedding_type`` of a :class:`lowbit.config.GridConfig` (``auto`` filled in for a preset)."""
    et, gguf_type = grid.embedding_type, grid.gguf_type
    if et is None:
        return "auto" if gguf_type is not None and is_preset(gguf_type) and not grid.head_bits else None
    up = str(et).strip().upper()
    if grid.head_bits and up != "F16":
        raise LowbitError(f"--embedding-type {et} and --head-bits both set the output head: use one")
    if up == "AUTO":
        if gguf_type is None:
            raise LowbitError("--embedding-type auto means llama-quantize's choice for the --gguf-type: give "
                              "--gguf-type too, or a type name")
        return "auto"
    if up == "F16" or up in QUANT_TYPES:
        return up
    raise LowbitError(f"--embedding-type {et}: choose auto, F16 or one of {', '.join(QUANT_TYPES)}")


def file_type(gguf_type: str) -> str:
    """llama-quantize's file type (a :data:`~.presets.DEFAULT` key) for a ``--gguf-type`` (type or preset)."""
    name = canonical(gguf_type)
    if is_preset(name):
        return name
    for ft in (f"MOSTLY_{name}", f"{name}_M"):
        if ft in DEFAULT:
            return ft
    raise LowbitError(f"--gguf-type {gguf_type}: llama-quantize has no file type of this name")  # (every type has)


def head_type(head_bits: int) -> str:
    """The GGUF type a ``--head-bits`` head (symmetric, groups of 32) exports as, losslessly."""
    return "Q4_0" if head_bits <= 4 else "Q5_0" if head_bits == 5 else "Q8_0"


def wanted_type(cfg, role: str, shape: tuple[int, int], n_layers: int, tied: bool = True) -> str:
    """The type asked for ``role`` before the row-length fallback (``F16``: not quantized)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if cfg.head_bits:  # the int-grid head of lowbit.models.head; the embedding keeps its float table
        return head_type(cfg.head_bits) if role == "output" else "F16"
    et = cfg.embedding_type
    if et in (None, "F16"):
        return "F16"
    if et != "auto":
        return et
    name = "output" if role == "output" and not tied else "token_embd"
    return preset_type(file_type(cfg.gguf_type), name, None, n_layers, tuple(shape), imatrix=False, tied=tied)


def resolve_role(cfg, role: str, shape: tuple[int, int], n_layers: int, tied: bool = True) -> tuple[str, str | None]:
    """``(type name, why it fell back or None)``: the type ``role`` is stored and written as."""
    t = wanted_type(cfg, role, shape, n_layers, tied)
    if t == "F16":
        return t, None
    got, why = resolve(t, int(shape[1]))
    return got.name, why


def tensor_type(cfg, role: str, shape: tuple[int, int], n_layers: int, tied: bool = True) -> str:
    """The GGUF type name (``"F16"`` when not quantized) that ``role`` (``"token_embd"`` or ``"output"``, weight
    ``shape`` = (rows, row length)) is written as for the :class:`lowbit.config.QuantConfig` ``cfg`` in a model of
    ``n_layers`` blocks.  ``tied``: the embedding is also the output head — one tensor, ``token_embd``, with the
    head's type (ask for ``"token_embd"`` only: a tied model has no ``output`` tensor; asking ``"output"`` gives
    the same answer).  Untied: ask for each role with ``tied=False``."""
    return resolve_role(cfg, role, shape, n_layers, tied)[0]
