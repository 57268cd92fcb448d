"""Strict JSON: the one writer of every JSON file, line and metadata string lowbit produces.

Standard JSON (RFC 8259) has no NaN or Infinity; Python's ``json`` writes them as bare ``NaN`` /
``Infinity``, which strict parsers reject.  So:

* NaN is lowbit's in-memory mark for "not measured" (RTN's proxy loss without a Hessian, a loss
  skipped for speed) and :func:`dumps` writes it as ``null``;
* an infinite number has no such meaning: :func:`dumps` refuses it (:class:`LowbitError` naming the key);
* a metric where NaN or ∞ would mean a broken model (a perplexity, an NLL) is checked where it is
  computed, with :func:`finite`, and so never reaches the writer;
* every float command-line flag is parsed by :func:`finite_float`, so ``--temperature nan`` is refused
  before anything runs.

Files are written with :func:`lowbit.outputs.write_texts` (checked first, complete or absent).
"""
from __future__ import annotations

import argparse
import json
import math
import os

from .errors import LowbitError


def strict(obj, path: str = ""):
    """``obj`` with every NaN float replaced by ``None``; an infinite float raises :class:`LowbitError`."""
    if isinstance(obj, float):
        if math.isnan(obj):
            return None
        if math.isinf(obj):
            raise LowbitError(f"cannot write '{path or 'value'}' = {obj}: JSON has no infinity")
        return obj
    if isinstance(obj, dict):
        return {k: strict(v, f"{path}.{k}" if path else str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v, f"{path}[{i}]") for i, v in enumerate(obj)]
    return obj


def dumps(obj, **kwargs) -> str:
    """``json.dumps`` of :func:`strict` ``(obj)`` with ``allow_nan=False``: the text always parses strictly."""
    return json.dumps(strict(obj), allow_nan=False, **kwargs)


def write_json(path: str | os.PathLike, obj, flag: str = "--json", force: bool = False) -> None:
    """Write ``obj`` to ``path`` (indented, trailing newline), atomically; see :func:`lowbit.outputs.write_texts`."""
    from .outputs import write_texts

    write_texts([(path, dumps(obj, indent=1) + "\n", flag)], force=force)


def finite(value: float, what: str) -> float:
    """``value`` if it is a finite number, else :class:`LowbitError`: ``what`` is broken (e.g. a NaN perplexity)."""
    if not math.isfinite(value):
        raise LowbitError(f"{what} is {value}: the model's outputs are not finite numbers (broken weights?)")
    return value


def finite_float(s: str) -> float:
    """The argparse ``type=`` of every float flag: a finite number (``nan``, ``inf`` are refused)."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {s!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {s!r}")
    return v
