"""The packed-weight protocol, the table of formats, and the strict readers every format uses.

A packed weight is a frozen dataclass of plain tensors plus JSON-safe metadata.  Every format implements the
same small interface (:class:`PackedWeight`), so the checkpoint code, the inference module and the bit
accounting never branch on the method:

* ``kind``                          — the format's name in ``lowbit.json`` (a class attribute);
* ``shape``                         — ``(m, n)``, the float weight's (out, in) size;
* ``tensors() -> dict[str, Tensor]`` — what goes into safetensors (suffixes of the layer name);
* ``meta() -> dict``                — JSON-safe settings needed to read the tensors back (with ``"kind"``);
* ``from_tensors(tensors, meta)``   — the inverse (a classmethod), validating keys, dtypes and shapes;
* ``dequantize(dtype) -> Tensor``   — the float weight ``(m, n)`` (reference path);
* ``stored_bits()``                 — every bit stored for this weight: ``Σ 8·bytes`` over ``tensors()``
  (codes, scales, zeros, indices, signs; tables regenerated from their definition cost 0 bits).

Like llama.cpp's ``type_traits``, every format is one row of :data:`FORMATS` (``kind -> class``), added by the
:func:`register_format` decorator on its class; :func:`from_tensors` dispatches on ``meta["kind"]``.  The
format modules are imported by ``lowbit/packed/__init__.py``, so the table is complete as soon as any
``lowbit.packed`` module is.
"""
from __future__ import annotations

from typing import ClassVar

import torch


class FormatError(ValueError):
    """Packed tensors that do not match their metadata (wrong keys, dtypes or shapes)."""


class PackedWeight:
    """Base of every packed format (see the module docstring); subclasses are frozen dataclasses."""

    kind: ClassVar[str]
    shape: tuple[int, int]

    def tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def meta(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], meta: dict) -> "PackedWeight":
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def stored_bits(self) -> int:
        """Every stored bit: ``Σ numel·element_size·8`` over :meth:`tensors`."""
        return sum(t.numel() * t.element_size() * 8 for t in self.tensors().values())


FORMATS: dict[str, type[PackedWeight]] = {}


def register_format(cls: type[PackedWeight]) -> type[PackedWeight]:
    """Class decorator: add ``cls`` to :data:`FORMATS` under ``cls.kind`` (each kind once)."""
    if cls.kind in FORMATS and FORMATS[cls.kind] is not cls:
        raise ValueError(f"packed format kind {cls.kind!r} is registered twice")
    FORMATS[cls.kind] = cls
    return cls


def from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> PackedWeight:
    """Rebuild a packed weight of any registered format from its tensors and metadata."""
    kind = meta.get("kind") if isinstance(meta, dict) else None
    if not isinstance(kind, str) or kind not in FORMATS:  # (a list or dict from a damaged lowbit.json is unhashable)
        raise FormatError(f"unknown packed format {kind!r}")
    packed = FORMATS[kind].from_tensors(tensors, meta)
    extra = sorted(set(tensors) - set(packed.tensors()))
    if extra:  # a tensor the metadata does not account for (e.g. a g_idx with "g_idx": false) would be ignored
        raise FormatError(f"unexpected tensor '{extra[0]}' for a {kind} layer with this metadata")
    return packed


def expect(tensors: dict, key: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """``tensors[key]``, which must have exactly ``dtype`` and ``shape`` and, when floating point, finite values."""
    if key not in tensors:
        raise FormatError(f"missing tensor '{key}'")
    t = tensors[key]
    if t.dtype != dtype or tuple(t.shape) != tuple(shape):
        raise FormatError(f"tensor '{key}' is {t.dtype} {tuple(t.shape)}, expected {dtype} {tuple(shape)}")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise FormatError(f"tensor '{key}' holds NaN or infinite values")
    return t


_expect = expect  # the name the format modules used before lowbit.packed.base


# Layer metadata is read strictly: lowbit writes JSON integers, booleans and strings, so a float, a string of
# digits, or 1 for true is damage, not a value to coerce (``int("4")``, ``bool("false")`` would accept garbage).

def meta_int(meta: dict, key: str, lo: int = 1, hi: int | None = None) -> int:
    """``meta[key]``: an integer (not a bool) in ``lo..hi``."""
    v = meta.get(key)
    if type(v) is not int or v < lo or (hi is not None and v > hi):
        raise FormatError(f"layer metadata '{key}' must be an integer in {lo}..{'' if hi is None else hi}, got {v!r}")
    return v


def meta_bool(meta: dict, key: str, default: bool | None = None) -> bool:
    """``meta[key]``: true or false (``default`` when absent, if given)."""
    v = meta.get(key, default)
    if not isinstance(v, bool):
        raise FormatError(f"layer metadata '{key}' must be true or false, got {v!r}")
    return v


def meta_str(meta: dict, key: str, choices: tuple[str, ...]) -> str:
    """``meta[key]``: one of ``choices``."""
    v = meta.get(key)
    if not isinstance(v, str) or v not in choices:
        raise FormatError(f"layer metadata '{key}' must be one of {', '.join(choices)}, got {v!r}")
    return v


def meta_shape(meta: dict) -> tuple[int, int]:
    """``meta["shape"]``: ``[m, n]``, two positive integers."""
    v = meta.get("shape")
    if not isinstance(v, list) or len(v) != 2 or any(type(d) is not int or d < 1 for d in v):
        raise FormatError(f"layer metadata 'shape' must be [rows, columns] of positive integers, got {v!r}")
    return v[0], v[1]
