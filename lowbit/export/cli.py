"""``lowbit export DIR --format gguf|gptq --out PATH [--requantize TYPE] [--dtype f16|f32]``.

Registered through ``lowbit.cli._EXTENSIONS``; bad input is a :class:`LowbitError` (one line, exit 2).
"""
from __future__ import annotations

import argparse

from ..errors import LowbitError


def cmd_export(a: argparse.Namespace) -> int:
    from . import export_gguf, export_gptq

    if a.format == "gguf":
        if a.checkpoint_format is not None:
            raise LowbitError("--checkpoint-format applies to --format gptq only")
        r = export_gguf(a.model, a.out, requantize=a.requantize, dtype=a.dtype or "f16")
        what = ", ".join(f"{n} {t}" for t, n in sorted(r["types"].items()))
        detail = f"{what} layers ({r['lossless']} lossless, {r['requantized']} requantized)"
    else:
        if a.requantize is not None or a.dtype is not None:
            raise LowbitError("--requantize and --dtype apply to --format gguf only")
        r = export_gptq(a.model, a.out, checkpoint_format=a.checkpoint_format or "gptq")
        detail = (f"{r['layers']} layers w{r['bits']}g{r['group_size']} {'sym' if r['sym'] else 'asym'}"
                  f"{', desc_act' if r['desc_act'] else ''}")
    if not a.quiet:
        print(f"exported {a.model} as {a.format}: {detail}, {r['bytes'] / 2**20:.1f} MiB -> {r['out']}")
    return 0


def register(sub) -> None:
    e = sub.add_parser("export", help="write a lowbit checkpoint as GGUF or as a GPTQ checkpoint")
    e.add_argument("model", help="lowbit checkpoint folder")
    e.add_argument("--format", required=True, choices=("gguf", "gptq"))
    e.add_argument("--out", required=True, help="the .gguf file, or the GPTQ folder (new or empty); written atomically")
    e.add_argument("--requantize", default=None, metavar="TYPE",
                   help="gguf: re-quantize layers with no lossless GGUF type to TYPE "
                        "(Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, F16, F32); default: refuse them")
    e.add_argument("--dtype", default=None, choices=("f16", "f32"),
                   help="gguf: type of unquantized 2-D tensors (embeddings, head; default f16); norms are f32")
    e.add_argument("--checkpoint-format", default=None, choices=("gptq", "gptq_v2"),
                   help="gptq: 'gptq' (v1, zeros stored minus one; default) or 'gptq_v2'")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_export)
