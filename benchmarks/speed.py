"""Decode/prefill speed and weight memory of the demo model: FP (fp32, bf16) against packed integer
formats, all measured in one run, plus the memory-bandwidth bound on batch-1 decoding.

    python benchmarks/speed.py [--threads 2] [--new-tokens 32] [--repeats 3] [--work DIR] [--json F]
                               [--dtypes float32] [--exact w4g64] [--extra "GWQ w3g64=DIR,QuIP# 2-bit=DIR"]
                               [--formats "w4g64,w3g64"]

``--exact NAMES`` adds, for those integer formats, a row decoded with float activations (kernel backend
``exact``) next to the default int8-activation decode; ``--extra`` times existing checkpoints (GWQ,
QuIP#, Squeeze10 … from the other benchmarks' ``--keep`` folders) in the same run.

Quantization is RTN without the MSE grid search (kernel speed does not depend on how the codes
were chosen, so GPTQ checkpoints of the same format run at the same speed).  Decode tokens/s are
measured as in ``lowbit bench`` (KV cache, greedy, fixed number of new tokens; the faster of the
float32 and bfloat16 activation dtypes).  The bound: decoding one token reads every weight once, so

    ideal tokens/s = B / bytes_per_token,   B = measured read bandwidth (GB/s, torch sum of 512 MiB)

and ``of ideal`` is measured / ideal.  Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import lowbit
from lowbit import kernels
from lowbit.deploy.bench import DTYPES, quantized_weight_bytes, time_model
from lowbit.eval.memory import model_bytes
from lowbit.models.sources import load_model

DEMO = "smollm2-135m"
FORMATS = {  # name: quantize settings
    "w4g64": dict(bits=4, group_size=64, sym=False),
    "w4g32 sym": dict(bits=4, group_size=32, sym=True),
    "w3g64": dict(bits=3, group_size=64, sym=False),
    "w8 per-row": dict(bits=8, group_size=-1, sym=False),
    "w2g64": dict(bits=2, group_size=64, sym=False),
    "w4g64 + head w8": dict(bits=4, group_size=64, sym=False, head_bits=8),
}


def read_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """Bytes/s of reading a ``mib`` MiB float32 tensor (``torch.sum``), best of ``repeats``."""
    a = torch.empty(mib * 2**20 // 4).uniform_()
    a.sum()
    best = min(_timed(a.sum) for _ in range(repeats))
    return a.numel() * 4 / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def best_of_dtypes(load, args) -> dict:
    """Load the model in each of ``args.dtypes``, time each, keep the faster decode (and its bytes)."""
    best = None
    for name, dtype in DTYPES.items():
        if name not in args.dtypes:
            continue
        model, tok = load(dtype)
        r = time_model(model, tok, args.prompt_tokens, args.new_tokens, args.repeats)
        r.update(dtype=name, bytes=model_bytes(model))
        qb, fp16 = quantized_weight_bytes(model)
        r["ratio"] = qb / fp16 if fp16 else None
        print(f"  {name}: decode {r['decode_tokens_per_s']:.1f} tok/s ({r['decode_tokens_per_cpu_s']:.1f}/CPU-s), "
              f"prefill {r['prefill_tokens_per_s']:.0f} tok/s",
              file=sys.stderr)
        if best is None or r["decode_tokens_per_s"] > best["decode_tokens_per_s"]:
            best = r
        del model
        gc.collect()
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--work", default=None, help="folder for the checkpoints (reused when present)")
    p.add_argument("--json", default=None)
    p.add_argument("--dtypes", default="float32,bfloat16", help="activation dtypes tried (the faster is kept)")
    p.add_argument("--exact", default="", help="comma-separated formats also timed with float activations")
    p.add_argument("--extra", default="", help="comma-separated NAME=DIR checkpoints to time as well")
    p.add_argument("--formats", default=",".join(FORMATS), help="comma-separated RTN formats to time (default: all)")
    args = p.parse_args()
    unknown = set(filter(None, args.formats.split(","))) - set(FORMATS)
    if unknown:
        p.error(f"--formats: unknown {', '.join(sorted(unknown))} (choose from {', '.join(FORMATS)})")
    args.dtypes = args.dtypes.split(",")
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="lowbit-speed-"))
    bw = read_bandwidth()
    rows = {}
    for dname, dtype in DTYPES.items():  # FP rows: each dtype on its own
        if dname not in args.dtypes:
            continue
        print(f"FP {dname}", file=sys.stderr)
        model, tok, _ = load_model(DEMO, dtype=dtype)
        r = time_model(model, tok, args.prompt_tokens, args.new_tokens, args.repeats)
        rows[f"FP {dname}"] = dict(r, dtype=dname, bytes=model_bytes(model), ratio=None)
        del model
        gc.collect()
    for name, cfg in FORMATS.items():
        if name not in args.formats.split(","):
            continue
        out = work / name.replace(" ", "-")
        if not (out / "lowbit.json").exists():
            lowbit.quantize(DEMO, method="rtn", mse=False, out=out, progress=False, **cfg)
        print(name, file=sys.stderr)
        rows[name] = best_of_dtypes(lambda d: lowbit.load(out, device="cpu", dtype=d)[:2], args)
        if name in args.exact.split(","):
            with kernels.use_backend("exact"):
                rows[f"{name} exact"] = best_of_dtypes(lambda d: lowbit.load(out, device="cpu", dtype=d)[:2], args)
    for item in filter(None, args.extra.split(",")):
        name, _, folder = item.partition("=")
        print(name, file=sys.stderr)
        rows[name] = best_of_dtypes(lambda d: lowbit.load(folder, device="cpu", dtype=d)[:2], args)
    fp_rows = [r for k, r in rows.items() if k.startswith("FP ")]
    fp_best = max(r["decode_tokens_per_s"] for r in fp_rows)
    fp_cpu = max(r["decode_tokens_per_cpu_s"] for r in fp_rows)
    print(f"\nthreads {torch.get_num_threads()}, prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, "
          f"median of {args.repeats}; read bandwidth {bw / 1e9:.1f} GB/s\n")
    print("| model | act. dtype | decode tok/s | vs best FP | decode tok/CPU-s | vs best FP | prefill tok/s "
          "| weights MiB | linears / FP16 | ideal decode tok/s | of ideal |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        ideal = bw / r["bytes"]
        r.update(ideal_decode_tokens_per_s=ideal, speedup=r["decode_tokens_per_s"] / fp_best,
                 cpu_speedup=r["decode_tokens_per_cpu_s"] / fp_cpu)
        ratio = "—" if r["ratio"] is None else f"{r['ratio']:.3f}"
        print(f"| {name} | {r['dtype']} | {r['decode_tokens_per_s']:.1f} | {r['speedup']:.2f}x "
              f"| {r['decode_tokens_per_cpu_s']:.1f} | {r['cpu_speedup']:.2f}x "
              f"| {r['prefill_tokens_per_s']:.0f} | {r['bytes'] / 2**20:.0f} | {ratio} | {ideal:.0f} "
              f"| {r['decode_tokens_per_s'] / ideal:.0%} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"bandwidth_bytes_per_s": bw, "threads": torch.get_num_threads(),
                                               "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
