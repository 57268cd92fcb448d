"""Squeeze10 (~1.9 bits/weight) and its ablations vs GPTQ w2g64 on the demo model (issue #5).

Rows, each through the real CLI in its own process (see ``common.py``):

* GPTQ w2g64 — the 2-bit baseline the target compares against; ``+ FIAS``: the same with ``--fp-targets``;
* Squeeze10 — staged (4-bit first), PBAR cell selection, FIAS (FP targets): the defaults;
* Squeeze10 + scale fit — the same, then FIAS's per-block fit of the cells' scales (``--finetune``);
* ablations: ``one-shot`` (cells scored against FP, no 4-bit stage), ``magnitude`` (instead of PBAR),
  ``no FIAS`` (Hessians from the quantized stream);
* PB-LLM-style — partial binarization chosen by magnitude, in one shot, without FIAS: all three
  ablations at once, the closest plain binarization baseline at the same bits;
* all-binary — every cell 1-bit (BiLLM-style binarization without residuals), ~1.3 bits/weight.

    python benchmarks/lowbits.py [--max-tokens 8192] [--only Squeeze10,GPTQ] [--binary-frac 0.8] [--json F]
"""
from __future__ import annotations

import argparse

from common import add_common_args, fp_row, print_table, quantized_row, select, workdir


def configs(gs: int, nsamples: int, bf: float = 0.8, ft_lr: float = 5e-3) -> list[tuple[str, list[str]]]:
    tag = f"g{gs}" if bf == 0.8 else f"g{gs} bf{bf:g}"
    sq = ["--method", "squeeze", "--group-size", str(gs), "--nsamples", str(nsamples), "--binary-frac", str(bf)]
    return [
        ("GPTQ w2g64", ["--method", "gptq", "--bits", "2", "--group-size", "64", "--nsamples", str(nsamples)]),
        ("GPTQ w2g64 + FIAS", ["--method", "gptq", "--bits", "2", "--group-size", "64", "--nsamples", str(nsamples),
                               "--fp-targets"]),
        (f"Squeeze10 {tag}", sq),
        (f"Squeeze10 {tag} + scale fit", [*sq, "--finetune", "--ft-lr", str(ft_lr)]),
        (f"Squeeze10 {tag} one-shot", [*sq, "--one-shot"]),
        (f"Squeeze10 {tag} magnitude", [*sq, "--squeeze-score", "magnitude"]),
        (f"Squeeze10 {tag} no FIAS", [*sq, "--no-fp-targets"]),
        (f"PB-LLM-style {tag}", [*sq, "--one-shot", "--squeeze-score", "magnitude", "--no-fp-targets"]),
        (f"all-binary g{gs}", [*sq[:-2], "--binary-frac", "1.0"]),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--binary-frac", type=float, default=0.8, help="fraction of binary cells in the Squeeze10 rows")
    ap.add_argument("--ft-lr", type=float, default=5e-3, help="learning rate of the '+ scale fit' row")
    ap.add_argument("--only", default="", help="comma-separated substrings (=NAME: exact): run only matching configs")
    ap.add_argument("--no-fp", action="store_true", help="skip the FP row")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    todo = configs(a.group_size, a.nsamples, a.binary_frac, a.ft_lr)
    todo = select(todo, a.only)
    with workdir(a.keep) as tmp:
        rows = [] if a.no_fp else [fp_row(a.model, a.text, a.seqlen, a.max_tokens, tmp)]
        rows += [quantized_row(name, a.model, args, a.text, a.seqlen, a.max_tokens, tmp) for name, args in todo]
    print_table(rows, f"{a.model}, text '{a.text}', seqlen {a.seqlen}, {a.max_tokens} tokens scored; "
                      f"calibration {a.nsamples} x {a.seqlen} tokens", a.json)


if __name__ == "__main__":
    main()
