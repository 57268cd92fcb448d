"""Offline cloze task: LAMBADA-style last-word prediction from any local text.

Passages.  The text is cut into consecutive, non-overlapping spans.  Each span ends with a
*target word*: a whole word preceded by one space and directly followed by a mark that ends a
sentence or clause (``. , ; : ! ?``), as LAMBADA's passages end with a sentence; made of ASCII letters
only, at least 3 of them, not all capitals (speaker names, headings) and not a stopword
(:data:`STOPWORDS`).  A span starts where the previous one ended and runs to the first target word
that begins at least about ``context_tokens`` tokens later (measured in characters with the
tokenizer's mean characters per token on the text).  The
*context* is everything before the space that precedes the target, truncated on the left to its
last ``context_tokens`` tokens; the *continuation* is ``" " + word``.  Its tokens are those of
``tokenize(context + " " + word)`` after the context's tokens (lm-eval's convention, so a
tokenizer that merges across the join sees the same text as in running prose); a span whose
joint tokens do not start with the context's tokens is skipped.  When there are more spans than
``n_passages``, a subset is drawn with a private generator seeded with ``seed`` (the global RNG is
not touched) and kept in text order.

Metrics (one teacher-forced forward pass over ``context + continuation`` per passage):

* ``cloze_accuracy``: fraction of passages whose continuation is exactly what greedy decoding
  gives, i.e. at every continuation position the arg-max of the logits is the next target token
  (LAMBADA's standard accuracy; a word of several tokens must be right in every token).
* ``cloze_nll``: mean negative log-likelihood (nats) per continuation token, over all passages.
* ``cloze_passages``: number of passages scored.
"""
from __future__ import annotations

import bisect
import math
import re
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..data import read_text, tokenize
from ..errors import LowbitError

STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below between both
but by can could did do does doing down during each few for from further had has have having he her here hers
herself him himself his how if in into is it its itself just let me more most my myself no nor not now of off on
once only or other our ours ourselves out over own same shall she should so some such than that the their theirs
them themselves then there these they this those through to too under until up upon very was we were what when
where which while who whom why will with would yet you your yours yourself yourselves
art doth dost hath hast thee thou thy thine thyself shalt wilt wert ere tis twas unto whilst
""".split())

_TARGET = re.compile(r"(?<= )[A-Za-z]{3,}(?=[.,;:!?])")


def target_words(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` character spans of every admissible target word in ``text``."""
    out = []
    for m in _TARGET.finditer(text):
        word = m.group()
        if not word.isupper() and word.lower() not in STOPWORDS:
            out.append(m.span())
    return out


def passages(text: str, tokenizer, n_passages: int = 300, context_tokens: int = 128,
             seed: int | None = 0) -> list[tuple[list[int], list[int], str]]:
    """The cloze passages of ``text`` -> ``[(context ids, target ids, target word)]`` (see module doc)."""
    if n_passages < 1:
        raise LowbitError(f"--cloze-passages must be >= 1 (got {n_passages})")
    if context_tokens < 1:
        raise LowbitError(f"--cloze-context must be >= 1 (got {context_tokens})")
    sample = text[:50_000]
    n_sample = max(1, tokenize(tokenizer, sample).numel())
    span_chars = max(1, math.ceil(context_tokens * len(sample) / n_sample * 1.1))  # a little more, then truncate
    targets = target_words(text)
    starts = [s for s, _ in targets]
    spans, pos = [], 0
    while True:
        i = bisect.bisect_left(starts, pos + span_chars)
        if i == len(targets):
            break
        s, e = targets[i]
        spans.append((pos, s - 1, e))  # context text[pos:s-1] (the space dropped), word text[s:e]
        pos = e
    if not spans:
        raise LowbitError(f"cloze: the text has no passage of about {context_tokens} tokens ending in a "
                          f"target word ({len(text)} characters)")
    order = range(min(n_passages, len(spans)))  # seed None: the first spans
    if len(spans) > n_passages and seed is not None:
        gen = torch.Generator().manual_seed(seed)
        order = sorted(torch.randperm(len(spans), generator=gen)[:n_passages].tolist())
    out = []
    for k in order:
        a, b, e = spans[k]
        context, word = text[a:b], text[b + 1:e]
        ctx = tokenize(tokenizer, context).tolist()
        whole = tokenize(tokenizer, context + " " + word).tolist()
        if not ctx or whole[:len(ctx)] != ctx or len(whole) == len(ctx):
            continue
        out.append((ctx[-context_tokens:], whole[len(ctx):], word))
    if not out:
        raise LowbitError("cloze: no passage survived tokenization")
    return out


@torch.no_grad()
def score_passages(model: nn.Module, items: list[tuple[list[int], list[int], str]],
                   batch_size: int = 8) -> tuple[int, float, int]:
    """``(passages right, summed NLL of target tokens, target tokens)`` of ``model`` on ``items``.

    Batches are right-padded: with causal attention the padding never influences the scored positions,
    so no attention mask is needed (and any model taking ``input_ids`` works)."""
    device = next(model.parameters()).device
    right, nll, n_tok = 0, 0.0, 0
    for b0 in range(0, len(items), batch_size):
        batch = items[b0:b0 + batch_size]
        seqs = [c + t for c, t, _ in batch]
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        for j, s in enumerate(seqs):
            ids[j, :len(s)] = torch.as_tensor(s)
        logits = model(input_ids=ids.to(device), use_cache=False).logits       # (B, T, V)
        for j, (c, t, _) in enumerate(batch):
            lg = logits[j, len(c) - 1:len(c) + len(t) - 1].float()           # (k, V): predicts the k target tokens
            tgt = torch.as_tensor(t, device=lg.device)
            right += int(torch.equal(lg.argmax(-1), tgt))
            nll += float(F.cross_entropy(lg, tgt, reduction="sum"))
            n_tok += len(t)
    return right, nll, n_tok


def cloze_accuracy(model: nn.Module, tokenizer, text: str, n_passages: int = 300, context_tokens: int = 128,
                   seed: int | None = 0, batch_size: int = 8) -> dict:
    """Cloze metrics of ``model`` on the raw string ``text`` -> ``{"cloze_accuracy", "cloze_nll",
    "cloze_passages"}`` (definitions in the module docstring).  Deterministic for a given text,
    tokenizer and seed; the global RNG is not touched."""
    items = passages(text, tokenizer, n_passages=n_passages, context_tokens=context_tokens, seed=seed)
    right, nll, n_tok = score_passages(model, items, batch_size=batch_size)
    return {"cloze_accuracy": right / len(items), "cloze_nll": nll / n_tok, "cloze_passages": len(items)}


def evaluate_cloze(model: nn.Module, tokenizer, source: str = "default", **kw) -> dict:
    """:func:`cloze_accuracy` on a text source (``default``, a file or folder: see
    :func:`lowbit.data.read_text`, evaluation split), with ``seconds``."""
    t0 = time.perf_counter()
    res = cloze_accuracy(model, tokenizer, read_text(source, split="eval"), **kw)
    return {**res, "seconds": time.perf_counter() - t0}
