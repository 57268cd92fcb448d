"""The measured candidate errors of ``--target-bpw`` (:func:`lowbit.gguf.budget.plan`), kept between runs.

Measuring is the expensive part of a plan (a float forward pass over the calibration windows plus every candidate
type's RTN of every linear: minutes on the demo model), and it does not depend on the budget ``B``: a sweep over
sizes (``--target-bpw 3.5``, ``4``, ``4.5`` … of one model on one calibration set) measures once and then only
re-solves the knapsack.  The errors are kept in ``$LOWBIT_CACHE/bpw-errors/<key>.json`` (default
``~/.cache/lowbit``)::

    key = sha256("lowbit-bpw-errors-v1", lowbit's source files, every tensor of the model (name, dtype, shape,
                 bytes), each linear's candidate types, the importance weighting, the measured rows, and for a
                 calibrated method the calibration windows' token ids, the dtype, the batch and the device type)

so a different model, text, seed, window count, candidate list or lowbit version is a different key, never a
stale hit.  Only a single process reads or writes it (under torchrun every rank must run the same collectives, so
every rank measures).  As with the token cache (:func:`lowbit.data.windows.tokenize`), a cache that cannot be read
or written is ignored: the run measures again.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import torch

VERSION = b"lowbit-bpw-errors-v1\0"
_SOURCE: str | None = None


def cache_dir() -> Path:
    """``$LOWBIT_CACHE/bpw-errors`` (default ``~/.cache/lowbit/bpw-errors``): lowbit's one cache root."""
    from ..models.sources import cache_dir as root

    return root() / "bpw-errors"


def _source_digest() -> str:
    """sha256 of every ``.py`` file of the lowbit package (any code change is a new key), computed once."""
    global _SOURCE
    if _SOURCE is None:
        root = Path(__file__).resolve().parents[1]
        h = hashlib.sha256()
        for f in sorted(root.rglob("*.py")):
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
        _SOURCE = h.hexdigest()
    return _SOURCE


def _tensor(h, name: str, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy())


def key(model, options: dict[str, list[str]], importance: bool, max_rows: int,
        windows: torch.Tensor | None = None, calib: tuple = ()) -> str:
    """The cache key of a measurement (module docstring): ``options`` the candidate types of each linear (in the
    plan's order), ``windows`` (N, T) the calibration token ids (``None``: data-free), ``calib`` the other settings
    the float stream depends on (dtype, batch, device type)."""
    h = hashlib.sha256(VERSION)
    h.update(_source_digest().encode())
    seen = set()
    for name, t in model.state_dict(keep_vars=True).items():
        ident = (t.data_ptr(), tuple(t.shape), t.dtype)
        if ident in seen:  # a tied tensor counts once
            continue
        seen.add(ident)
        _tensor(h, name, t)
    h.update(json.dumps({"options": options, "importance": bool(importance), "max_rows": int(max_rows),
                         "calib": [str(c) for c in calib]}, sort_keys=True).encode())
    if windows is not None:
        _tensor(h, "windows", windows.to(torch.long))
    return h.hexdigest()[:32]


def read(k: str, options: dict[str, list[str]]) -> dict[str, list[float]] | None:
    """The errors stored under ``k``, per layer in ``options``' type order; ``None`` when absent, unreadable, or not
    exactly these layers and types with finite errors."""
    try:
        got = json.loads((cache_dir() / f"{k}.json").read_text())["measured"]
        out = {n: [float(got[n][t]) for t in ts] for n, ts in options.items()}
        if set(got) != set(options) or any(set(got[n]) != set(ts) for n, ts in options.items()):
            return None
        return out if all(math.isfinite(e) for es in out.values() for e in es) else None
    except Exception:  # absent, damaged or another layout: measure again
        return None


def write(k: str, options: dict[str, list[str]], measured: dict[str, list[float]]) -> None:
    """Keep ``measured`` (per layer, in ``options``' type order) under ``k``, atomically; nothing when any error is
    not finite or the cache cannot be written."""
    if not all(math.isfinite(e) for es in measured.values() for e in es):
        return
    try:
        folder = cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{k}.{os.getpid()}.tmp"
        body = {"measured": {n: dict(zip(options[n], measured[n])) for n in options}}
        tmp.write_text(json.dumps(body, allow_nan=False))
        os.replace(tmp, folder / f"{k}.json")
    except Exception:  # a read-only or full cache: nothing to keep
        pass
