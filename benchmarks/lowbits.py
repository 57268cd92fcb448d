"""Squeeze10 (~1.9 bits/weight) and its ablations vs GPTQ w2g64 on the demo model (issue #5).

Rows, each through the real CLI in its own process (see ``common.py``):

* GPTQ w2g64 — the 2-bit baseline the target compares against;
* Squeeze10 — staged (4-bit first), PBAR cell selection, FIAS (FP targets): the defaults;
* ablations: ``one-shot`` (cells scored against FP, no 4-bit stage), ``magnitude`` (instead of PBAR),
  ``no FIAS`` (Hessians from the quantized stream);
* PB-LLM-style — partial binarization chosen by magnitude, in one shot, without FIAS: all three
  ablations at once, the closest plain binarization baseline at the same bits;
* all-binary — every cell 1-bit (BiLLM-style binarization without residuals), ~1.3 bits/weight.

    python benchmarks/lowbits.py [--max-tokens 8192] [--only Squeeze10,GPTQ] [--json F]
"""
from __future__ import annotations

import argparse

from common import add_common_args, fp_row, print_table, quantized_row, select, workdir


def configs(gs: int, nsamples: int) -> list[tuple[str, list[str]]]:
    sq = ["--method", "squeeze", "--group-size", str(gs), "--nsamples", str(nsamples)]
    return [
        ("GPTQ w2g64", ["--method", "gptq", "--bits", "2", "--group-size", "64", "--nsamples", str(nsamples)]),
        (f"Squeeze10 g{gs}", sq),
        (f"Squeeze10 g{gs} one-shot", [*sq, "--one-shot"]),
        (f"Squeeze10 g{gs} magnitude", [*sq, "--squeeze-score", "magnitude"]),
        (f"Squeeze10 g{gs} no FIAS", [*sq, "--no-fp-targets"]),
        (f"PB-LLM-style g{gs}", [*sq, "--one-shot", "--squeeze-score", "magnitude", "--no-fp-targets"]),
        (f"all-binary g{gs}", [*sq, "--binary-frac", "1.0"]),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--only", default="", help="comma-separated substrings (=NAME: exact): run only matching configs")
    ap.add_argument("--no-fp", action="store_true", help="skip the FP row")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    todo = configs(a.group_size, a.nsamples)
    todo = select(todo, a.only)
    with workdir(a.keep) as tmp:
        rows = [] if a.no_fp else [fp_row(a.model, a.text, a.seqlen, a.max_tokens, tmp)]
        rows += [quantized_row(name, a.model, args, a.text, a.seqlen, a.max_tokens, tmp) for name, args in todo]
    print_table(rows, f"{a.model}, text '{a.text}', seqlen {a.seqlen}, {a.max_tokens} tokens scored; "
                      f"calibration {a.nsamples} x {a.seqlen} tokens", a.json)


if __name__ == "__main__":
    main()
