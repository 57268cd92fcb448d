"""QuIP# (2/3/4 bits, ablations, fine-tuning) vs GPTQ w{2,3,4}g64 on the demo model (issue #4).

Every configuration runs through the real CLI in its own process (see ``common.py``): ppl on the evaluation
plays, bits/weight (everything stored: codes, scales, signs), quantize seconds and peak RSS.  Rows:

* ``GPTQ w{b}g64``                — the group-wise integer baseline (≈ b + 0.5 bits/weight with fp16 scale+zero);
* ``QuIP# {b}-bit``               — RHT + BlockLDLQ + E8P (RVQ at 3/4 bits);
* ``QuIP# 2-bit finetune``        — plus per-block fine-tuning of signs and scales (``--finetune``);
* ``QuIP# {b}-bit no-RHT``        — ablation: no incoherence transform;
* ``QuIP# {b}-bit scalar``        — ablation: a uniform scalar grid of the same bits instead of E8P.

Subprocesses get ``OMP_NUM_THREADS=--threads`` (default 1: on a shared CPU, more threads than free cores makes
the many small per-block ops of every solver far slower).

    python benchmarks/quip.py [--bits 2,3,4] [--only "QuIP# 2,GPTQ w2"] [--max-tokens 8192] [--json F]
"""
from __future__ import annotations

import argparse
import os

from common import add_common_args, fp_row, print_table, quantized_row, select, workdir


def configs(bits: int, nsamples: int, ft_steps: int) -> list[tuple[str, list[str]]]:
    common = ["--bits", str(bits), "--nsamples", str(nsamples)]
    quip = ["--method", "quip", *common]
    out = [(f"GPTQ w{bits}g64", ["--method", "gptq", "--group-size", "64", *common]),
           (f"QuIP# {bits}-bit", quip)]
    if bits == 2:
        out.append((f"QuIP# {bits}-bit finetune", [*quip, "--finetune", "--ft-steps", str(ft_steps)]))
    out += [(f"QuIP# {bits}-bit no-RHT", [*quip, "--no-rht"]),
            (f"QuIP# {bits}-bit scalar", [*quip, "--codebook", "scalar"])]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--bits", default="2,3,4")
    ap.add_argument("--ft-steps", type=int, default=50)
    ap.add_argument("--threads", default="1", help="OMP_NUM_THREADS of the subprocesses ('' = leave as is)")
    ap.add_argument("--no-fp", action="store_true", help="skip the FP row")
    ap.add_argument("--only", default="", help="comma-separated substrings (=NAME: exact): run only matching configs")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    if a.threads:
        os.environ["OMP_NUM_THREADS"] = a.threads

    todo = [c for bits in map(int, a.bits.split(",")) for c in configs(bits, a.nsamples, a.ft_steps)]
    todo = select(todo, a.only)
    with workdir(a.keep) as tmp:
        rows = [] if a.no_fp else [fp_row(a.model, a.text, a.seqlen, a.max_tokens, tmp)]
        for name, args in todo:
            rows.append(quantized_row(name, a.model, args, a.text, a.seqlen, a.max_tokens, tmp))
    print_table(rows, f"{a.model}, text '{a.text}', seqlen {a.seqlen}, {a.max_tokens} tokens scored; "
                      f"calibration {a.nsamples} x {a.seqlen} tokens", a.json)


if __name__ == "__main__":
    main()
