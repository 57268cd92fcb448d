"""What decoding with int8-rounded activations (kernel backend ``auto``) costs in quality, against float
activations (``exact``), on the same quantized checkpoint (issue #6).

Perplexity as usually measured runs whole windows (prefill), which never takes the int8-activation path;
this feeds the evaluation text one token at a time through the KV cache, so every linear runs at batch 1
exactly as in ``lowbit generate``, and reports for both backends the teacher-forced perplexity over the
first ``--tokens`` tokens and how often the greedy next token agrees.

    python benchmarks/int8_act.py CHECKPOINT_DIR [--tokens 256] [--text default]
"""
from __future__ import annotations

import argparse
import math

import torch

import lowbit
from lowbit import kernels
from lowbit.data.text import read_text
from lowbit.data.windows import tokenize


def decode_nll(model, ids: torch.Tensor) -> tuple[float, list[int]]:
    """Mean next-token NLL of ``ids`` (1, N+1) fed one token at a time, and the greedy predictions."""
    cache, nll, preds = None, 0.0, []
    with torch.no_grad():
        for t in range(ids.shape[1] - 1):
            out = model(ids[:, t:t + 1], past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            lp = torch.log_softmax(out.logits[0, -1].float(), -1)
            nll -= lp[ids[0, t + 1]].item()
            preds.append(int(lp.argmax()))
    return nll / (ids.shape[1] - 1), preds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="lowbit checkpoint folder")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--text", default="default")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model, tok, _ = lowbit.load(a.model)
    ids = tokenize(tok, read_text(a.text, split="eval"))[: a.tokens + 1][None]
    rows = {}
    for backend in ("auto", "exact"):
        with kernels.use_backend(backend):
            rows[backend] = decode_nll(model, ids)
    agree = sum(x == y for x, y in zip(rows["auto"][1], rows["exact"][1])) / a.tokens
    print(f"\n{a.model}: {a.tokens} tokens of '{a.text}' decoded one at a time\n")
    print("| activations | decode-path ppl | greedy top-1 agreement with float activations |\n|---|---:|---:|")
    print(f"| int8 blocks (auto) | {math.exp(rows['auto'][0]):.3f} | {agree:.1%} |")
    print(f"| float (exact) | {math.exp(rows['exact'][0]):.3f} | 100% |")


if __name__ == "__main__":
    main()
