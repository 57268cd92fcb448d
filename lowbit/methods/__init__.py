"""The quantization methods: one file per method, each ending with ``register(MethodSpec(...))``.

Importing this package imports every module in it (:mod:`pkgutil`), so a new method file registers itself
with no other edit; :data:`REGISTRY` maps ``--method`` names to their :class:`~lowbit.methods.base.MethodSpec`
(ordered by ``MethodSpec.order``, then name) and :func:`get` looks one up.
"""
from __future__ import annotations

import importlib
import pkgutil

from ..errors import LowbitError
from .base import REGISTRY, MethodSpec, RunContext, register  # noqa: F401

for _mod in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _mod != "base" and not _mod.startswith("_"):
        importlib.import_module(f"{__name__}.{_mod}")
_ordered = sorted(REGISTRY.values(), key=lambda m: (m.order, m.name))
REGISTRY.clear()
REGISTRY.update((m.name, m) for m in _ordered)


def get(name) -> MethodSpec:
    """The method registered as ``name`` (a str or a :class:`lowbit.config.Method`); an unknown name is a
    :class:`LowbitError` that lists the choices."""
    key = str(getattr(name, "value", name))
    try:
        return REGISTRY[key]
    except KeyError:
        raise LowbitError(f"--method: unknown method {key!r} (choose from {', '.join(REGISTRY)})") from None
