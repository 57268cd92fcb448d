"""Gather what a comparison report shows, one :class:`Entry` per model, and the Pareto front.

A lowbit folder gives ``lowbit.json`` (method, config, bits/weight, calibration, ``quantize_seconds``
when recorded), ``evals.json`` (the records ``lowbit eval`` appended), the size of its files on disk
and, when present, a ``lowbit bench --json`` file (``DIR/bench.json`` or one the user names).  The
float baseline comes from a model source plus a ``lowbit eval --json`` file (or an evaluation run
by the caller).  Missing numbers stay ``None``; nothing here fails on missing data, only on a folder
that is not a lowbit checkpoint or an unreadable JSON file.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LowbitError
from ..eval.harness import EVALS_FILE, read_evals
from ..packed.checkpoint import read_meta

BENCH_FILE = "bench.json"
BENCH_KEYS = ("decode_tokens_per_s", "fp_decode_tokens_per_s", "decode_speedup", "prefill_tokens_per_s",
              "weight_memory_ratio", "peak_rss_bytes")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_PPL_KEYS = ("ppl", "tokens_scored", "seqlen")


@dataclass
class Entry:
    """One model of the report.  ``metrics``: merged latest evaluation (``ppl``, ``cloze_accuracy``,
    ``tasks`` …); ``protocol``: text/seqlen/max_tokens/bos of the ``ppl`` in ``metrics``."""

    label: str
    path: str
    kind: str                          # "lowbit" or "fp"
    method: str | None = None
    config: dict = field(default_factory=dict)
    calibration: dict | None = None
    source: str | None = None          # the model a lowbit folder was quantized from
    bits_per_weight: float | None = None
    disk_bytes: int | None = None
    quantize_seconds: float | None = None
    metrics: dict = field(default_factory=dict)
    protocol: dict = field(default_factory=dict)
    records: list = field(default_factory=list)   # the evals.json records used
    bench: dict = field(default_factory=dict)

    def get(self, key: str):
        """A metric (``ppl``, ``cloze_accuracy``, ``model_bytes``…) or bench value, ``None`` if absent."""
        value = self.metrics.get(key, self.bench.get(key))
        return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    def task_acc(self, task: str) -> float | None:
        value = (self.metrics.get("tasks") or {}).get(task, {}).get("acc")
        return value if isinstance(value, (int, float)) else None


def read_json(path: str | os.PathLike, what: str) -> dict:
    """A JSON object from ``path``; one-line :class:`LowbitError` naming ``what`` otherwise."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise LowbitError(f"{what} '{p}' not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise LowbitError(f"{what} '{p}': not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise LowbitError(f"{what} '{p}': expected a JSON object")
    return data


def merge_evals(records: list[dict], text: str = "default") -> tuple[dict, dict, list]:
    """The latest evaluation on ``text`` -> ``(metrics, protocol, records used)``.

    Records are applied oldest first: a later record replaces the keys it has (``ppl`` only when it
    measured one, each task separately), so ``eval`` (ppl) then ``eval --no-ppl --tasks cloze`` gives both."""
    metrics, protocol, used = {}, {}, []
    for r in records:
        if r.get("text", "default") != text or not isinstance(r.get("metrics"), dict):
            continue
        m, used = r["metrics"], used + [r]
        for k, v in m.items():
            if k == "tasks" and isinstance(v, dict):
                metrics.setdefault("tasks", {}).update(v)
            elif k in _PPL_KEYS:
                if m.get("ppl") is not None:
                    metrics[k] = v
            elif v is not None:
                metrics[k] = v
        if m.get("ppl") is not None:
            protocol = {k: r.get(k) for k in ("text", "seqlen", "max_tokens", "bos")}
    return metrics, protocol, used


def folder_bytes(path: Path, skip: tuple[str, ...] = ()) -> int:
    """Bytes of every file under ``path`` (recursively), except names in ``skip``."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name not in skip)


def _bench(path: Path, bench: str | None) -> dict:
    file = Path(bench) if bench else path / BENCH_FILE
    if not bench and not file.is_file():
        return {}
    data = read_json(file, "bench file")
    return {k: data[k] for k in BENCH_KEYS if isinstance(data.get(k), (int, float))}


def collect_lowbit(path: str | os.PathLike, text: str = "default", bench: str | None = None) -> Entry:
    """An :class:`Entry` for the lowbit folder ``path`` (``bench``: a bench JSON, else ``DIR/bench.json``)."""
    p = Path(path)
    meta = read_meta(p)
    records = read_evals(p)
    metrics, protocol, used = merge_evals(records, text)
    src = meta.get("source") or {}
    return Entry(label=p.resolve().name, path=str(path), kind="lowbit", method=meta.get("method"),
                 config=meta.get("config") or {}, calibration=meta.get("calibration"),
                 source=src.get("alias") or src.get("source") or src.get("path"),
                 bits_per_weight=meta.get("bits_per_weight"),
                 disk_bytes=folder_bytes(p, skip=(EVALS_FILE, BENCH_FILE)),
                 quantize_seconds=meta.get("quantize_seconds"), metrics=metrics, protocol=protocol,
                 records=used, bench=_bench(p, bench))


def source_bytes(source: str) -> int | None:
    """Size on disk of a float model source (a .gguf file, or a folder's weight files); None if unknown."""
    from ..models.sources import resolve

    try:
        info = resolve(source)
    except LowbitError:
        return None
    if info["kind"] == "gguf":
        return (Path(info["path"]) / info["gguf_file"]).stat().st_size
    if info["kind"] == "folder":
        return sum(f.stat().st_size for f in Path(info["path"]).rglob("*") if f.suffix in _WEIGHT_SUFFIXES)
    return None


def collect_fp(source: str | None, metrics: dict | None = None, protocol: dict | None = None) -> Entry:
    """The float baseline: ``source`` (may be None when only its eval JSON is known) and its eval metrics."""
    if source and Path(source).is_dir() and (Path(source) / "lowbit.json").exists():
        raise LowbitError(f"--fp '{source}' is a lowbit checkpoint; pass the float model it came from")
    metrics = dict(metrics or {})
    label = f"FP ({Path(source).name or source})" if source else "FP"
    return Entry(label=label, path=source or "", kind="fp", method="fp", source=source,
                 bits_per_weight=metrics.get("bits_per_weight", 16.0),
                 disk_bytes=source_bytes(source) if source else None, metrics=metrics, protocol=protocol or {})


def unique_labels(entries: list[Entry]) -> None:
    """Make labels unique (a repeated folder name gets its path)."""
    seen = {}
    for e in entries:
        seen[e.label] = seen.get(e.label, 0) + 1
    for e in entries:
        if seen[e.label] > 1 and e.kind == "lowbit":
            e.label = e.path


def pareto_front(points: list[tuple[float, float]], maximize_y: bool = False) -> list[int]:
    """Indices of the non-dominated points, sorted by x (then y), for "fewer bits is better" on x and
    lower (or, with ``maximize_y``, higher) is better on y.  A point is dominated when another one is
    at least as good on both axes and strictly better on one; identical points are all kept."""
    sign = -1.0 if maximize_y else 1.0
    pts = [(x, sign * y) for x, y in points]
    front = [i for i, (x, y) in enumerate(pts)
             if not any(x2 <= x and y2 <= y and (x2 < x or y2 < y) for x2, y2 in pts)]
    return sorted(front, key=lambda i: (pts[i][0], pts[i][1], i))


def delta_pct(value: float | None, ref: float | None) -> float | None:
    """``(value − ref) / ref`` in percent; None when either is missing or ref is 0."""
    if value is None or ref is None or ref == 0:
        return None
    return (value - ref) / ref * 100.0
