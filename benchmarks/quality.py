"""Quality, size, time and memory of FP, RTN and GPTQ on the demo model (issue #2's table).

Every configuration runs through the real CLI in its own process, so ``peak_rss_bytes`` is that
run's own peak.  Prints a Markdown table; ``--json F`` also writes the raw rows.

    python benchmarks/quality.py [--max-tokens 20480] [--configs w4g64,w4g128,w3g64] [--json F]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def lowbit(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "lowbit", *args, "--quiet"], check=True)


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--text", default="default")
    ap.add_argument("--max-tokens", type=int, default=20480)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--configs", default="w4g64,w4g128,w3g64")
    ap.add_argument("--methods", default="rtn,gptq")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ev = tmp / "fp.json"
        lowbit("eval", a.model, "--text", a.text, "--seqlen", str(a.seqlen), "--max-tokens", str(a.max_tokens),
               "--json", str(ev))
        e = json.loads(ev.read_text())
        rows.append({"name": "FP", "ppl": e["ppl"], "bits_per_weight": 16.0, "saved_mb": None,
                     "quantize_s": None, "peak_rss_mb": None, "model_mb": e["model_bytes"] / 1e6})
        for cfg in a.configs.split(","):
            bits, gs = cfg[1:].split("g")
            for method in a.methods.split(","):
                out, qj, ej = tmp / f"{method}-{cfg}", tmp / f"{method}-{cfg}.q.json", tmp / f"{method}-{cfg}.e.json"
                lowbit("quantize", a.model, "--method", method, "--bits", bits, "--group-size", gs,
                       "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--out", str(out), "--json", str(qj))
                lowbit("eval", str(out), "--text", a.text, "--seqlen", str(a.seqlen), "--max-tokens",
                       str(a.max_tokens), "--json", str(ej))
                q, e = json.loads(qj.read_text()), json.loads(ej.read_text())
                rows.append({"name": f"{method.upper()} {cfg}", "ppl": e["ppl"], "bits_per_weight": q["bits_per_weight"],
                             "saved_mb": folder_bytes(out) / 1e6, "quantize_s": q["seconds"],
                             "peak_rss_mb": q["peak_rss_bytes"] / 1e6, "model_mb": e["model_bytes"] / 1e6})
                print(rows[-1], file=sys.stderr, flush=True)

    fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
    print(f"\n{a.model}, text '{a.text}', seqlen {a.seqlen}, {a.max_tokens} tokens scored; "
          f"calibration {a.nsamples} x {a.seqlen} tokens\n")
    print("| config | ppl | bits/weight | saved MB | weights in memory MB | quantize s | peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['ppl']:.3f} | {r['bits_per_weight']:.3f} | {fmt(r['saved_mb'], '.1f')} | "
              f"{r['model_mb']:.1f} | {fmt(r['quantize_s'], '.1f')} | {fmt(r['peak_rss_mb'], '.0f')} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
