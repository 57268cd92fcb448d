"""Inference kernels for packed weights, and the dispatcher ``matmul(packed, x)`` that picks one.

``matmul(packed, x)``: ``x`` (…, n) float, ``packed`` any packed weight with ``shape = (m, n)`` ->
``y = x Ŵᵀ`` (…, m) in ``x.dtype`` (no bias).  The dispatcher uses

* :mod:`.group_cpu` — compiled CPU kernel reading the canonical ``GroupQuantWeight`` layout
  (kind ``"int"``, 1–8 bits, any group size, partial last group, sym/asym, ``g_idx``);
* :mod:`.outliers` — GWQ's ``"int+outliers"``: the same kernel for the dense part + a CSR kernel for the outliers;
* :mod:`.quip_cpu` — QuIP#'s E8P/RVQ codes decoded on the fly (``"quip"``, codebook ``e8p``);
* :mod:`.mixed_cpu` — Squeeze10's mixed binary / high-bit cells (``"bin+int"``): bit-plane table lookups and
  the high cells' codes read on the fly, float activations (the same result under ``"auto"`` and ``"exact"``);
* :mod:`.reference` — ``x @ packed.dequantize(x.dtype).T`` for everything else: other formats
  (formats added later), CUDA tensors, inputs that need gradients,
  or when the fast kernel cannot be built (no C++ compiler); that fallback is announced once with
  :func:`warnings.warn`.

Backends (``LOWBIT_KERNELS=…`` or :func:`use_backend`; tests use it to compare paths on the same model):

* ``"auto"`` (default) — fast kernels; batch-1 decoding of 2/3/4/8-bit ``"int"`` weights rounds the activations to
  int8 blocks of 32 (64 for 2-bit) and uses integer dot products, as llama.cpp's Q8 activations do
  (relative output error ≈ 0.5 %); prefill (many tokens) is exact;
* ``"exact"`` — fast kernels, float activations everywhere (the result of ``"reference"`` up to fp32
  summation order);
* ``"reference"`` — the PyTorch reference for everything.
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings

import torch

from . import group_cpu, mixed_cpu, outliers, quip_cpu, reference

__all__ = ["matmul", "plan", "plan_key", "kernel_name", "use_backend", "backend", "warm_up"]

BACKENDS = ("auto", "exact", "reference")
_MODULES = {"group_cpu": group_cpu, "outliers": outliers, "quip_cpu": quip_cpu, "mixed_cpu": mixed_cpu}
_INT8_ACT = ("group_cpu", "outliers")  # kernels with an int8-activation decode path
_backend = os.environ.get("LOWBIT_KERNELS", "auto")
_warned: set[str] = set()


def backend() -> str:
    """The active backend: ``"auto"``, ``"exact"`` or ``"reference"`` (see the module doc)."""
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
    """Name of the kernel :func:`matmul` would use: a key of ``_MODULES`` or ``"reference"``."""
    x = torch.empty(0) if x is None else x
    if _backend == "reference" or (x.requires_grad and torch.is_grad_enabled()):
        return "reference"
    for name, mod in _MODULES.items():
        if not mod.supports(packed, x):
            continue
        if mod.available():  # compiles on the first call only
            return name
        _warn_once(name, f"lowbit: the fast CPU kernel ({name}) is unavailable, using the slower reference path "
                   f"({mod.unavailable_reason()})")
    return "reference"


def plan(packed, x: torch.Tensor):
    """The function ``x -> x Ŵᵀ`` :func:`matmul` would run for inputs like ``x`` (same dtype, device, grad
    needs) under the current backend, with its per-weight set-up done once; layers cache it."""
    name = kernel_name(packed, x)
    if name == "reference":
        return functools.partial(reference.matmul, packed)
    if name in _INT8_ACT:
        return _MODULES[name].plan(packed, int8_act=_backend == "auto")
    return _MODULES[name].plan(packed)


def plan_key(x: torch.Tensor) -> tuple:
    """What :func:`plan`'s choice depends on besides the weight: backend, dtype, device, autograd."""
    return _backend, x.dtype, x.device, x.requires_grad and torch.is_grad_enabled()


def matmul(packed, x: torch.Tensor) -> torch.Tensor:
    """``y = x Ŵᵀ`` with the fastest kernel available for ``packed``'s format (see module doc)."""
    return plan(packed, x)(x)


def warm_up() -> bool:
    """Build/load the compiled kernel now (not during the first timed forward); ``True`` if usable."""
    return _backend != "reference" and group_cpu.available()
