"""The dispatcher: which kernel computes ``y = x Ŵᵀ`` for a packed weight, and the backends.

``KERNELS`` is the one table of kernels (compiled C++, or torch's own CUDA op), in the order they are asked.
Each module in it has ``supports(packed, x)`` (format, every tensor's dtype/device/shape — see :mod:`.checks`),
``available()`` (builds on first use), ``unavailable_reason()``, ``describe()`` (the paths compiled in) and
``plan(packed)``.
A weight no kernel supports, or whose kernel could not be built, takes :mod:`.reference`.
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
import warnings
from typing import NamedTuple

import torch

from . import feedback_cpu, group_cpu, int4_torch, mixed_cpu, outliers, quip_cpu, reference

BACKENDS = ("auto", "exact", "reference")
KERNELS = {"group_cpu": group_cpu, "outliers": outliers, "quip_cpu": quip_cpu, "mixed_cpu": mixed_cpu,
           "int4_torch": int4_torch}
SOLVER_KERNELS = {"feedback_cpu": feedback_cpu}  # quantization-time loops (lowbit.solvers.feedback), not matmuls
_INT8_ACT = ("group_cpu", "outliers")  # kernels with an int8-activation decode path
_BF16_MATH = ("int4_torch",)  # kernels computing in bf16 (inputs cast): under "exact" for bf16 inputs only
_backend = os.environ.get("LOWBIT_KERNELS", "auto")
_warned: set[str] = set()


def backend() -> str:
    """The active backend: ``"auto"``, ``"exact"`` or ``"reference"`` (see :mod:`lowbit.kernels`)."""
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
    """Name of the kernel :func:`matmul` would use: a key of ``KERNELS`` or ``"reference"``.  ``x`` defaults to
    one fp32 CPU token."""
    x = torch.empty(1, packed.shape[1]) if x is None else x
    if _backend == "reference" or (x.requires_grad and torch.is_grad_enabled()):
        return "reference"
    for name, mod in KERNELS.items():
        if not mod.supports(packed, x) or (name in _BF16_MATH and _backend == "exact" and x.dtype != torch.bfloat16):
            continue
        if mod.available():  # compiles on the first call only
            return name
        _warn_once(name, f"lowbit: the fast kernel ({name}) is unavailable, using the slower reference path "
                   f"({mod.unavailable_reason()})")
    return "reference"


def plan(packed, x: torch.Tensor):
    """The function ``x -> x Ŵᵀ`` :func:`matmul` would run for inputs like ``x`` (same :func:`plan_key`) under the
    current backend, with its per-weight set-up done once; layers cache it."""
    name = kernel_name(packed, x)
    if name == "reference":
        return functools.partial(reference.matmul, packed)
    if name in _INT8_ACT:
        return KERNELS[name].plan(packed, int8_act=_backend == "auto")
    return KERNELS[name].plan(packed)


def plan_key(x: torch.Tensor) -> tuple:
    """What :func:`plan`'s choice depends on besides the weight: backend, dtype, device, autograd, width (an input
    of the wrong width gets the reference path, which raises, instead of a kernel reading past its rows)."""
    return _backend, x.dtype, x.device, x.requires_grad and torch.is_grad_enabled(), x.shape[-1] if x.dim() else 0


def matmul(packed, x: torch.Tensor) -> torch.Tensor:
    """``y = x Ŵᵀ`` with the fastest kernel available for ``packed``'s format (see :mod:`lowbit.kernels`)."""
    return plan(packed, x)(x)


class KernelStatus(NamedTuple):
    """One row of :func:`warm_up`: the kernel, whether :func:`matmul` can use it, and why (not)."""
    name: str
    available: bool
    reason: str  # available: the paths compiled in; else why not (no compiler, unsupported CPU, build error…)


def warm_up() -> list[KernelStatus]:
    """Build (or load from the cache) every kernel now, not during the first timed forward, and say which are
    available and why not.  Under the ``"reference"`` backend nothing is built."""
    if _backend == "reference":
        why = "the reference backend is selected (LOWBIT_KERNELS=reference or use_backend)"
        return [KernelStatus(name, False, why) for name in {**KERNELS, **SOLVER_KERNELS}]
    return [KernelStatus(name, True, mod.describe()) if mod.available()
            else KernelStatus(name, False, mod.unavailable_reason() or "unavailable")
            for name, mod in {**KERNELS, **SOLVER_KERNELS}.items()]


def status_table(rows: list[KernelStatus]) -> str:
    """The rows as text, one line per kernel: name, ``yes``/``no``, reason."""
    w = max(len("kernel"), *(len(r.name) for r in rows))
    lines = [f"{'kernel':<{w}}  available  reason"]
    lines += [f"{r.name:<{w}}  {'yes' if r.available else 'no':<9}  {r.reason}" for r in rows]
    return "\n".join(lines)


def main() -> int:
    """``python -m lowbit.kernels`` / ``lowbit kernels``: build every kernel and print the table."""
    from .build import build_dir

    print(status_table(warm_up()))
    print(f"(backend {_backend!r}; cache {build_dir()})", file=sys.stderr)
    return 0
