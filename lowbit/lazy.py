"""Names a package exports but imports on first use (PEP 562), so ``lowbit --help``, argument errors and the
subcommand registry do not wait for torch.

    __getattr__, __dir__ = lazy(__name__, {"quantize": "api", ...}, __all__)
"""
from __future__ import annotations

import importlib
import sys


def lazy(package: str, table: dict[str, str], names) -> tuple:
    """The module-level ``(__getattr__, __dir__)`` of ``package``: ``table[name]`` is the submodule (relative to
    ``package``) holding ``name``; the value is cached in the package once read."""
    def __getattr__(name: str):
        if name in table:
            value = getattr(importlib.import_module(f".{table[name]}", package), name)
            setattr(sys.modules[package], name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(vars(sys.modules[package])) | set(names))

    return __getattr__, __dir__
