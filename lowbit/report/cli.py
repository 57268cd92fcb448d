"""``lowbit report DIR... --out R``: compare lowbit folders (and the float model) in one report.

``R/report.md`` holds the comparison table, the speed table (when bench data exists), a PoC
checklist and the commands that reproduce every number; ``R/*.png`` the plots (:mod:`.plots`).
``R`` is written into a temporary sibling folder and renamed into place.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

from ..errors import LowbitError
from ..packed.checkpoint import swap_into_place
from .collect import Entry, collect_fp, collect_lowbit, read_json, unique_labels


def _bench_map(specs: list[str], dirs: list[str]) -> dict[str, str]:
    """``--bench DIR=FILE`` (or a bare FILE when there is one DIR) -> ``{DIR: FILE}``."""
    out = {}
    for spec in specs:
        d, sep, f = spec.rpartition("=")
        if not sep:
            if len(dirs) != 1:
                raise LowbitError(f"--bench '{spec}': with several folders write --bench DIR=FILE")
            d, f = dirs[0], spec
        if d not in dirs:
            raise LowbitError(f"--bench '{spec}': '{d}' is not one of the report's folders")
        out[d] = f
    return out


def evaluate_fp(source: str, entries: list[Entry], text: str, device: str | None = None) -> tuple[dict, dict]:
    """Evaluate the float model like the quantized ones were (their latest ppl settings and tasks)."""
    from .. import api
    from ..eval.harness import run_tasks
    from ..eval.memory import bits_per_weight, model_bytes

    proto = next((e.protocol for e in entries if e.protocol), {})
    proto = {"text": text, "seqlen": proto.get("seqlen") or 512, "max_tokens": proto.get("max_tokens", 20480),
             "bos": bool(proto.get("bos"))}
    tasks = list(dict.fromkeys(t for e in entries for t in (e.metrics.get("tasks") or {})))
    cloze = next((r.get("cloze") for e in entries for r in reversed(e.records) if r.get("cloze")), None) or {}
    model, tok, _ = api.load_any(source, device=device)
    metrics = api.evaluate_ppl(model, tok, text=text, seqlen=proto["seqlen"], max_tokens=proto["max_tokens"] or None,
                               bos=proto["bos"])
    if tasks:
        metrics.update(run_tasks(model, tok, tasks, text=text, cloze_passages=cloze.get("passages", 300),
                                 cloze_context=cloze.get("context", 128), seed=cloze.get("seed", 0)))
    metrics.update(bits_per_weight=bits_per_weight(model), model_bytes=model_bytes(model))
    return metrics, proto


def write_report(dirs: list[str], out: str | os.PathLike, *, fp: str | None = None, fp_json: str | None = None,
                 eval_fp: bool = False, bench: dict[str, str] | None = None, text: str = "default",
                 tolerance: float = 2.0, device: str | None = None, command: str = "") -> Path:
    """Collect, plot and write the report into ``out`` (atomically) -> ``out/report.md``'s folder."""
    from .markdown import render
    from .plots import write_plots

    if not dirs:
        raise LowbitError("report: name at least one lowbit folder")
    entries = [collect_lowbit(d, text=text, bench=(bench or {}).get(d)) for d in dirs]
    fp_entry = None
    if eval_fp and not fp:
        raise LowbitError("--eval-fp needs --fp SOURCE (the float model)")
    if fp or fp_json:
        metrics, proto = (read_json(fp_json, "--fp-json"), {}) if fp_json else ({}, {})
        if eval_fp:
            collect_fp(fp)  # refuses a lowbit folder before a long evaluation
            metrics, proto = evaluate_fp(fp, entries, text, device=device)
        fp_entry = collect_fp(fp, metrics, proto)
        fp_speed = next((e.bench["fp_decode_tokens_per_s"] for e in entries if "fp_decode_tokens_per_s" in e.bench), None)
        if fp_speed is not None:  # the bench of a quantized model also timed the float model
            fp_entry.bench = {"decode_tokens_per_s": fp_speed, "decode_speedup": 1.0}
    unique_labels(entries + ([fp_entry] if fp_entry else []))
    out = Path(out)
    if out.exists() and not (out / "report.md").is_file() and (not out.is_dir() or any(out.iterdir())):
        raise LowbitError(f"--out '{out}' exists and is not a lowbit report; refusing to overwrite it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise LowbitError(f"--out '{out}': cannot write there ({e.strerror})") from None
    try:
        plots = write_plots(([fp_entry] if fp_entry else []) + entries, tmp)
        md = render(entries, fp_entry, plots, text=text, tolerance=tolerance, command=command)
        (tmp / "report.md").write_text(md, encoding="utf-8")
        os.chmod(tmp, 0o755)
        swap_into_place(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise LowbitError(f"--out '{out}': writing the report failed ({e.strerror or e})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def cmd_report(a: argparse.Namespace) -> int:
    out = write_report(a.dirs, a.out, fp=a.fp, fp_json=a.fp_json, eval_fp=a.eval_fp,
                       bench=_bench_map(a.bench, a.dirs), text=a.text, tolerance=a.tolerance, device=a.device,
                       command=shlex.join(["lowbit", "report"] + sys.argv[2:]) if sys.argv[1:2] == ["report"] else "")
    pngs = sorted(p.name for p in out.glob("*.png"))
    print(f"report: {out / 'report.md'} ({len(a.dirs)} model(s); plots: {', '.join(pngs) or 'none'})")
    return 0


def register(sub) -> None:
    r = sub.add_parser("report", help="compare lowbit folders (and the float model): report.md + plots")
    r.add_argument("dirs", nargs="+", metavar="DIR", help="lowbit folders (evaluated with lowbit eval)")
    r.add_argument("--out", required=True, help="report folder (written atomically)")
    r.add_argument("--fp", default=None, help="the float model (folder, .gguf, hub id or 'smollm2-135m')")
    r.add_argument("--fp-json", default=None, help="the float model's 'lowbit eval --json' output")
    r.add_argument("--eval-fp", action="store_true", help="evaluate --fp now, with the quantized models' settings")
    r.add_argument("--bench", action="append", default=[], metavar="DIR=FILE",
                   help="a 'lowbit bench --json' file for DIR (default: DIR/bench.json when it exists)")
    r.add_argument("--text", default="default", help="which evaluation text to report (default: default)")
    r.add_argument("--tolerance", type=float, default=2.0, help="quality budget vs FP in %% (default 2)")
    r.add_argument("--device", default=None, help="for --eval-fp")
    r.set_defaults(func=cmd_report)
