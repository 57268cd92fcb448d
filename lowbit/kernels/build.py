"""Compile-on-first-use for the C++ kernels: one shared loader, one cache folder.

``load_extension(state, prefix, source, cflags, what)`` compiles ``source`` with
``torch.utils.cpp_extension.load_inline`` into ``$LOWBIT_CACHE/kernels/<prefix>_<hash>`` (default
``~/.cache/lowbit/kernels``; the hash covers the source, the torch version and the CPU, since builds use
``-march=native``), imports it and stores it in ``state["module"]``; on any failure (no compiler, no
headers, read-only cache…) it stores the one-line reason in ``state["error"]`` and returns ``None``.
Once per process: later calls return what the first one found.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
from pathlib import Path

import torch

log = logging.getLogger("lowbit.kernels")
_lock = threading.Lock()


def build_dir() -> Path:
    root = Path(os.environ.get("LOWBIT_CACHE") or Path.home() / ".cache" / "lowbit")
    return root / "kernels"


def cpu_id() -> str:
    """Identifies the CPU, since the build uses ``-march=native``."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [l for l in f if l.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = [platform.processor()]
    return "".join(lines) + torch.backends.cpu.get_cpu_capability()


def load_extension(state: dict, prefix: str, source: str, cflags: list[str], what: str):
    """The compiled module for ``source`` (see the module doc), or ``None`` with ``state["error"]`` set."""
    module = state.get("module")
    if module is not None:
        return module
    with _lock:
        if "module" in state or "error" in state:
            return state.get("module")
        try:
            from torch.utils.cpp_extension import load_inline

            key = hashlib.sha256((source + torch.__version__ + cpu_id()).encode()).hexdigest()[:12]
            name = f"{prefix}_{key}"
            build = build_dir() / name
            build.mkdir(parents=True, exist_ok=True)
            if not any(build.glob("*.so")):
                log.warning("lowbit: compiling the %s into %s (once per machine, about a minute)", what, build)
            state["module"] = load_inline(name, cpp_sources=[source], build_directory=str(build), verbose=False,
                                          extra_cflags=cflags, extra_ldflags=["-fopenmp"])
        except Exception as e:  # fall back, say why
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            state["error"] = f"{type(e).__name__}: {first[:300]}"
        return state.get("module")
