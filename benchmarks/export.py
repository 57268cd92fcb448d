"""Export round trip on the demo model (issue #6, part 4): lowbit ppl vs the exported GGUF's ppl.

Quantizes the demo model (default: GPTQ w4 g32 sym, 32 calibration windows), exports it with
``lowbit export --format gguf`` (lossless Q4_0 for this grid) and ``--format gptq``, loads the GGUF
back through transformers (``from_pretrained(dir, gguf_file=...)``, its own tokenizer too) and
compares perplexities on the default evaluation text.  Target: GGUF ppl within 1 % of lowbit's.

    python benchmarks/export.py [--method gptq] [--bits 4] [--group-size 32] [--asym] [--nsamples 32]
                                [--max-tokens 8192] [--work DIR]   # DIR keeps (and reuses) the checkpoint
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from common import folder_bytes
from common import lowbit as cli


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--asym", action="store_true", help="asymmetric grid (exports as Q4_1 for 4 bits)")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--work", default=None, help="working folder (kept; an existing checkpoint there is reused)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    import lowbit
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        grid = f"w{a.bits}g{a.group_size}{'a' if a.asym else 's'}"
        ckpt, gguf_file, gptq_dir = work / f"{a.method}-{grid}", work / f"{a.method}-{grid}.gguf", work / f"{a.method}-{grid}-gptq"
        t0 = time.perf_counter()
        if not (ckpt / "lowbit.json").is_file():
            cli("quantize", a.model, "--method", a.method, "--bits", str(a.bits), "--group-size", str(a.group_size),
                   *([] if a.asym else ["--sym"]), "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen),
                   "--out", str(ckpt))
        t_quant = time.perf_counter() - t0
        t0 = time.perf_counter()
        cli("export", str(ckpt), "--format", "gguf", "--out", str(gguf_file))
        t_gguf = time.perf_counter() - t0
        if gptq_dir.exists():  # a previous run's export (the exporter refuses non-empty folders)
            shutil.rmtree(gptq_dir)
        cli("export", str(ckpt), "--format", "gptq", "--out", str(gptq_dir))

        ev = dict(text="default", seqlen=a.seqlen, max_tokens=a.max_tokens)
        model, tok, _ = lowbit.load(ckpt, device="cpu")
        ref = lowbit.evaluate_ppl(model, tok, **ev)
        del model
        t0 = time.perf_counter()
        gmodel = AutoModelForCausalLM.from_pretrained(str(work), gguf_file=gguf_file.name, dtype=torch.float32).eval()
        gtok = AutoTokenizer.from_pretrained(str(work), gguf_file=gguf_file.name)
        t_load = time.perf_counter() - t0
        got = lowbit.evaluate_ppl(gmodel, gtok, **ev)
        sizes = {"lowbit_mb": folder_bytes(ckpt) / 1e6, "gguf_mb": gguf_file.stat().st_size / 1e6,
                 "gptq_mb": folder_bytes(gptq_dir) / 1e6}

    ratio = got["ppl"] / ref["ppl"]
    row = {"config": f"{a.method} {grid}", "lowbit_ppl": ref["ppl"], "gguf_ppl": got["ppl"], "ratio": ratio,
           "tokens_scored": [ref["tokens_scored"], got["tokens_scored"]],
           **sizes, "quantize_s": t_quant, "export_gguf_s": t_gguf, "gguf_load_s": t_load}
    print(json.dumps(row, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(row, indent=1) + "\n")
    verdict = "PASS" if abs(ratio - 1) <= 0.01 else "FAIL"
    print(f"\n{verdict}: GGUF ppl {got['ppl']:.4f} vs lowbit ppl {ref['ppl']:.4f} (ratio {ratio:.5f}, target within 1 %)")


if __name__ == "__main__":
    main()
