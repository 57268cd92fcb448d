"""Subcommands ``lowbit generate`` and ``lowbit bench`` (registered through ``lowbit.cli._EXTENSIONS``)."""
from __future__ import annotations

import argparse
import sys

from ..cli import SEED
from ..jsonio import finite_float


def cmd_generate(a: argparse.Namespace) -> int:
    from .generate import generate

    generate(a.model, a.prompt, a.max_new_tokens, fp=a.fp, temperature=a.temperature, seed=a.seed,
             chat=not a.no_chat)
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    from ..cli import _check_json, _write_json
    from .bench import bench

    _check_json(a)
    dtypes = tuple(d.strip() for d in a.dtypes.split(",") if d.strip())
    r = bench(a.model, prompt_tokens=a.prompt_tokens, new_tokens=a.new_tokens, repeats=a.repeats,
              threads=a.threads, dtypes=dtypes, fp=not a.no_fp, llama_cpp=not a.no_llama_bench, gguf=a.gguf,
              progress=(lambda *_: None) if a.quiet else (lambda s: print(s, file=sys.stderr)))
    _write_json(a.json, r, force=a.force)
    line = (f"decode {r['decode_tokens_per_s']:.1f} tok/s ({r['dtype']}), prefill {r['prefill_tokens_per_s']:.0f} tok/s "
            f"({r['prefill_dtype']}), "
            f"weights {r['weight_memory_ratio']:.3f} of FP16, peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB")
    if "fp_decode_tokens_per_s" in r:
        line += (f"; FP ({r['fp_dtype']}) decode {r['fp_decode_tokens_per_s']:.1f} tok/s, "
                 f"prefill {r['fp_prefill_tokens_per_s']:.0f} tok/s; decode speedup {r['decode_speedup']:.2f}x")
    lc = r.get("llama_cpp") or {}
    if "decode_tokens_per_s" in lc:
        line += f"; llama.cpp decode {lc['decode_tokens_per_s']:.1f} tok/s, prefill {lc.get('prefill_tokens_per_s', 0):.0f} tok/s"
    print(line)
    return 0


def _int(name: str):
    """An integer flag; its range is checked by the command (LowbitError: one line, exit 2)."""
    def parse(s: str) -> int:
        try:
            return int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {s!r}") from None
    return parse


def register(sub) -> None:
    g = sub.add_parser("generate", help="generate text with a lowbit checkpoint (or any model), streamed")
    g.add_argument("model", help="lowbit folder, model folder, .gguf, hub id or 'smollm2-135m'")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=_int("--max-new-tokens"), default=128)
    g.add_argument("--fp", action="store_true", help="run the checkpoint's float source model instead")
    g.add_argument("--temperature", type=finite_float, default=0.0, help="0 = greedy (default); > 0 samples")
    g.add_argument("--seed", type=SEED, default=0)
    g.add_argument("--no-chat", action="store_true", help="do not apply the tokenizer's chat template")
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="decode/prefill tokens/s and memory of a checkpoint vs its float source")
    b.add_argument("model", help="lowbit checkpoint folder")
    b.add_argument("--json", default=None, help="write decode_tokens_per_s, fp_decode_tokens_per_s, decode_speedup, "
                   "prefill_tokens_per_s, weight_memory_ratio, peak_rss_bytes, …")
    b.add_argument("--prompt-tokens", type=_int("--prompt-tokens"), default=128)
    b.add_argument("--new-tokens", type=_int("--new-tokens"), default=64)
    b.add_argument("--repeats", type=_int("--repeats"), default=3)
    b.add_argument("--threads", type=_int("--threads"), default=None, help="torch threads (default: torch's)")
    b.add_argument("--dtypes", default="float32,bfloat16",
                   help="dtypes tried for both models; each phase (decode, prefill) keeps its faster one")
    b.add_argument("--no-fp", action="store_true", help="skip the float baseline")
    b.add_argument("--force", action="store_true", help="replace an existing --json file")
    b.add_argument("--gguf", default=None, help="time this GGUF with llama-bench (default: a lossless export of DIR)")
    b.add_argument("--no-llama-bench", action="store_true", help="skip llama.cpp's llama-bench even when on PATH")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(func=cmd_bench)

