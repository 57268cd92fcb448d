"""DL-QAT vs GPTQ vs RTN on the demo model (issue #5): quality against training steps and LoRA rank.

Every configuration runs through the real CLI in its own process (see ``common.py``): RTN and GPTQ
at ``--bits``/``--group-size``, then DL-QAT for every (steps, rank) pair, trained on the calibration
plays with next-token CE (``--distill``: KL to the FP logits).  With ``--init gptq`` (default) the
DL-QAT runs start from the GPTQ row's checkpoint (``--init DIR``), so GPTQ runs once; their
"quantize s" is the GPTQ row's seconds plus their own.  Evaluation: ppl on the evaluation plays,
``--seqlen`` tokens per window, the first ``--max-tokens`` tokens.  Training windows are
``--train-batch`` × ``--train-seqlen`` tokens per step.

    python benchmarks/qat.py [--steps 50,200] [--ranks 4,8,16] [--train-batch 4] [--train-seqlen 256] [--json F]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from common import add_common_args, folder_bytes, fp_row, lowbit, print_table, quantized_row, workdir


def dlqat_row(name: str, a: argparse.Namespace, steps: int, rank: int, init: str, init_s: float, tmp: Path) -> dict:
    slug = f"dlqat_s{steps}_r{rank}"
    out, qj, ej = tmp / slug, tmp / f"{slug}.q.json", tmp / f"{slug}.e.json"
    lowbit("quantize", a.model, "--method", "dlqat", "--bits", str(a.bits), "--group-size", str(a.group_size),
           "--init", init, "--steps", str(steps), "--lora-rank", str(rank), "--lr", str(a.lr),
           "--seqlen", str(a.train_seqlen), "--batch-size", str(a.train_batch), "--grad-accum", str(a.grad_accum),
           "--nsamples", str(a.nsamples), *(["--distill"] if a.distill else []), "--out", str(out), "--json", str(qj))
    lowbit("eval", str(out), "--text", a.text, "--seqlen", str(a.seqlen), "--max-tokens", str(a.max_tokens),
           "--json", str(ej))
    q, e = json.loads(qj.read_text()), json.loads(ej.read_text())
    row = {"name": name, "ppl": e["ppl"], "bits_per_weight": q["bits_per_weight"], "saved_mb": folder_bytes(out) / 1e6,
           "quantize_s": q["seconds"] + init_s, "peak_rss_mb": q["peak_rss_bytes"] / 1e6,
           "model_mb": e["model_bytes"] / 1e6, "trainable_fraction": q["trainable_fraction"],
           "train_loss_first": q["train_loss_first"], "train_loss_last": q["train_loss_last"],
           "train_s": q["train_seconds"], "s_per_step": q["seconds_per_step"], "train_dtype": q["train_dtype"]}
    print(row, file=sys.stderr, flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--steps", default="50,200")
    ap.add_argument("--ranks", default="8")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--train-seqlen", type=int, default=256)
    ap.add_argument("--train-batch", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--init", default="gptq", help="gptq (from the GPTQ row's checkpoint) or rtn")
    ap.add_argument("--distill", action="store_true")
    ap.add_argument("--fp", action="store_true", help="also evaluate the float model")
    ap.add_argument("--no-rtn", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    t0 = time.perf_counter()
    base = ["--bits", str(a.bits), "--group-size", str(a.group_size), "--nsamples", str(a.nsamples)]
    with workdir(a.keep) as tmp:
        rows = [fp_row(a.model, a.text, a.seqlen, a.max_tokens, tmp)] if a.fp else []
        if not a.no_rtn:
            rows.append(quantized_row(f"RTN w{a.bits}g{a.group_size}", a.model, ["--method", "rtn", *base],
                                      a.text, a.seqlen, a.max_tokens, tmp))
        gptq = quantized_row(f"GPTQ w{a.bits}g{a.group_size}", a.model, ["--method", "gptq", *base],
                             a.text, a.seqlen, a.max_tokens, tmp)
        rows.append(gptq)
        gptq_dir = tmp / "".join(c if c.isalnum() else "_" for c in gptq["name"])
        init, init_s = (str(gptq_dir), gptq["quantize_s"]) if a.init == "gptq" else ("rtn", 0.0)
        for steps in map(int, a.steps.split(",")):
            for rank in map(int, a.ranks.split(",")):
                name = f"DL-QAT w{a.bits}g{a.group_size} {steps} steps r{rank}" + (" KD" if a.distill else "")
                rows.append(dlqat_row(name, a, steps, rank, init, init_s, tmp))
    print_table(rows, f"{a.model}, text '{a.text}', seqlen {a.seqlen}, {a.max_tokens} tokens scored; GPTQ "
                      f"calibration {a.nsamples} x {a.seqlen}; DL-QAT init {a.init}, {a.train_batch}x{a.grad_accum} x "
                      f"{a.train_seqlen} tokens/step, lr {a.lr}, {'KL to FP' if a.distill else 'CE'} on the "
                      f"calibration plays", a.json)
    print("\n| config | trainable | train loss first → last | train s | s/step | dtype |\n|---|---|---|---|---|---|")
    for r in rows:
        if "train_s" in r:
            print(f"| {r['name']} | {100 * r['trainable_fraction']:.2f} % | {r['train_loss_first']:.3f} → "
                  f"{r['train_loss_last']:.3f} | {r['train_s']:.0f} | {r['s_per_step']:.1f} | {r['train_dtype']} |")
    print(f"\ntotal wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
