"""GPTQ vs FOEM (both pull-backs, β sweep) vs GWQ (each saliency) on the demo model (issue #3), and
RTN vs AWQ+RTN vs AWQ+GPTQ (issue #15).

Every configuration runs through the real CLI in its own process (see ``common.py``), at each
``--bits`` with group size ``--group-size``: ppl on the evaluation plays, bits/weight, quantize
seconds and peak RSS.  The β sweep runs at the bit widths in ``--sweep-bits`` (others use β = 0.1).

    python benchmarks/methods.py [--bits 3,4] [--betas 0.05,0.1,0.2,0.5] [--max-tokens 8192] [--json F]
"""
from __future__ import annotations

import argparse

from common import add_common_args, fp_row, print_table, quantized_row, select, workdir


def configs(bits: int, gs: int, nsamples: int, betas: list[float], saliencies: list[str]) -> list[tuple[str, list[str]]]:
    base = ["--bits", str(bits), "--group-size", str(gs), "--nsamples", str(nsamples)]
    out = [(f"GPTQ w{bits}g{gs}", ["--method", "gptq", *base])]
    for pullback in ("next", "all"):
        out += [(f"FOEM w{bits}g{gs} {pullback} β={b:g}", ["--method", "foem", "--beta", str(b), "--pullback", pullback, *base])
                for b in betas]
    out += [(f"GWQ w{bits}g{gs} 1% {s}", ["--method", "gwq", "--saliency", s, *base]) for s in saliencies]
    out += [(f"RTN w{bits}g{gs}", ["--method", "rtn", "--bits", str(bits), "--group-size", str(gs)]),
            (f"AWQ+RTN w{bits}g{gs}", ["--method", "awq", *base]),
            (f"AWQ+GPTQ w{bits}g{gs}", ["--method", "awq", "--awq-solver", "gptq", *base])]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap)
    ap.add_argument("--bits", default="3,4")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--betas", default="0.05,0.1,0.2,0.5")
    ap.add_argument("--sweep-bits", default="3", help="bit widths that get the whole β sweep")
    ap.add_argument("--saliencies", default="grad,hessian,magnitude")
    ap.add_argument("--only", default="", help="comma-separated substrings (=NAME: exact): run only matching configs")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    sweep = {int(b) for b in a.sweep_bits.split(",") if b}
    todo = []
    for bits in map(int, a.bits.split(",")):
        betas = [float(b) for b in a.betas.split(",")] if bits in sweep else [0.1]
        todo += configs(bits, a.group_size, a.nsamples, betas, a.saliencies.split(","))
    todo = select(todo, a.only)
    with workdir(a.keep) as tmp:
        rows = [fp_row(a.model, a.text, a.seqlen, a.max_tokens, tmp)]
        for name, args in todo:
            rows.append(quantized_row(name, a.model, args, a.text, a.seqlen, a.max_tokens, tmp))
    print_table(rows, f"{a.model}, text '{a.text}', seqlen {a.seqlen}, {a.max_tokens} tokens scored; "
                      f"calibration {a.nsamples} x {a.seqlen} tokens", a.json)


if __name__ == "__main__":
    main()
