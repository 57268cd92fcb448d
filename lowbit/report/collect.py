"""Gather what a comparison report shows, one :class:`Entry` per model, and the Pareto front.

A lowbit folder gives ``lowbit.json`` (method, config, bits/weight, calibration, source model and the
run record ``quantize``: seconds, peak RSS, machine), ``evals.json`` (the records ``lowbit eval``
appended), the size of its files on disk and its bench data: the latest run in ``DIR/benches.json``
(``lowbit bench`` records every run there), else ``DIR/bench.json``, or a file the user names.  The
float baseline is found by itself: ``lowbit eval`` on a float model keeps its records in lowbit's
cache (:func:`lowbit.eval.harness.fp_evals_file`), looked up from the folder's recorded source
(:func:`find_fp_baseline`); or it comes from a model source plus a ``lowbit eval --json`` file.
Missing numbers stay ``None``; nothing here fails on missing data, only on a folder that is not a
lowbit checkpoint or an unreadable JSON file.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LowbitError
from ..eval.harness import EVALS_FILE, read_evals, read_fp_evals, text_key
from ..packed.checkpoint import read_meta

BENCH_FILE = "bench.json"
BENCHES_FILE = "benches.json"  # = lowbit.deploy.bench.BENCHES_FILE (not imported: that module pulls in torch)
BENCH_KEYS = ("decode_tokens_per_s", "fp_decode_tokens_per_s", "decode_speedup", "prefill_tokens_per_s",
              "weight_memory_ratio", "peak_rss_bytes")
BENCH_FACTS = ("dtype", "prefill_dtype", "fp_dtype", "fp_prefill_dtype", "threads", "machine", "llama_cpp",
               "prompt_tokens", "new_tokens", "repeats")
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
    bench: dict = field(default_factory=dict)     # numbers of the bench run (llama.cpp's as llama_cpp_*)
    bench_facts: dict = field(default_factory=dict)  # its dtypes, threads, machine, llama.cpp skip reason
    meta: dict = field(default_factory=dict)      # lowbit.json (a lowbit folder)
    all_records: list = field(default_factory=list)  # every evals.json record (any text)

    @property
    def run(self) -> dict:
        """lowbit.json's record of the quantize run (``seconds``, ``peak_rss_bytes``, ``machine``)."""
        return self.meta.get("quantize") or {}

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


def record_text(r: dict) -> str:
    """The text an evaluation record is about (its ``text_key``; older records: their ``text`` resolved)."""
    return str(r.get("text_key") or text_key(str(r.get("text", "default"))))


def same_text(r: dict, text: str) -> bool:
    return r.get("text", "default") == text or record_text(r) == text_key(text)


def texts_evaluated(entries: list[Entry]) -> list[str]:
    """The texts the folders were evaluated on (as the user wrote them), most models first, then the latest."""
    seen: dict[str, tuple[set, str, str]] = {}
    for i, e in enumerate(entries):
        for r in e.all_records:
            if not isinstance(r.get("metrics"), dict):
                continue
            key = record_text(r)
            models, date, name = seen.get(key, (set(), "", str(r.get("text", "default"))))
            seen[key] = (models | {i}, max(date, str(r.get("date", ""))), name)
    latest_first = sorted(seen.values(), key=lambda v: v[1], reverse=True)
    return [name for _, _, name in sorted(latest_first, key=lambda v: -len(v[0]))]


def merge_evals(records: list[dict], text: str = "default") -> tuple[dict, dict, list]:
    """The latest evaluation on ``text`` -> ``(metrics, protocol, records used)``.

    Records are applied oldest first: a later record replaces the keys it has (``ppl`` only when it
    measured one, each task separately), so ``eval`` (ppl) then ``eval --no-ppl --tasks cloze`` gives both."""
    metrics, protocol, used = {}, {}, []
    for r in records:
        if not same_text(r, text) or not isinstance(r.get("metrics"), dict):
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


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def read_bench(path: Path, bench: str | None) -> tuple[dict, dict]:
    """``(numbers, facts)`` of the bench run for the folder ``path``: the file ``bench`` when named, else the
    latest run recorded in ``DIR/benches.json``, else ``DIR/bench.json``; ``({}, {})`` when there is none.
    llama.cpp's numbers come in as ``llama_cpp_decode_tokens_per_s`` / ``llama_cpp_prefill_tokens_per_s``."""
    if bench:
        data = read_json(bench, "bench file")
    elif (path / BENCHES_FILE).is_file():
        runs = [r for r in read_evals(path, BENCHES_FILE) if isinstance(r.get("result"), dict)]
        data = runs[-1]["result"] if runs else {}
    elif (path / BENCH_FILE).is_file():
        data = read_json(path / BENCH_FILE, "bench file")
    else:
        return {}, {}
    numbers = {k: v for k, v in data.items() if _number(v)}
    lc = data.get("llama_cpp") if isinstance(data.get("llama_cpp"), dict) else {}
    numbers.update({f"llama_cpp_{k}": v for k, v in lc.items() if _number(v)})
    return numbers, {k: data[k] for k in BENCH_FACTS if k in data}


def collect_lowbit(path: str | os.PathLike, text: str = "default", bench: str | None = None) -> Entry:
    """An :class:`Entry` for the lowbit folder ``path`` (``bench``: a bench JSON, else ``DIR/bench.json``)."""
    p = Path(path)
    meta = read_meta(p)
    records = read_evals(p)
    metrics, protocol, used = merge_evals(records, text)
    numbers, facts = read_bench(p, bench)
    run = meta.get("quantize") if isinstance(meta.get("quantize"), dict) else {}
    return Entry(label=p.resolve().name, path=str(path), kind="lowbit", method=meta.get("method"),
                 config=meta.get("config") or {}, calibration=meta.get("calibration"),
                 source=source_arg(meta.get("source") or {}), bits_per_weight=meta.get("bits_per_weight"),
                 disk_bytes=folder_bytes(p, skip=(EVALS_FILE, BENCH_FILE, BENCHES_FILE)),
                 quantize_seconds=run.get("seconds", meta.get("quantize_seconds")), metrics=metrics,
                 protocol=protocol, records=used, bench=numbers, bench_facts=facts, meta=meta, all_records=records)


def source_arg(info: dict) -> str | None:
    """A command-line argument that names the source model recorded in ``lowbit.json`` from any folder:
    the demo alias, the absolute path of a folder or ``.gguf``, or the hub id."""
    if info.get("alias"):
        return info["alias"]
    if info.get("kind") == "gguf" and info.get("path") and info.get("gguf_file"):
        return str(Path(info["path"]) / info["gguf_file"])
    return info.get("path") or info.get("source")


def cloze_settings(entries: list[Entry]) -> dict | None:
    """The cloze settings (passages, context, seed) of the latest cloze evaluation among ``entries``."""
    return next((r.get("cloze") for e in entries for r in reversed(e.records)
                 if r.get("cloze") and any(str(t).startswith("cloze") for t in r.get("tasks") or [])), None)


def find_fp_baseline(entries: list[Entry], text: str) -> tuple[Entry | None, str | None]:
    """The float baseline of ``entries`` from lowbit's cache of float-model evaluations -> ``(entry or None,
    source)``: the cached records of the first folder's source model on ``text`` with the folders' ppl
    settings (seqlen, max tokens, BOS) and cloze settings; ``(None, source)`` when there are none."""
    info = next((e.meta.get("source") for e in entries if isinstance(e.meta.get("source"), dict)), None)
    if not info:
        return None, None
    source = source_arg(info)
    proto = next((e.protocol for e in entries if e.protocol), {})
    cloze = cloze_settings(entries)

    def matches(r: dict) -> bool:
        if not same_text(r, text):
            return False
        if (r.get("metrics") or {}).get("ppl") is not None and proto and \
                any(r.get(k) != proto.get(k) for k in ("seqlen", "max_tokens", "bos")):
            return False
        return not (cloze and r.get("cloze") and any(str(t).startswith("cloze") for t in r.get("tasks") or [])
                    and r["cloze"] != cloze)

    try:
        records = [r for r in read_fp_evals(info) if matches(r)]
    except LowbitError:  # an unreadable cache file is no reason to fail the report
        records = []
    metrics, protocol, used = merge_evals(records, text)
    if not metrics:
        return None, source
    fp = collect_fp(source, metrics, protocol)
    fp.records = used
    return fp, source


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
