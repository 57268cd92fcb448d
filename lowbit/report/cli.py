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
from ..jsonio import finite_float


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


def evaluate_fp(source: str, entries: list, text: str, device: str | None = None) -> tuple[dict, dict]:
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
                 eval_fp: bool = False, bench: dict[str, str] | None = None, text: str | None = None,
                 tolerance: float = 2.0, device: str | None = None, command: str = "", force: bool = False) -> Path:
    """Collect, plot and write the report into ``out`` (atomically) -> ``out/report.md``'s folder.
    ``out`` is checked first: it must be new, empty or an earlier report (anything, with ``force``).
    ``text=None``: the text the folders were evaluated on (the one most of them were, when several).
    Without ``fp``/``fp_json`` the float baseline is the cached evaluation of the folders' source model
    (:func:`lowbit.report.collect.find_fp_baseline`)."""
    from ..outputs import check_folder, make_parents, remove_made
    from ..packed.checkpoint import swap_into_place
    from .collect import (collect_fp, collect_lowbit, find_fp_baseline, merge_evals, read_json, texts_evaluated,
                          unique_labels)
    from ..eval.harness import text_key
    from .markdown import render
    from .plots import write_plots

    out = Path(out)
    check_folder(out, "--out", lambda p: (p / "report.md").is_file(), "a lowbit report", force=force)
    if not dirs:
        raise LowbitError("report: name at least one lowbit folder")
    entries = [collect_lowbit(d, text=text or "default", bench=(bench or {}).get(d)) for d in dirs]
    texts = texts_evaluated(entries)
    if text is None:  # the user did not say: the text that was evaluated
        text = texts[0] if texts else "default"
        for e in entries:
            e.metrics, e.protocol, e.records = merge_evals(e.all_records, text)
    other_texts = [t for t in texts if text_key(t) != text_key(text)]
    fp_entry, fp_source = None, None
    if eval_fp and not fp:
        raise LowbitError("--eval-fp needs --fp SOURCE (the float model)")
    if fp or fp_json:
        metrics, proto = (read_json(fp_json, "--fp-json"), {}) if fp_json else ({}, {})
        if eval_fp:
            collect_fp(fp)  # refuses a lowbit folder before a long evaluation
            metrics, proto = evaluate_fp(fp, entries, text, device=device)
        fp_entry, fp_source = collect_fp(fp, metrics, proto), fp
    else:
        fp_entry, fp_source = find_fp_baseline(entries, text)
    if fp_entry is not None:  # the bench of a quantized model also timed the float model
        timed = next((e.bench for e in entries if "fp_decode_tokens_per_s" in e.bench), {})
        fp_entry.bench = {k: timed[f"fp_{k}"] for k in ("decode_tokens_per_s", "prefill_tokens_per_s")
                          if f"fp_{k}" in timed}
        fp_entry.bench.update({"decode_speedup": 1.0} if timed else {})
    unique_labels(entries + ([fp_entry] if fp_entry else []))
    check_folder(out, "--out", lambda p: (p / "report.md").is_file(), "a lowbit report", force=force,
                 probe_parent=False)  # again: it may have appeared during --eval-fp
    made = []
    try:
        made = make_parents(out.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        remove_made(made)
        raise LowbitError(f"--out '{out}': cannot write there ({e.strerror})") from None
    try:
        plots = write_plots(([fp_entry] if fp_entry else []) + entries, tmp)
        md = render(entries, fp_entry, plots, text=text, tolerance=tolerance, command=command,
                    other_texts=other_texts, fp_source=fp_source)
        (tmp / "report.md").write_text(md, encoding="utf-8")
        os.chmod(tmp, 0o755)
        swap_into_place(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_made(made)
        raise LowbitError(f"--out '{out}': writing the report failed ({e.strerror or e})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_made(made)
        raise
    return out


def cmd_report(a: argparse.Namespace) -> int:
    out = write_report(a.dirs, a.out, fp=a.fp, fp_json=a.fp_json, eval_fp=a.eval_fp,
                       bench=_bench_map(a.bench, a.dirs), text=a.text, tolerance=a.tolerance, device=a.device,
                       command=shlex.join(["lowbit", "report"] + sys.argv[2:]) if sys.argv[1:2] == ["report"] else "",
                       force=a.force)
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
    r.add_argument("--text", default=None, help="which evaluation text to report (default: the one the folders "
                   "were evaluated on; with several, the one most of them were)")
    r.add_argument("--tolerance", type=finite_float, default=2.0, help="quality budget vs FP in %% (default 2)")
    r.add_argument("--device", default=None, help="for --eval-fp")
    r.add_argument("--force", action="store_true", help="replace an --out folder that is not a lowbit report")
    r.set_defaults(func=cmd_report)
