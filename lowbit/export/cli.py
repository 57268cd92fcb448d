"""``lowbit export DIR --format gguf|gptq|compressed-tensors --out PATH [--requantize TYPE] [--dtype f16|f32]
[--check [--text SRC]] [--json F]``.

Registered through ``lowbit.cli._EXTENSIONS``; bad input is a :class:`LowbitError` (one line, exit 2).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import LowbitError

FOLDER_FORMATS = ("gptq", "compressed-tensors")  # --out is a folder (new or empty); for the others a file


def _target(a: argparse.Namespace) -> Path:
    """Check ``--out`` before the work -> where to export: ``--out`` itself, or with ``--force`` over an
    existing path a temporary sibling that replaces it only once the export is complete."""
    from ..outputs import check_file, check_folder

    out = Path(a.out)
    if a.format in FOLDER_FORMATS:
        check_folder(out, "--out", lambda p: False, "an empty folder", force=a.force)
    else:
        check_file(out, "--out", force=a.force)
    if out.exists() or out.is_symlink():
        return out.with_name(f".{out.name}.export-{os.getpid()}")
    return out


def cmd_export(a: argparse.Namespace) -> int:
    from ..outputs import remove
    from ..packed.checkpoint import swap_into_place

    if a.check_windows < 1:
        raise LowbitError(f"--check-windows must be >= 1 (got {a.check_windows})")
    out = Path(a.out)
    target = _target(a)
    if a.json:
        from ..outputs import check_file

        check_file(a.json, "--json", force=a.force)
    try:
        r, detail = _export(a, str(target))
    except BaseException:
        if target != out:
            remove(target)
        raise
    if target != out:
        try:
            swap_into_place(target, out)
        except OSError as e:
            remove(target)
            raise LowbitError(f"--out '{out}': cannot replace it ({e.strerror or e})") from None
    if not a.quiet:
        print(f"exported {a.model} as {a.format}: {detail}, {r['bytes'] / 2**20:.1f} MiB -> {out}")
    r = {**r, "out": str(out), "format": a.format}
    if a.check:
        from .check import check_export, describe

        r["check"] = check_export(a.model, out, a.format, text=a.text, windows=a.check_windows)
        if not a.quiet:
            print("\n".join(describe(r["check"])))
    if a.json:
        from ..jsonio import write_json

        write_json(a.json, r, "--json", force=a.force)
    return 0


def _export(a: argparse.Namespace, out: str) -> tuple[dict, str]:
    """Write the export to ``out`` -> (the exporter's report, a one-line summary)."""
    from . import export_compressed_tensors, export_gguf, export_gptq

    if a.format == "gguf":
        if a.checkpoint_format is not None:
            raise LowbitError("--checkpoint-format applies to --format gptq only")
        r = export_gguf(a.model, out, requantize=a.requantize, dtype=a.dtype or "f16")
        what = ", ".join(f"{n} {t}" for t, n in sorted(r["types"].items()))
        detail = f"{what} layers ({r['lossless']} lossless, {r['requantized']} requantized)"
    elif a.requantize is not None or a.dtype is not None:
        raise LowbitError("--requantize and --dtype apply to --format gguf only")
    elif a.format == "gptq":
        r = export_gptq(a.model, out, checkpoint_format=a.checkpoint_format)
        detail = (f"{r['layers']} layers w{r['bits']}g{r['group_size']} {'sym' if r['sym'] else 'asym'}"
                  f"{', desc_act' if r['desc_act'] else ''}, {r['checkpoint_format']}")
    else:
        if a.checkpoint_format is not None:
            raise LowbitError("--checkpoint-format applies to --format gptq only")
        r = export_compressed_tensors(a.model, out)
        detail = f"{r['layers']} layers " + ", ".join(
            f"{g['layers']}× w{g['bits']}g{g['group_size']} {'sym' if g['sym'] else 'asym'}" for g in r["groups"])
    return r, detail


def register(sub) -> None:
    e = sub.add_parser("export", help="write a lowbit checkpoint as GGUF, GPTQ or compressed-tensors")
    e.add_argument("model", help="lowbit checkpoint folder")
    e.add_argument("--format", required=True, choices=("gguf", "gptq", "compressed-tensors"))
    e.add_argument("--out", required=True,
                   help="the .gguf file, or the GPTQ / compressed-tensors folder (new or empty); written atomically")
    e.add_argument("--requantize", default=None, metavar="TYPE",
                   help="gguf: re-quantize layers with no lossless GGUF type to TYPE "
                        "(Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, F16, F32); default: refuse them")
    e.add_argument("--dtype", default=None, choices=("f16", "f32"),
                   help="gguf: type of unquantized 2-D tensors (embeddings, head; default f16); norms are f32")
    e.add_argument("--checkpoint-format", default=None, choices=("gptq", "gptq_v2"),
                   help="gptq: 'gptq' (v1, zeros stored minus one) or 'gptq_v2'; default: gptq for "
                        "symmetric grids, gptq_v2 for asymmetric ones (what GPTQModel and vLLM load)")
    e.add_argument("--check", action="store_true",
                   help="after writing, load the export with its client (GPTQModel; transformers + compressed-tensors; "
                        "transformers' GGUF reader and llama-perplexity) and print its perplexity vs lowbit's")
    e.add_argument("--text", default="default", help="--check: evaluation text (default: the embedded eval plays)")
    e.add_argument("--check-windows", type=int, default=4, metavar="W",
                   help="--check: windows of 512 tokens (default 4)")
    e.add_argument("--json", default=None, metavar="F", help="write the export report (and --check results) as JSON")
    e.add_argument("--force", action="store_true", help="replace an existing --out file, or a folder that is not empty")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_export)
