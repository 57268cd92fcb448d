"""A/B evaluation, ``lowbit eval A --kld B``: how far model A's next-token distributions are from B's.

Both models score the same windows as :mod:`lowbit.eval.ppl` (same text, ``seqlen``, ``max_tokens``,
BOS), one batch at a time: B's logits are computed on the fly next to A's, so nothing of size
``tokens × vocab`` is kept.  At every scored position ``t`` (positions 1…seqlen−1 of a window, predicted
from the tokens before) with ``P = softmax(B's logits)`` the reference and ``Q = softmax(A's logits)``:

* ``KL_t(P ‖ Q) = Σ_v P_v (log P_v − log Q_v)`` ≥ 0, in nats — the direction llama-perplexity's
  ``--kl-divergence`` uses (the base = reference distribution weights the log-ratio);
  ``kld`` is its mean over all scored positions, with ``kld_stderr`` = std/√n, ``kld_median``,
  ``kld_p99`` and ``kld_max``;
* ``top1_agreement``: share of positions where ``argmax Q = argmax P`` (llama-perplexity's "same top p");
* ``ppl`` / ``ppl_reference``: exp of the mean next-token NLL of A / of B on the same positions, and
  ``ppl_ratio = ppl / ppl_reference`` (= exp(mean NLL_A − mean NLL_B)).

Sums are accumulated in float64; log-softmax runs in float32 whatever the models' dtype.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..data import eval_windows, read_text, tokenize
from ..errors import LowbitError
from .ppl import bos_token_id


def token_stats(logits: torch.Tensor, ref_logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-position statistics of one window.

    ``logits``, ``ref_logits``: (N, V) logits of A and of the reference B predicting ``targets`` (N,).
    Returns float64/bool tensors of shape (N,): ``kl`` = KL(P_B ‖ P_A), ``same_top1``, ``nll`` (A) and
    ``nll_ref`` (B)."""
    logq = F.log_softmax(logits.float(), dim=-1)
    logp = F.log_softmax(ref_logits.float(), dim=-1)
    kl = F.kl_div(logq, logp, log_target=True, reduction="none").sum(-1)     # Σ P (log P − log Q)
    tgt = targets.view(-1, 1)
    return {"kl": kl.double().clamp_min(0.0), "same_top1": logq.argmax(-1) == logp.argmax(-1),
            "nll": -logq.gather(1, tgt).squeeze(1).double(), "nll_ref": -logp.gather(1, tgt).squeeze(1).double()}


def summarize(kl: torch.Tensor, same_top1: torch.Tensor, nll: torch.Tensor, nll_ref: torch.Tensor) -> dict:
    """The reported numbers from the per-position statistics of every window (1-D tensors of equal length)."""
    n = kl.numel()
    if n == 0:
        raise LowbitError("--kld: no position was scored")
    ppl, ppl_ref = math.exp(float(nll.mean())), math.exp(float(nll_ref.mean()))
    out = {"kld": float(kl.mean()), "kld_stderr": float(kl.std() / math.sqrt(n)) if n > 1 else 0.0,
           "kld_median": float(kl.median()), "kld_p99": float(torch.quantile(kl, 0.99)), "kld_max": float(kl.max()),
           "top1_agreement": float(same_top1.double().mean()), "ppl": ppl, "ppl_reference": ppl_ref,
           "ppl_ratio": math.exp(float(nll.mean() - nll_ref.mean())), "tokens_scored": n}
    bad = [k for k, v in out.items() if not math.isfinite(v)]
    if bad:
        raise LowbitError(f"--kld: {', '.join(bad)} is not finite (a model produced NaN/Inf logits)")
    return out


@torch.no_grad()
def kl_divergence(model: nn.Module, reference: nn.Module, windows: torch.Tensor, batch_size: int = 4,
                  progress: bool = False) -> dict:
    """:func:`summarize` of ``model`` (A) against ``reference`` (B) on ``windows`` (W, T) token ids."""
    from tqdm.auto import tqdm

    dev_a, dev_b = next(model.parameters()).device, next(reference.parameters()).device
    parts: dict[str, list] = {"kl": [], "same_top1": [], "nll": [], "nll_ref": []}
    for b0 in tqdm(range(0, windows.shape[0], batch_size), desc="kld", unit="batch", disable=not progress):
        ids = windows[b0:b0 + batch_size]
        la = model(input_ids=ids.to(dev_a), use_cache=False).logits
        lb = reference(input_ids=ids.to(dev_b), use_cache=False).logits.to(la.device)
        if la.shape != lb.shape:
            raise LowbitError(f"--kld: the models' logits differ in shape ({tuple(la.shape)} vs {tuple(lb.shape)}); "
                              "both need the same vocabulary")
        tgt = ids[:, 1:].to(la.device)
        for r in range(ids.shape[0]):  # one window at a time bounds the float32 temporaries to (T, V)
            s = token_stats(la[r, :-1], lb[r, :-1], tgt[r])
            for k, v in s.items():
                parts[k].append(v.cpu())
        del la, lb
    return summarize(*(torch.cat(parts[k]) for k in ("kl", "same_top1", "nll", "nll_ref")))


def evaluate_kld(model: nn.Module, tokenizer, reference: str, *, text: str = "default", seqlen: int = 512,
                 max_tokens: int | None = 20480, bos: bool = False, batch_size: int = 4, device: str | None = None,
                 progress: bool = False) -> dict:
    """KL divergence of ``model`` to the model at ``reference`` (a lowbit folder, a float model folder,
    a ``.gguf``, a hub id or the demo id) on the ``text`` windows of the perplexity protocol.

    Returns :func:`summarize`'s keys plus ``seqlen``, ``seconds`` and ``kld_reference`` (the source as given).
    The reference must tokenize the text exactly like ``model``'s tokenizer (the same vocabulary)."""
    from .. import api

    t0 = time.perf_counter()
    bos_id = bos_token_id(tokenizer, bos)
    ref_model, ref_tok, _ = api.load_any(reference, device=device or str(next(model.parameters()).device))
    raw = read_text(text, split="eval")
    ids = tokenize(tokenizer, raw)
    if not torch.equal(ids, tokenize(ref_tok, raw)):
        raise LowbitError(f"--kld '{reference}': its tokenizer splits the text differently; the KL divergence "
                          "needs two models with the same vocabulary")
    windows = eval_windows(ids, seqlen, max_tokens, bos_id=bos_id)
    out = kl_divergence(model, ref_model, windows, batch_size=batch_size, progress=progress)
    del ref_model
    return {**out, "seqlen": seqlen, "seconds": time.perf_counter() - t0, "kld_reference": reference}
