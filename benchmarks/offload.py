"""Peak RSS of GPTQ with and without ``--offload disk`` on a model whose weights dominate memory (issue #7).

On the 135M demo model, Python + torch (≈ 0.3 GB) and the tokenized calibration corpus weigh as much as
the weights, so this builds a bigger LLaMA locally instead: random weights (seed 0), the demo model's
tokenizer, ``--layers`` blocks of width ``--hidden`` (defaults: 16 × 2048, MLP 5632 → 0.92 B parameters,
3.7 GB as float32 safetensors).  Both runs quantize it with GPTQ w4g64 on a small calibration file (the
first ``--calib-chars`` characters of the calibration plays) in their own process; the table shows each
run's ``peak_rss_bytes``, its seconds, the model's size, and whether the two ``model.safetensors`` are
byte-identical.

    python benchmarks/offload.py [--layers 16] [--hidden 2048] [--work DIR] [--json F]
"""
from __future__ import annotations

import argparse
import filecmp
import json
import tempfile
from pathlib import Path

import torch

from common import lowbit


def build_model(folder: Path, layers: int, hidden: int, calib_chars: int) -> int:
    """Write a random LLaMA (float32 safetensors) + the demo tokenizer + a calibration file; return bytes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lowbit.data.text import read_text
    from lowbit.models.sources import load_model

    _, tok, _ = load_model("smollm2-135m")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=int(hidden * 2.75),
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                      max_position_embeddings=2048, tie_word_embeddings=True)
    torch.manual_seed(0)  # a process of its own: seeding the global RNG here touches nothing else
    model = LlamaForCausalLM(cfg).float()
    model.save_pretrained(folder, max_shard_size="20GB")
    tok.save_pretrained(folder)
    (folder / "calib.txt").write_text(read_text("default", split="calib")[:calib_chars], encoding="utf-8")
    return sum(p.numel() * p.element_size() for p in model.parameters())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--calib-chars", type=int, default=200_000)
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--work", default=None, help="working folder (kept; the built model is reused)")
    ap.add_argument("--modes", default="none,disk", help="runs to (re)do; the others are read from --work")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="lowbit-offload-"))
    src = work / "model"
    if not (src / "config.json").exists():
        src.mkdir(parents=True, exist_ok=True)
        build_model(src, a.layers, a.hidden, a.calib_chars)
    model_bytes = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    rows = {}
    for mode in ("none", "disk"):
        out, js = work / f"q-{mode}", work / f"q-{mode}.json"
        if mode not in a.modes.split(",") and js.exists():  # reuse an earlier run's result
            q = json.loads(js.read_text())
            rows[mode] = {"peak_rss_bytes": q["peak_rss_bytes"], "seconds": q["seconds"]}
            continue
        lowbit("quantize", str(src), "--method", "gptq", "--bits", "4", "--group-size", "64", "--calib",
               str(src / "calib.txt"), "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen),
               "--offload", mode, "--out", str(out), "--json", str(js))
        q = json.loads(js.read_text())
        rows[mode] = {"peak_rss_bytes": q["peak_rss_bytes"], "seconds": q["seconds"]}
    same = filecmp.cmp(work / "q-none" / "model.safetensors", work / "q-disk" / "model.safetensors", shallow=False)
    print(f"\nrandom LLaMA {a.layers} x {a.hidden}: float32 safetensors {model_bytes / 1e9:.2f} GB; "
          f"GPTQ w4g64, {a.nsamples} x {a.seqlen} calibration tokens\n")
    print("| --offload | peak RSS GB | peak RSS / model size | quantize s |\n|---|---:|---:|---:|")
    for mode, r in rows.items():
        print(f"| {mode} | {r['peak_rss_bytes'] / 1e9:.2f} | {r['peak_rss_bytes'] / model_bytes:.2f} | {r['seconds']:.0f} |")
    print(f"\nmodel.safetensors identical with and without offload: {same}")
    if a.json:
        Path(a.json).write_text(json.dumps({"model_bytes": model_bytes, "rows": rows, "identical": same}, indent=1) + "\n")


if __name__ == "__main__":
    main()
