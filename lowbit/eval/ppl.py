"""Perplexity by the project's protocol (methods.md, "Perplexity protocol").

Tokenize the whole text without special tokens; cut consecutive non-overlapping windows of
``seqlen`` tokens from token 0 (with ``bos``: a BOS token then ``seqlen − 1`` text tokens); keep the
first ``max_tokens // seqlen`` windows; score positions 1…seqlen−1 of every window;
``ppl = exp(Σ NLL / tokens scored)``.
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..data import eval_windows, read_text, tokenize
from ..errors import LowbitError


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = False) -> tuple[float, int]:
    """``(ppl, tokens scored)`` of ``model`` on ``windows`` (W, T) token ids."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    nll = torch.zeros((), dtype=torch.float64)
    scored = 0
    for b0 in tqdm(range(0, windows.shape[0], batch_size), desc="eval", unit="batch", disable=not progress):
        ids = windows[b0:b0 + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits            # (B, T, V)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")
        nll += loss.double().cpu()
        scored += ids[:, 1:].numel()
    return math.exp(float(nll) / scored), scored


def bos_token_id(tokenizer, bos: bool) -> int | None:
    """``--bos``: the id prepended to every window (``None`` without ``--bos``); refused if the tokenizer has none."""
    if not bos:
        return None
    if tokenizer.bos_token_id is None:
        raise LowbitError("--bos: this tokenizer has no BOS token")
    return tokenizer.bos_token_id


def evaluate_ppl(model: nn.Module, tokenizer, text: str = "default", seqlen: int = 512,
                 max_tokens: int | None = 20480, bos: bool = False, batch_size: int = 4,
                 progress: bool = False) -> dict:
    """Perplexity of ``model`` on a text source (see :func:`lowbit.data.read_text`); returns
    ``{"ppl", "tokens_scored", "seqlen", "seconds"}``."""
    t0 = time.perf_counter()
    bos_id = bos_token_id(tokenizer, bos)
    ids = tokenize(tokenizer, read_text(text, split="eval"))
    windows = eval_windows(ids, seqlen, max_tokens, bos_id=bos_id)
    ppl, scored = perplexity(model, windows, batch_size=batch_size, progress=progress)
    return {"ppl": ppl, "tokens_scored": scored, "seqlen": seqlen, "seconds": time.perf_counter() - t0}
