"""``report.md``: the comparison table a PoC asks for, a checklist, the plots and the commands.

Definitions used in the tables:

* bits/weight: every stored bit of the quantized linears (codes, scales, zeros, outliers…) per
  weight of those linears; 16 for the float model.
* size on disk: bytes of the checkpoint's files (a float model: its weight files).
* weight memory: bytes of all parameters and buffers as held in memory when evaluated.
* ppl: perplexity on the evaluation text (``lowbit eval``); cloze acc: share of passages whose last
  word greedy decoding reproduces exactly (``lowbit eval --tasks cloze``).
* KLD: mean KL(P_ref ‖ P_model) of the next-token distributions in nats, top-1: share of positions where
  both models' most likely token agree (``lowbit eval DIR --kld REF``, :mod:`lowbit.eval.kld`).
* Δ vs FP: ``(model − FP) / FP`` in percent (ppl: lower is better; accuracies: higher is better).
* quantize time / peak RSS: the ``quantize`` run record in ``lowbit.json``; decode / prefill tokens/s,
  peak RSS: the latest ``lowbit bench`` run (``DIR/benches.json``), each phase in its faster dtype.
"""
from __future__ import annotations

import datetime
import shlex

from ..config import QuantConfig, applicable
from ..errors import LowbitError
from .collect import Entry, cloze_settings, delta_pct, pareto_front
from .reproduce import quantize_command

DASH = "–"


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
    """``w4 g64 asym`` plus every setting that applies to the method and differs from its defaults
    (:class:`QuantConfig` of that method)."""
    if e.kind == "fp":
        return "float"
    c = applicable(e.config or {}, e.method)
    if "bits" not in c:
        return DASH
    try:
        defaults = QuantConfig(method=e.method or c.get("method") or "gptq").to_json()
    except LowbitError:  # a method this lowbit does not know: only its grid
        defaults = {}
    g = c.get("group_size")
    parts = [f"w{c['bits']}", "per-row" if g == -1 else f"g{g}", "sym" if c.get("sym") else "asym"]
    for k, v in c.items():
        if k not in ("method", "bits", "group_size", "sym") and k in defaults and v != defaults[k]:
            parts.append(f"{k}={v}")
    return " ".join(parts)


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
        if r.get("kld_reference"):
            cmd += ["--kld", str(r["kld_reference"])]
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


def fp_eval_command(source: str, text: str, entries: list[Entry], cloze: bool) -> str:
    """The ``lowbit eval`` of the float model with the folders' ppl (and cloze) settings."""
    proto = next((e.protocol for e in entries if e.protocol), {})
    cmd = ["lowbit", "eval", source, "--text", text, "--seqlen", str(proto.get("seqlen") or 512),
           "--max-tokens", str(proto.get("max_tokens", 20480))] + (["--bos"] if proto.get("bos") else [])
    cl = cloze_settings(entries)
    if cloze:
        cmd += ["--tasks", "cloze"] + (["--cloze-passages", str(cl.get("passages")), "--cloze-context",
                                        str(cl.get("context")), "--seed", str(cl.get("seed"))] if cl else [])
    return shlex.join(cmd)


def bench_command(e: Entry) -> str:
    f = e.bench_facts
    cmd = ["lowbit", "bench", e.path]
    for key in ("prompt_tokens", "new_tokens", "repeats", "threads"):
        if f.get(key) is not None:
            cmd += ["--" + key.replace("_", "-"), str(f[key])]
    return shlex.join(cmd)


def _tasks(entries: list[Entry]) -> list[str]:
    names = []
    for e in entries:
        names += [t for t in (e.metrics.get("tasks") or {}) if not t.startswith("cloze") and t not in names]
    return names


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"] + \
           ["| " + " | ".join(r) + " |" for r in rows]


def _with_dtype(value, dtype) -> str:
    return DASH if value is None else f"{value:.1f}" + (f" ({dtype})" if dtype else "")


def machine_line(m: dict) -> str:
    """``CPU model, N threads (of C cores), device, torch V``."""
    parts = [str(m.get("cpu") or "unknown CPU")]
    if m.get("threads"):
        parts.append(f"{m['threads']} thread{'s' if m['threads'] != 1 else ''}"
                     + (f" of {m['cpu_count']} CPUs" if m.get("cpu_count") else ""))
    parts += [f"device {m['device']}"] if m.get("device") else []
    parts += [f"torch {m['torch']}"] if m.get("torch") else []
    return ", ".join(parts)


def machines(entries: list[Entry]) -> list[str]:
    """One line per distinct machine: which measurements (quantize, bench) of which models ran on it."""
    seen: dict[str, list[str]] = {}
    for e in entries:
        for what, m in (("quantize", e.run.get("machine")), ("bench", e.bench_facts.get("machine"))):
            if isinstance(m, dict):
                seen.setdefault(machine_line(m), []).append(f"{what} {e.label}")
    return [f"- {line}: {', '.join(uses)}" for line, uses in seen.items()]


def render(entries: list[Entry], fp: Entry | None, plots: list[str], *, text: str = "default",
           tolerance: float = 2.0, command: str = "", other_texts: list[str] | None = None,
           fp_source: str | None = None) -> str:
    """The whole ``report.md``; ``entries`` are the quantized models, ``fp`` the baseline (or None;
    ``fp_source``: the float model it would be, for the line that says how to evaluate it)."""
    from .. import __version__

    rows = ([fp] if fp else []) + entries
    fp_ppl, fp_cloze = (fp.get("ppl"), fp.get("cloze_accuracy")) if fp else (None, None)
    any_cloze = any(e.get("cloze_accuracy") is not None for e in entries)
    tasks = _tasks(rows)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = ["# lowbit comparison report", "",
             f"{len(entries)} quantized model(s)" + (f" against the float baseline {fp.label}" if fp else
                                                      ", no float baseline")
             + f"; quality on the text `{text}`. Generated {date} by lowbit {__version__}.", ""]
    if other_texts:
        lines += ["Also evaluated on: " + ", ".join(f"`{t}`" for t in other_texts)
                  + " — `lowbit report … --text T` reports another one.", ""]
    if fp is None:
        how = (f"`{fp_eval_command(fp_source, text, entries, any_cloze)}` evaluates it once (kept in lowbit's cache "
               "for every later report)") if fp_source else "pass `--fp SOURCE --eval-fp`"
        lines += [f"No float baseline on this text: {how}.", ""]
    sources = list(dict.fromkeys(e.source for e in entries if e.source))
    if len(sources) > 1:
        lines += ["**Note:** the folders were quantized from different models (" + ", ".join(f"`{x}`" for x in sources)
                  + "); Δ vs FP compares each with the one float baseline.", ""]
    lines += ["## Comparison", ""]
    kld = any(e.get("kld") is not None for e in rows)
    header = (["model", "method", "config", "bits/weight", "size on disk", "weight memory", "ppl", "Δppl vs FP",
               "cloze acc", "Δacc vs FP"] + (["KLD", "top-1"] if kld else []) + [f"{t} acc" for t in tasks]
              + ["quantize time", "quantize peak RSS"])
    body = []
    for e in rows:
        body.append([e.label, e.method or DASH, config_summary(e), fmt(e.bits_per_weight, ".3f"),
                     fmt_bytes(e.disk_bytes), fmt_bytes(e.get("model_bytes")), fmt(e.get("ppl"), ".4f"),
                     DASH if e is fp else fmt_delta(delta_pct(e.get("ppl"), fp_ppl)),
                     fmt(e.get("cloze_accuracy"), ".4f"),
                     DASH if e is fp else fmt_delta(delta_pct(e.get("cloze_accuracy"), fp_cloze))]
                    + ([fmt(e.get("kld"), ".5f"), fmt(e.get("top1_agreement"), ".4f")] if kld else [])
                    + [fmt(e.task_acc(t), ".4f") for t in tasks]
                    + [fmt_seconds(e.quantize_seconds), fmt_bytes(e.run.get("peak_rss_bytes"))])
    lines += _table(header, body) + ["", "Δ vs FP = (model − FP) / FP. bits/weight counts every stored bit of the "
                                         "quantized linears; weight memory = bytes of all weights as held in memory; "
                                         f"{DASH} = not measured.", ""]
    protocols = {(p.get("seqlen"), p.get("max_tokens"), p.get("bos")) for p in (e.protocol for e in rows) if p}
    if len(protocols) > 1:
        lines += ["**Note:** the perplexities were measured with different settings (seqlen, max tokens, BOS: "
                  + ", ".join(str(p) for p in sorted(protocols, key=str)) + "); they are not directly comparable.", ""]
    if kld:
        lines += ["## A/B against the reference (`lowbit eval DIR --kld REF`)", ""]
        lines += _table(["model", "reference", "KLD (nats)", "± stderr", "KLD p99", "KLD max", "top-1 agreement",
                         "ppl ratio"],
                        [[e.label, f"`{e.metrics.get('kld_reference', DASH)}`", fmt(e.get("kld"), ".5f"),
                          fmt(e.get("kld_stderr"), ".5f"), fmt(e.get("kld_p99"), ".4f"), fmt(e.get("kld_max"), ".4f"),
                          fmt(e.get("top1_agreement"), ".4f"), fmt(e.get("ppl_ratio"), ".4f")]
                         for e in rows if e.get("kld") is not None])
        lines += ["", "KLD = mean over scored positions of KL(P_ref ‖ P_model) = Σ P_ref (log P_ref − log P_model), "
                      "as llama-perplexity's --kl-divergence; ppl ratio = ppl(model) / ppl(reference) on the same "
                      "windows.", ""]
    if any(e.bench for e in rows):
        llama = any(e.get("llama_cpp_decode_tokens_per_s") is not None for e in rows)
        lines += ["## Speed and memory (`lowbit bench`)", ""]
        lines += _table(["model", "decode tok/s", "prefill tok/s", "FP decode tok/s", "decode speedup",
                         "weight memory ratio", "peak RSS"] + (["llama.cpp decode tok/s", "llama.cpp prefill tok/s"]
                                                               if llama else []),
                        [[e.label, _with_dtype(e.get("decode_tokens_per_s"), e.bench_facts.get("dtype")),
                          _with_dtype(e.get("prefill_tokens_per_s"), e.bench_facts.get("prefill_dtype")),
                          fmt(e.get("fp_decode_tokens_per_s"), ".1f"), fmt(e.get("decode_speedup"), ".2f", "×"),
                          fmt(e.get("weight_memory_ratio"), ".3f"), fmt_bytes(e.get("peak_rss_bytes"))]
                         + ([fmt(e.get("llama_cpp_decode_tokens_per_s"), ".1f"),
                             fmt(e.get("llama_cpp_prefill_tokens_per_s"), ".1f")] if llama else []) for e in rows])
        lines.append("")
        lines += ["Batch 1, greedy, KV cache; each phase in its faster activation dtype (in brackets); the float "
                  "model timed in the same process. Peak RSS: of the bench process."]
        skipped = [f"{e.label}: {(e.bench_facts.get('llama_cpp') or {}).get('skipped')}" for e in entries
                   if (e.bench_facts.get("llama_cpp") or {}).get("skipped")]
        if skipped:
            lines += ["llama.cpp (`llama-bench`) not measured — " + "; ".join(skipped) + "."]
        lines.append("")
    mach = machines(entries)
    if mach:
        lines += ["## Machine", ""] + mach + [""]
    lines += ["## PoC checklist", ""] + checklist(entries, fp, tolerance) + [""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p[:-4]}]({p})" for p in plots] + [""]
    lines += ["## How to reproduce", "", "```sh"]
    for e in entries:
        cmd, missing = quantize_command(e.meta, e.path) if e.meta else ("", [])
        lines += [f"# {e.label}"] + ([cmd] if cmd else [])
        if missing:
            lines.append("# settings no flag of this lowbit sets (the command above differs in them): "
                         + ", ".join(missing))
        lines += eval_commands(e)
        if e.bench:
            lines.append(bench_command(e))
    if fp and fp.source:
        lines += [f"# {fp.label}", fp_eval_command(fp.source, text, entries, fp_cloze is not None)]
    if command:
        lines += ["# this report", command]
    lines += ["```", ""]
    return "\n".join(lines)


def checklist(entries: list[Entry], fp: Entry | None, tolerance: float) -> list[str]:
    """Quality budget per model (PASS / FAIL), Pareto-optimal and smallest acceptable models, missing measurements."""
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
        out.append(f"- [{'x' if good else ' '}] **{'PASS' if good else 'FAIL'}** {e.label}: ppl {fmt_delta(dp)}, "
                   f"cloze acc {fmt_delta(dc)} (budget `--tolerance {tolerance:g}`: at most {tolerance:g} % worse than FP)")
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
    src = next((e.source for e in entries if e.source), "REF")
    missing = [("perplexity", "lowbit eval DIR --text T", lambda e: e.get("ppl") is None),
               ("cloze accuracy", "lowbit eval DIR --text T --tasks cloze", lambda e: e.get("cloze_accuracy") is None),
               ("KL divergence to FP", f"lowbit eval DIR --text T --kld {src}", lambda e: e.get("kld") is None),
               ("speed", "lowbit bench DIR (recorded in DIR/benches.json)", lambda e: not e.bench),
               ("quantize time", "lowbit quantize records it in lowbit.json; this folder predates that",
                lambda e: e.quantize_seconds is None)]
    for what, how, test in missing:
        names = [e.label for e in entries if test(e)]
        if names:
            out.append(f"- Not measured: {what} for {', '.join(names)} ({how})")
    return out
