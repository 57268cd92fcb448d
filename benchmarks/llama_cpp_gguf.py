"""lowbit's GGUF against llama.cpp's own quantizer (issue #16, part 7): same types, ppl and KLD by llama-perplexity.

For each ``--types`` entry (a GGUF type or a llama.cpp preset name as ``llama-quantize`` spells it):

* ``llama-quantize``: the float GGUF of the demo model (``llama-quantize --allow-requantize … F32`` of its Q4_1
  file) quantized without and with an importance matrix (``llama-imatrix`` on the calibration plays, the same
  windows size lowbit calibrates on);
* lowbit: ``lowbit quantize --method M --gguf-type T`` (M in ``--methods``), ``lowbit export --format gguf``;

then every file is scored by ``llama-perplexity`` on the evaluation plays (its protocol: windows of ``--ctx``,
the second half of each scored), with the KL divergence of its next-token distributions from the float GGUF's
(``--kl-divergence-base``) and the file size.  No timing (``llama-bench``) here: run it on a quiet machine.

    python benchmarks/llama_cpp_gguf.py [--types Q4_0,IQ4_NL] [--methods gptq] [--nsamples 32] [--chunks 16] [--work DIR]

The llama.cpp binaries come from PATH (or ``$LOWBIT_LLAMA_CPP_BIN``); ``../shared/docs/peers.md`` says how
to build them from the sources vendored in the llama-cpp-python sdist.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from common import lowbit as cli


def binary(name: str) -> str:
    env = os.environ.get("LOWBIT_LLAMA_CPP_BIN")
    found = str(Path(env) / name) if env and (Path(env) / name).is_file() else shutil.which(name)
    if not found:
        sys.exit(f"llama_cpp_gguf.py: {name} not found (PATH or $LOWBIT_LLAMA_CPP_BIN); see ../shared/docs/peers.md")
    return found


def run(*cmd: str) -> str:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"llama_cpp_gguf.py: {' '.join(map(str, cmd[:3]))} … failed:\n{r.stderr[-3000:]}")
    return r.stdout + r.stderr


def perplexity(gguf: Path, text: Path, ctx: int, chunks: int, base: Path, threads: int) -> dict:
    """llama-perplexity's final ppl and, against the float logits in ``base``, its mean KLD and top-1 agreement."""
    common = ["-f", text, "-c", str(ctx), "--chunks", str(chunks), "-t", str(threads)]
    out = run(binary("llama-perplexity"), "-m", gguf, *common, "--kl-divergence-base", base, "--kl-divergence")
    num = r"([-+0-9.eE]+)"
    ppl = re.search(rf"Mean PPL\(Q\)\s*:\s*{num}", out) or re.search(rf"Final estimate: PPL = {num}", out)
    kld = re.search(rf"Mean\s+KLD:\s*{num}", out)
    top1 = re.search(rf"Same top p:\s*{num}", out)
    return {"ppl": float(ppl.group(1)) if ppl else None, "kld": float(kld.group(1)) if kld else None,
            "same_top_pct": float(top1.group(1)) if top1 else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="Q4_0,Q4_1,IQ4_NL,Q4_K_M,Q3_K_M,Q2_K,IQ3_XXS,IQ2_XS",
                    help="llama-quantize type names; lowbit gets the same --gguf-type (see --presets)")
    ap.add_argument("--methods", default="gptq", help="lowbit methods, comma-separated (gptq, foem, rtn)")
    ap.add_argument("--nsamples", type=int, default=32, help="calibration windows (lowbit and llama-imatrix)")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--ctx", type=int, default=512, help="llama-perplexity window")
    ap.add_argument("--chunks", type=int, default=16, help="llama-perplexity windows scored")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--presets", action="store_true", help="lowbit with the preset of each name (MOSTLY_Q4_0 …), "
                                                             "not the plain type")
    ap.add_argument("--work", default="gguf-bench", help="working folder (kept; finished steps are reused)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    from lowbit.data.text import read_text
    from lowbit.gguf import canonical, is_preset
    from lowbit.models.sources import demo_gguf_path

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    calib, text = work / "calib.txt", work / "eval.txt"
    calib.write_text(read_text("default", split="calib"))
    text.write_text(read_text("default", split="eval"))
    f32 = work / "f32.gguf"
    if not f32.is_file():
        run(binary("llama-quantize"), "--allow-requantize", demo_gguf_path(), f32, "F32")
    base = work / "f32.kld"
    if not base.is_file():
        run(binary("llama-perplexity"), "-m", f32, "-f", text, "-c", str(a.ctx), "--chunks", str(a.chunks),
            "-t", str(a.threads), "--kl-divergence-base", base)
    imatrix = work / "imatrix.gguf"
    if not imatrix.is_file():
        run(binary("llama-imatrix"), "-m", f32, "-f", calib, "-c", str(a.seqlen), "--chunks", str(a.nsamples),
            "-t", str(a.threads), "-o", imatrix)
    rows = [{"name": "F32 (llama.cpp)", "type": "F32", "mb": f32.stat().st_size / 1e6,
             **perplexity(f32, text, a.ctx, a.chunks, base, a.threads)}]
    for t in [s for s in a.types.split(",") if s]:
        for imx in (False, True):
            out = work / f"llama-{t}{'-imatrix' if imx else ''}.gguf"
            if not out.is_file():
                run(binary("llama-quantize"), *(["--imatrix", imatrix] if imx else []), f32, out, t)
            rows.append({"name": f"llama-quantize {t}{' + imatrix' if imx else ''}", "type": t,
                         "mb": out.stat().st_size / 1e6, **perplexity(out, text, a.ctx, a.chunks, base, a.threads)})
            print(rows[-1], file=sys.stderr, flush=True)
        # llama-quantize's "Q4_0" is its preset (output head Q6_K …); lowbit keeps the head float and with a type
        # name solves every linear on that type (--pure); --presets asks for lowbit's spelling of the preset
        ours = canonical(f"MOSTLY_{t}" if a.presets and is_preset(canonical(f"MOSTLY_{t}")) else t)
        for method in [m for m in a.methods.split(",") if m]:
            ckpt, out = work / f"lowbit-{method}-{ours}", work / f"lowbit-{method}-{ours}.gguf"
            if not (ckpt / "lowbit.json").is_file():
                cli("quantize", "smollm2-135m", "--method", method, "--gguf-type", ours, "--nsamples", str(a.nsamples),
                    "--seqlen", str(a.seqlen), "--out", str(ckpt))
            if not out.is_file():
                cli("export", str(ckpt), "--format", "gguf", "--out", str(out))
            rows.append({"name": f"lowbit {method} --gguf-type {ours}", "type": ours, "mb": out.stat().st_size / 1e6,
                         **perplexity(out, text, a.ctx, a.chunks, base, a.threads)})
            print(rows[-1], file=sys.stderr, flush=True)
    print(f"\nllama-perplexity, {a.chunks} windows of {a.ctx} on the evaluation plays; KLD vs the F32 GGUF\n")
    print("| file | MB | ppl | mean KLD | same top-1 % |")
    print("|---|---:|---:|---:|---:|")
    fmt = lambda v, f: "–" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        print(f"| {r['name']} | {r['mb']:.1f} | {fmt(r['ppl'], '.3f')} | {fmt(r['kld'], '.4f')} | "
              f"{fmt(r['same_top_pct'], '.2f')} |", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
