"""The compute device: ``--device`` checked once, before any work.

``check_device(name)`` turns ``None`` into the default (``cuda`` when a CUDA device is available,
else ``cpu``) and accepts ``cpu``, ``cuda`` and ``cuda:N`` only when that device exists here; anything
else is a :class:`LowbitError` naming ``--device``.  The CLI applies it to every subcommand that has
``--device``; the Python API calls it for its ``device`` argument.
"""
from __future__ import annotations

import torch

from .errors import LowbitError

DEVICE_TYPES = ("cpu", "cuda")


def default_device() -> str:
    """``cuda`` when a CUDA device is available, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(name: str | torch.device | None) -> str:
    """A device this machine has -> its name (``None`` -> :func:`default_device`)."""
    if name is None:
        return default_device()
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError):
        dev = None
    if dev is None or dev.type not in DEVICE_TYPES:
        raise LowbitError(f"--device {str(name)!r}: unknown device (choose {' or '.join(DEVICE_TYPES)})")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise LowbitError(f"--device {name}: no CUDA device is available on this machine; use --device cpu")
        if dev.index is not None and dev.index >= count:
            raise LowbitError(f"--device {name}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    return str(dev)
