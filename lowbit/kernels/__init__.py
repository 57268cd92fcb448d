"""Inference kernels for packed weights, and the dispatcher ``matmul(packed, x)`` that picks one.

``matmul(packed, x)``: ``x`` (…, n) float, ``packed`` any packed weight with ``shape = (m, n)`` ->
``y = x Ŵᵀ`` (…, m) in ``x.dtype`` (no bias).  The dispatcher uses

* :mod:`.group_cpu` — compiled CPU kernel reading the canonical ``GroupQuantWeight`` layout
  (kind ``"int"``, 1–8 bits, any group size, partial last group, sym/asym, ``g_idx``);
* :mod:`.reference` — ``x @ packed.dequantize(x.dtype).T`` for everything else: other formats
  (``"int+outliers"``, ``"bin+int"``, formats added later), CUDA tensors, inputs that need gradients,
  or when the fast kernel cannot be built (no C++ compiler); that fallback is announced once with
  :func:`warnings.warn`.

The backend is ``"auto"`` unless ``LOWBIT_KERNELS=reference`` is set or :func:`use_backend` says
otherwise (tests use it to compare the two paths on the same model).
"""
from __future__ import annotations

import contextlib
import os
import warnings

import torch

from . import group_cpu, reference

__all__ = ["matmul", "kernel_name", "use_backend", "backend", "warm_up"]

BACKENDS = ("auto", "reference")
_backend = os.environ.get("LOWBIT_KERNELS", "auto")
_warned: set[str] = set()


def backend() -> str:
    """The active backend: ``"auto"`` (fast kernels where available) or ``"reference"``."""
    return _backend


@contextlib.contextmanager
def use_backend(name: str):
    """``with use_backend("reference"): …`` — temporarily force a backend."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r} (use one of {', '.join(BACKENDS)})")
    old, _backend = _backend, name
    try:
        yield
    finally:
        _backend = old


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def kernel_name(packed, x: torch.Tensor | None = None) -> str:
    """Name of the kernel :func:`matmul` would use: ``"group_cpu"`` or ``"reference"``."""
    x = torch.empty(0) if x is None else x
    if _backend == "reference" or (x.requires_grad and torch.is_grad_enabled()):
        return "reference"
    if group_cpu.supports(packed, x):
        if group_cpu.available():  # compiles on the first call only
            return "group_cpu"
        _warn_once("group_cpu", "lowbit: the fast CPU kernel is unavailable, using the slower reference path "
                   f"({group_cpu.unavailable_reason()})")
    return "reference"


def matmul(packed, x: torch.Tensor) -> torch.Tensor:
    """``y = x Ŵᵀ`` with the fastest kernel available for ``packed``'s format (see module doc)."""
    if kernel_name(packed, x) == "group_cpu":
        return group_cpu.matmul(packed, x)
    return reference.matmul(packed, x)


def warm_up() -> bool:
    """Build/load the compiled kernel now (not during the first timed forward); ``True`` if usable."""
    return _backend != "reference" and group_cpu.available()
