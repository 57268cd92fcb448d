"""Compile-on-first-use for the C++ kernels: one :class:`Extension` per kernel, one cache folder.

The sources are real files in ``lowbit/kernels/csrc/`` (shipped as package data).  An extension is
``csrc/<source>`` plus the local headers it includes (``#include "…"``), compiled with its flags and
``-D`` defines (which select variants with ``#if``) by ``torch.utils.cpp_extension.load`` into

    $LOWBIT_CACHE/kernels/lowbit_<name>_<key>        (default ~/.cache/lowbit/kernels/…)

``key`` = sha256 of the source bytes, the flags and defines, the torch version, the Python version, the
compiler (``$CXX --version``) and the CPU (builds use ``-march=native``), so a change to any of them builds
afresh instead of loading a stale or incompatible library.  Each extension is built once per process;
on any failure (no compiler, unsupported CPU, build error, read-only cache…) :meth:`Extension.load`
returns ``None`` and :meth:`Extension.reason` says why in one line, so callers fall back to the
reference path.  Importing this module never compiles.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import threading
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger("lowbit.kernels")
CSRC = Path(__file__).parent / "csrc"
LDFLAGS = ("-fopenmp",)
_lock = threading.Lock()
_INCLUDE = re.compile(rb'^\s*#\s*include\s+"([^"]+)"', re.M)


def build_dir() -> Path:
    """``$LOWBIT_CACHE/kernels`` (default ``~/.cache/lowbit/kernels``)."""
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


def compiler() -> list[str]:
    """The C++ compiler ``torch.utils.cpp_extension`` runs: ``$CXX`` or ``c++``, as an argument list."""
    return shlex.split(os.environ.get("CXX") or "c++") or ["c++"]


@lru_cache(maxsize=None)
def _compiler_version(cxx: tuple[str, ...]) -> str | None:
    if shutil.which(cxx[0]) is None:
        return None
    try:
        r = subprocess.run([*cxx, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def compiler_version() -> str | None:
    """``$CXX --version`` (its whole output), or ``None`` when there is no working compiler."""
    return _compiler_version(tuple(compiler()))


def has_compiler() -> bool:
    """Whether a C++ compiler answers ``--version`` (what building a kernel needs first)."""
    return compiler_version() is not None


def source_files(source: Path) -> list[Path]:
    """``source`` and every local header it includes (``#include "…"``, relative to the including file),
    recursively, in first-seen order: the bytes the build depends on."""
    out: list[Path] = []
    todo = [source]
    while todo:
        f = todo.pop(0)
        if f in out:
            continue
        out.append(f)
        todo += [f.parent / m.decode() for m in _INCLUDE.findall(f.read_bytes())]
    return out


def cache_key(files: list[Path], flags: list[str]) -> str:
    """12 hex digits of sha256 over the files' bytes, the flags, torch, Python, the compiler and the CPU."""
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    for part in (*flags, torch.__version__, sys.version, compiler_version() or "", cpu_id()):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:12]


def _first_error(e: Exception) -> str:
    """One line for an exception: the compiler's first ``error`` line if there is one, else the first line."""
    lines = [l.strip() for l in str(e).splitlines() if l.strip()] or [type(e).__name__]
    err = next((l for l in lines if re.search(r"\berror\b", l) and not l.startswith("Error building")), lines[0])
    return err[:300]


class Extension:
    """One compiled kernel: ``csrc/<source>`` built with ``cflags`` and ``-D<define>`` flags on first use.

    :meth:`load` returns the imported module (or ``None``), :meth:`available` whether it exists,
    :meth:`reason` why not.  The first call in a process builds (or finds the cached build); later calls
    return what it found."""

    def __init__(self, name: str, source: str | Path, cflags: tuple[str, ...], what: str,
                 defines: tuple[str, ...] = ()):
        self.name, self.source, self.what = name, CSRC / source, what
        self.cflags, self.defines = tuple(cflags), tuple(defines)
        self._module = None
        self._error: str | None = None
        self._done = False

    def variant(self, *defines: str) -> "Extension":
        """The same kernel built with more ``-D`` defines (its own cache entry), e.g. ``"LOWBIT_NO_AVX512"``."""
        return Extension(self.name, self.source, self.cflags, self.what, self.defines + tuple(defines))

    @property
    def flags(self) -> list[str]:
        return [*self.cflags, *(f"-D{d}" for d in self.defines)]

    def load(self):
        """The compiled module, or ``None`` with :meth:`reason` set (see the module doc)."""
        if self._done:
            return self._module
        with _lock:
            if not self._done:
                try:
                    self._module = self._build()
                except Exception as e:  # fall back, say why
                    self._error = f"build error: {_first_error(e)}"
                self._done = True
        return self._module

    def available(self) -> bool:
        """Whether the compiled kernel can be used in this process (builds it on the first call)."""
        return self.load() is not None

    def reason(self) -> str | None:
        """Why :meth:`load` gave ``None`` (one line), or ``None`` when the kernel is available."""
        self.load()
        return self._error

    def _build(self):
        if sys.byteorder != "little":  # the kernels read packed int32 words as little-endian bytes
            self._error = "unsupported CPU: big-endian"
            return None
        if not has_compiler():
            self._error = f"no C++ compiler ({' '.join(compiler())!r} not found or not working; set CXX)"
            return None
        from torch.utils.cpp_extension import is_ninja_available, load

        if not is_ninja_available():
            self._error = "ninja not found (torch builds extensions with it: pip install ninja)"
            return None
        files = source_files(self.source)
        name = f"lowbit_{self.name}_{cache_key(files, [*self.flags, *LDFLAGS])}"
        build = build_dir() / name
        build.mkdir(parents=True, exist_ok=True)
        if not any(build.glob("*.so")):
            log.warning("lowbit: compiling the %s into %s (once per machine, about a minute)", self.what, build)
        return load(name, sources=[str(self.source)], build_directory=str(build), verbose=False,
                    extra_cflags=self.flags, extra_ldflags=list(LDFLAGS))
