"""``report.md``: the comparison table a PoC asks for, a checklist, the plots and the commands.

Definitions used in the tables:

* bits/weight: every stored bit of the quantized linears (codes, scales, zeros, outliers…) per
  weight of those linears; 16 for the float model.
* size on disk: bytes of the checkpoint's files (a float model: its weight files).
* weight memory: bytes of all parameters and buffers as held in memory when evaluated.
* ppl: perplexity on the evaluation text (``lowbit eval``); cloze acc: share of passages whose last
  word greedy decoding reproduces exactly (``lowbit eval --tasks cloze``).
* Δ vs FP: ``(model − FP) / FP`` in percent (ppl: lower is better; accuracies: higher is better).
"""
from __future__ import annotations

import datetime
import shlex

from ..config import QuantConfig
from .collect import Entry, delta_pct, pareto_front

DASH = "–"
_BOOL_FLAGS = {"sym": (True, "--sym"), "act_order": (False, "--no-act-order"),
               "static_groups": (False, "--no-static-groups"), "mse": (False, "--no-mse"),
               "squeeze_staged": (False, "--one-shot"), "binary_residual": (True, "--binary-residual")}
_VALUE_FLAGS = ("damp", "block_size", "beta", "pullback", "outlier_frac", "saliency", "outlier_select",
                "gwq_solver", "binary_frac", "high_bits", "squeeze_score")


def fmt(v, spec: str = ".4g", suffix: str = "") -> str:
    return DASH if v is None else f"{v:{spec}}{suffix}"


def fmt_bytes(b) -> str:
    if b is None:
        return DASH
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.2f} MiB"


def fmt_seconds(s) -> str:
    if s is None:
        return DASH
    return f"{s / 60:.1f} min" if s >= 120 else f"{s:.1f} s"


def fmt_delta(d) -> str:
    return DASH if d is None else f"{d:+.2f} %"


def config_summary(e: Entry) -> str:
    """``w4 g64 asym`` plus every setting that differs from :class:`QuantConfig`'s defaults."""
    if e.kind == "fp":
        return "float"
    c, defaults = e.config, QuantConfig().to_json()
    if "bits" not in c:
        return DASH
    g = c.get("group_size")
    parts = [f"w{c['bits']}", "per-row" if g == -1 else f"g{g}", "sym" if c.get("sym") else "asym"]
    for k, v in c.items():
        if k not in ("method", "bits", "group_size", "sym") and k in defaults and v != defaults[k]:
            parts.append(f"{k}={v}")
    return " ".join(parts)


def quantize_command(e: Entry) -> str:
    """The ``lowbit quantize`` command that rebuilds ``e`` (settings this lowbit knows as flags)."""
    c, defaults = e.config, QuantConfig().to_json()
    cmd = ["lowbit", "quantize", e.source or "MODEL", "--method", str(e.method)]
    cmd += ["--bits", str(c.get("bits")), "--group-size", str(c.get("group_size"))]
    for k, (when, flag) in _BOOL_FLAGS.items():
        if k in c and c[k] == when and c[k] != defaults.get(k):
            cmd.append(flag)
    for k in _VALUE_FLAGS:
        if k in c and c[k] != defaults.get(k):
            cmd += ["--" + k.replace("_", "-"), str(c[k])]
    cal = e.calibration or {}
    if cal:
        cmd += ["--calib", str(cal.get("source")), "--nsamples", str(cal.get("nsamples")),
                "--seqlen", str(cal.get("seqlen")), "--seed", str(cal.get("seed"))]
        if cal.get("fp_targets") is not None:
            cmd.append("--fp-targets" if cal["fp_targets"] else "--no-fp-targets")
    return shlex.join(cmd + ["--out", e.path])


def eval_commands(e: Entry) -> list[str]:
    """``lowbit eval`` commands that reproduce the evaluation records used for ``e``."""
    out = []
    for r in e.records:
        cmd = ["lowbit", "eval", e.path or "MODEL", "--text", str(r.get("text", "default"))]
        if (r.get("metrics") or {}).get("ppl") is None:
            cmd.append("--no-ppl")
        else:
            cmd += ["--seqlen", str(r.get("seqlen")), "--max-tokens", str(r.get("max_tokens"))]
            cmd += ["--bos"] if r.get("bos") else []
        if r.get("tasks"):
            cmd += ["--tasks", ",".join(r["tasks"])]
            cl = r.get("cloze") or {}
            if any(t.startswith("cloze") for t in r["tasks"]) and cl:
                cmd += ["--cloze-passages", str(cl.get("passages")), "--cloze-context", str(cl.get("context")),
                        "--seed", str(cl.get("seed"))]
            for k in ("limit", "num_fewshot"):
                if r.get(k) is not None:
                    cmd += ["--" + k.replace("_", "-"), str(r[k])]
        out.append(shlex.join(cmd))
    return out


def _tasks(entries: list[Entry]) -> list[str]:
    names = []
    for e in entries:
        names += [t for t in (e.metrics.get("tasks") or {}) if not t.startswith("cloze") and t not in names]
    return names


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"] + \
           ["| " + " | ".join(r) + " |" for r in rows]


def render(entries: list[Entry], fp: Entry | None, plots: list[str], *, text: str = "default",
           tolerance: float = 2.0, command: str = "") -> str:
    """The whole ``report.md``; ``entries`` are the quantized models, ``fp`` the baseline (or None)."""
    from .. import __version__

    rows = ([fp] if fp else []) + entries
    fp_ppl, fp_cloze = (fp.get("ppl"), fp.get("cloze_accuracy")) if fp else (None, None)
    tasks = _tasks(rows)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = ["# lowbit comparison report", "",
             f"{len(entries)} quantized model(s)" + (f" against the float baseline {fp.label}" if fp else
                                                      ", no float baseline (pass `--fp SOURCE --fp-json F` or `--eval-fp`)")
             + f"; quality on the text `{text}`. Generated {date} by lowbit {__version__}.", "",
             "## Comparison", ""]
    header = ["model", "method", "config", "bits/weight", "size on disk", "weight memory", "ppl", "Δppl vs FP",
              "cloze acc", "Δacc vs FP"] + [f"{t} acc" for t in tasks] + ["quantize time"]
    body = []
    for e in rows:
        body.append([e.label, e.method or DASH, config_summary(e), fmt(e.bits_per_weight, ".3f"),
                     fmt_bytes(e.disk_bytes), fmt_bytes(e.get("model_bytes")), fmt(e.get("ppl"), ".4f"),
                     DASH if e is fp else fmt_delta(delta_pct(e.get("ppl"), fp_ppl)),
                     fmt(e.get("cloze_accuracy"), ".4f"),
                     DASH if e is fp else fmt_delta(delta_pct(e.get("cloze_accuracy"), fp_cloze))]
                    + [fmt(e.task_acc(t), ".4f") for t in tasks] + [fmt_seconds(e.quantize_seconds)])
    lines += _table(header, body) + ["", "Δ vs FP = (model − FP) / FP. bits/weight counts every stored bit of the "
                                         "quantized linears; weight memory = bytes of all weights as held in memory; "
                                         f"{DASH} = not measured.", ""]
    protocols = {(p.get("seqlen"), p.get("max_tokens"), p.get("bos")) for p in (e.protocol for e in rows) if p}
    if len(protocols) > 1:
        lines += ["**Note:** the perplexities were measured with different settings (seqlen, max tokens, BOS: "
                  + ", ".join(str(p) for p in sorted(protocols, key=str)) + "); they are not directly comparable.", ""]
    if any(e.bench for e in rows):
        lines += ["## Speed and memory (`lowbit bench`)", ""]
        lines += _table(["model", "decode tok/s", "FP decode tok/s", "decode speedup", "prefill tok/s",
                         "weight memory ratio", "peak RSS"],
                        [[e.label, fmt(e.get("decode_tokens_per_s"), ".1f"), fmt(e.get("fp_decode_tokens_per_s"), ".1f"),
                          fmt(e.get("decode_speedup"), ".2f", "×"), fmt(e.get("prefill_tokens_per_s"), ".1f"),
                          fmt(e.get("weight_memory_ratio"), ".3f"), fmt_bytes(e.get("peak_rss_bytes"))] for e in rows])
        lines.append("")
    lines += ["## PoC checklist", ""] + checklist(entries, fp, tolerance) + [""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p[:-4]}]({p})" for p in plots] + [""]
    lines += ["## How to reproduce", "", "```sh"]
    for e in entries:
        lines += [f"# {e.label}", quantize_command(e)] + eval_commands(e)
        if e.bench:
            lines.append(shlex.join(["lowbit", "bench", e.path, "--json", f"{e.path}/bench.json"]))
    if fp and fp.source:
        proto = next((e.protocol for e in entries if e.protocol), {})
        cmd = ["lowbit", "eval", fp.source, "--text", text, "--seqlen", str(proto.get("seqlen", 512)),
               "--max-tokens", str(proto.get("max_tokens", 20480))]
        cl = next((r.get("cloze") for e in entries for r in reversed(e.records) if r.get("cloze")), None)
        if fp_cloze is not None:
            cmd += ["--tasks", "cloze"] + (["--cloze-passages", str(cl.get("passages")), "--cloze-context",
                                            str(cl.get("context")), "--seed", str(cl.get("seed"))] if cl else [])
        lines += [f"# {fp.label}", shlex.join(cmd + ["--json", "fp.json"])]
    if command:
        lines += ["# this report", command]
    lines += ["```", ""]
    return "\n".join(lines)


def checklist(entries: list[Entry], fp: Entry | None, tolerance: float) -> list[str]:
    """Quality budget per model, Pareto-optimal and smallest acceptable models, missing measurements."""
    out = []
    fp_ppl, fp_cloze = (fp.get("ppl"), fp.get("cloze_accuracy")) if fp else (None, None)
    ok = []
    for e in entries:
        dp, dc = delta_pct(e.get("ppl"), fp_ppl), delta_pct(e.get("cloze_accuracy"), fp_cloze)
        if dp is None and dc is None:
            out.append(f"- [ ] {e.label}: quality vs FP {DASH} (no FP baseline or no measurement)")
            continue
        good = (dp is None or dp <= tolerance) and (dc is None or dc >= -tolerance)
        ok += [e] if good else []
        out.append(f"- [{'x' if good else ' '}] {e.label}: ppl {fmt_delta(dp)}, cloze acc {fmt_delta(dc)} "
                   f"(budget: at most {tolerance:g} % worse than FP)")
    pts = [(e, e.bits_per_weight, e.get("ppl")) for e in entries + ([fp] if fp else [])]
    pts = [(e, x, y) for e, x, y in pts if x is not None and y is not None]
    if pts:
        front = [pts[i][0].label for i in pareto_front([(x, y) for _, x, y in pts])]
        out.append("- Pareto-optimal (bits/weight vs ppl): " + ", ".join(front))
    if ok:
        best = min(ok, key=lambda e: (e.bits_per_weight or 99, e.get("ppl") or 0))
        out.append(f"- Smallest model within the budget: **{best.label}** ({fmt(best.bits_per_weight, '.3f')} "
                   f"bits/weight, {fmt_bytes(best.disk_bytes)} on disk)")
    fast = [e for e in entries if e.get("decode_tokens_per_s")]
    if fast:
        top = max(fast, key=lambda e: e.get("decode_tokens_per_s"))
        out.append(f"- Fastest decode: {top.label} ({top.get('decode_tokens_per_s'):.1f} tok/s, "
                   f"speedup {fmt(top.get('decode_speedup'), '.2f', '×')})")
    missing = [("perplexity", "lowbit eval DIR", lambda e: e.get("ppl") is None),
               ("cloze accuracy", "lowbit eval DIR --no-ppl --tasks cloze", lambda e: e.get("cloze_accuracy") is None),
               ("speed", "lowbit bench DIR --json DIR/bench.json", lambda e: not e.bench),
               ("quantize time", "recorded by lowbit quantize in lowbit.json", lambda e: e.quantize_seconds is None)]
    for what, how, test in missing:
        names = [e.label for e in entries if test(e)]
        if names:
            out.append(f"- Not measured: {what} for {', '.join(names)} ({how})")
    return out
