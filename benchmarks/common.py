"""What every benchmark script shares: run the real CLI in its own process, collect one table row.

Each configuration is quantized and evaluated by ``python -m lowbit`` in a fresh process, so the
``peak_rss_bytes`` a row reports is that run's own peak, and rows are comparable within one run.
"""
from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def lowbit(*args: str) -> None:
    """Run ``python -m lowbit ARGS --quiet --force`` (a re-run replaces its own outputs); raise if it fails."""
    subprocess.run([sys.executable, "-m", "lowbit", *args, "--quiet", "--force"], check=True)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def fp_row(model: str, text: str, seqlen: int, max_tokens: int, tmp: Path) -> dict:
    """The float model's row: ppl and weights in memory (fp32 on CPU)."""
    ev = tmp / "fp.json"
    lowbit("eval", model, "--text", text, "--seqlen", str(seqlen), "--max-tokens", str(max_tokens), "--json", str(ev))
    e = json.loads(ev.read_text())
    return {"name": "FP", "ppl": e["ppl"], "bits_per_weight": 16.0, "saved_mb": None, "quantize_s": None,
            "peak_rss_mb": None, "model_mb": e["model_bytes"] / 1e6}


def quantized_row(name: str, model: str, quant_args: list[str], text: str, seqlen: int, max_tokens: int,
                  tmp: Path) -> dict:
    """Quantize ``model`` with ``quant_args`` (CLI flags), evaluate it, and return its row."""
    slug = "".join(c if c.isalnum() else "_" for c in name)
    out, qj, ej = tmp / slug, tmp / f"{slug}.q.json", tmp / f"{slug}.e.json"
    lowbit("quantize", model, *quant_args, "--seqlen", str(seqlen), "--out", str(out), "--json", str(qj))
    lowbit("eval", str(out), "--text", text, "--seqlen", str(seqlen), "--max-tokens", str(max_tokens),
           "--json", str(ej))
    q, e = json.loads(qj.read_text()), json.loads(ej.read_text())
    row = {"name": name, "ppl": e["ppl"], "bits_per_weight": q["bits_per_weight"], "saved_mb": folder_bytes(out) / 1e6,
           "quantize_s": q["seconds"], "peak_rss_mb": q["peak_rss_bytes"] / 1e6, "model_mb": e["model_bytes"] / 1e6}
    print(row, file=sys.stderr, flush=True)
    return row


def print_table(rows: list[dict], header: str, json_path: str | None = None) -> None:
    """Markdown table of ``rows`` after a one-line ``header``; optionally the raw rows as JSON."""
    fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
    print(f"\n{header}\n")
    print("| config | ppl | bits/weight | saved MB | weights in memory MB | quantize s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['ppl']:.3f} | {r['bits_per_weight']:.3f} | {fmt(r['saved_mb'], '.1f')} | "
              f"{r['model_mb']:.1f} | {fmt(r['quantize_s'], '.1f')} | {fmt(r['peak_rss_mb'], '.0f')} |", flush=True)
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=1) + "\n")


def select(todo: list[tuple[str, list[str]]], only: str) -> list[tuple[str, list[str]]]:
    """Keep the configs whose name contains one of the comma-separated ``only`` substrings
    (``=NAME`` matches the whole name exactly); all when ``only`` is empty."""
    keys = [s for s in only.split(",") if s]
    if not keys:
        return todo
    return [c for c in todo if any(c[0] == s[1:] if s.startswith("=") else s in c[0] for s in keys)]


def add_common_args(ap, max_tokens: int = 8192) -> None:
    """The flags every benchmark shares: model, evaluation text and window, calibration size."""
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--text", default="default", help="evaluation text (default: the evaluation plays)")
    ap.add_argument("--max-tokens", type=int, default=max_tokens, help="tokens of --text scored")
    ap.add_argument("--seqlen", type=int, default=512, help="evaluation and calibration window")
    ap.add_argument("--nsamples", type=int, default=64, help="calibration windows")
    ap.add_argument("--keep", default=None, metavar="DIR",
                    help="write the quantized folders and JSONs under DIR and keep them (default: a temporary folder)")


@contextlib.contextmanager
def workdir(keep: str | None):
    """The folder the rows write into: ``keep`` (created, kept) or a temporary one (deleted after)."""
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        yield Path(keep)
        return
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)
