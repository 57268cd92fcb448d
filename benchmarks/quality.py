"""Quality, size, time and memory of FP, RTN and GPTQ on the demo model (issue #2's table).

Every configuration runs through the real CLI in its own process (see ``common.py``).
Prints a Markdown table; ``--json F`` also writes the raw rows.

    python benchmarks/quality.py [--max-tokens 20480] [--configs w4g64,w4g128,w3g64] [--json F]
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import add_common_args, fp_row, print_table, quantized_row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(ap, max_tokens=20480)
    ap.add_argument("--configs", default="w4g64,w4g128,w3g64")
    ap.add_argument("--methods", default="rtn,gptq")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows = [fp_row(a.model, a.text, a.seqlen, a.max_tokens, tmp)]
        for cfg in a.configs.split(","):
            bits, gs = cfg[1:].split("g")
            for method in a.methods.split(","):
                rows.append(quantized_row(f"{method.upper()} {cfg}", a.model,
                                          ["--method", method, "--bits", bits, "--group-size", gs,
                                           "--nsamples", str(a.nsamples)], a.text, a.seqlen, a.max_tokens, tmp))
    print_table(rows, f"{a.model}, text '{a.text}', seqlen {a.seqlen}, {a.max_tokens} tokens scored; "
                      f"calibration {a.nsamples} x {a.seqlen} tokens", a.json)


if __name__ == "__main__":
    main()
