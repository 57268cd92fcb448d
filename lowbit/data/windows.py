"""Token ids and the windows cut from them: random calibration windows, consecutive eval windows."""
from __future__ import annotations

import torch

from ..errors import LowbitError


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """All token ids of ``text`` without special tokens -> (L,) int64."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def calibration_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` consecutive tokens at random offsets -> (nsamples, seqlen).

    Offsets come from a private generator seeded with ``seed``; the global RNG is not touched."""
    if nsamples < 1:
        raise LowbitError(f"--nsamples {nsamples} must be >= 1")
    if seqlen < 2:
        raise LowbitError(f"--seqlen {seqlen} must be >= 2")
    if ids.numel() < seqlen:
        raise LowbitError(f"calibration text has {ids.numel()} tokens, fewer than one window of --seqlen {seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=gen)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


def eval_windows(ids: torch.Tensor, seqlen: int, max_tokens: int | None, bos_id: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows from token 0 -> (W, seqlen); the first ``max_tokens // seqlen``
    of them (all if ``None``).  With ``bos_id`` each window is BOS + ``seqlen − 1`` text tokens."""
    if seqlen < 2:
        raise LowbitError(f"--seqlen {seqlen} must be >= 2")
    if max_tokens is not None and max_tokens < seqlen:
        raise LowbitError(f"--max-tokens {max_tokens} is smaller than one window of --seqlen {seqlen}")
    step = seqlen - 1 if bos_id is not None else seqlen
    n = ids.numel() // step
    if n == 0:
        raise LowbitError(f"evaluation text has {ids.numel()} tokens, fewer than one window of --seqlen {seqlen}")
    if max_tokens is not None:
        n = min(n, max_tokens // seqlen)
    windows = ids[:n * step].view(n, step)
    if bos_id is not None:
        windows = torch.cat([torch.full((n, 1), bos_id, dtype=windows.dtype), windows], dim=1)
    return windows
