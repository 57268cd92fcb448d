"""Token ids and the windows cut from them: random calibration windows, consecutive eval windows."""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import torch

from ..errors import LowbitError


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """All token ids of ``text``, no special tokens added -> (L,) int64.

    ``tokenizer``: any Hugging Face tokenizer, or an object with ``encode(text, add_special_tokens=False)``
    returning a list of ids (or an encoding with ``.ids``).  The whole text is encoded in one call:
    encoding paragraphs separately changes the tokens at the joins (e.g. ``"\\n\\n"`` merges), and one
    call on a few MB of text takes only seconds with a fast tokenizer — but seconds on every run (≈ 5 s for
    the 4 MB calibration plays on 2 cores), so a fast tokenizer's result is kept in
    ``$LOWBIT_CACHE/tokens/<key>.safetensors``, ``key`` = sha256 of the text and of the tokenizer's whole
    definition (``backend_tokenizer.to_str()``, which includes its normalizer, pre-tokenizer, model and added
    tokens); a cache that cannot be read or written is ignored."""
    key = _cache_key(tokenizer, text)
    cached = _read_cached(key) if key else None
    if cached is not None:
        return cached
    ids = _encode(tokenizer, text)
    if key:
        _write_cached(key, ids)
    return ids


def _encode(tokenizer, text: str) -> torch.Tensor:
    hf = sys.modules.get("transformers")  # a HF tokenizer means transformers is already imported
    if hf is not None and isinstance(tokenizer, hf.PreTrainedTokenizerBase):
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]  # no too-long warning
    else:
        ids = tokenizer.encode(text, add_special_tokens=False)
        ids = getattr(ids, "ids", ids)
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


def _cache_dir() -> Path:
    return Path(os.environ.get("LOWBIT_CACHE") or Path.home() / ".cache" / "lowbit") / "tokens"


def _cache_key(tokenizer, text: str) -> str | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        return None
    try:
        definition = backend.to_str()
    except Exception:  # a tokenizer that cannot serialize itself is not cached
        return None
    h = hashlib.sha256(b"lowbit-tokens-v1\0")
    for part in (definition, type(tokenizer).__name__, repr(getattr(tokenizer, "split_special_tokens", None)), text):
        h.update(part.encode("utf-8", "surrogatepass") + b"\0")
    return h.hexdigest()[:32]


def _read_cached(key: str) -> torch.Tensor | None:
    path = _cache_dir() / f"{key}.safetensors"
    try:
        from safetensors.torch import load_file

        return load_file(str(path))["ids"].to(torch.long) if path.is_file() else None
    except Exception:  # unreadable or damaged: tokenize again
        return None


def _write_cached(key: str, ids: torch.Tensor) -> None:
    try:
        from safetensors.torch import save_file

        folder = _cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{key}.{os.getpid()}.tmp"
        save_file({"ids": ids.to(torch.int32 if ids.numel() == 0 or int(ids.max()) < 2**31 else torch.long)}, str(tmp))
        os.replace(tmp, folder / f"{key}.safetensors")
    except Exception:  # a read-only or full cache: nothing to keep
        pass


def calibration_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` consecutive tokens of ``ids`` (L,) at random offsets -> (nsamples, seqlen).

    Offsets are uniform over ``[0, L - seqlen]``, drawn from a private generator seeded with ``seed``;
    the global RNG is not touched.  Windows may overlap."""
    if nsamples < 1:
        raise LowbitError(f"--nsamples must be >= 1 (got {nsamples})")
    if seqlen < 2:
        raise LowbitError(f"--seqlen must be >= 2 (got {seqlen})")
    n = ids.numel()
    if n < seqlen:
        raise LowbitError(f"calibration text has {n} tokens, fewer than one window of --seqlen {seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, n - seqlen + 1, (nsamples,), generator=gen)
    return ids.reshape(-1)[starts[:, None] + torch.arange(seqlen)].long()


def check_window_count(ids: torch.Tensor, nsamples: int, seqlen: int, flag: str = "--nsamples") -> None:
    """Refuse asking for more windows than the text holds: ``nsamples ≤ ⌊L / seqlen⌋`` for ``ids`` (L,).

    :func:`calibration_windows` draws offsets at random, so it could repeat a short text any number of
    times; a calibration set many times larger than its text only repeats the same tokens (and takes as
    long as real data), so the caller is told how many windows there are instead."""
    n = ids.numel()
    if n < seqlen:
        raise LowbitError(f"calibration text has {n} tokens, fewer than one window of --seqlen {seqlen}")
    if nsamples > n // seqlen:
        raise LowbitError(f"{flag} {nsamples}: the calibration text holds {n // seqlen} window(s) of --seqlen {seqlen} "
                          f"({n} tokens); ask for at most that many, a shorter --seqlen, or more text")


def eval_windows(ids: torch.Tensor, seqlen: int, max_tokens: int | None, bos_id: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows of ``ids`` (L,) from token 0 -> (W, seqlen); the first
    ``max_tokens // seqlen`` of them (all if ``None``); an incomplete last window is dropped.

    With ``bos_id`` each window is ``[bos_id] + seqlen - 1`` text tokens (the text is cut into
    consecutive pieces of ``seqlen - 1``)."""
    if seqlen < 2:
        raise LowbitError(f"--seqlen must be >= 2 (got {seqlen})")
    if max_tokens is not None and max_tokens < seqlen:
        raise LowbitError(f"--max-tokens {max_tokens} is smaller than one window of --seqlen {seqlen}")
    step = seqlen - 1 if bos_id is not None else seqlen
    n = ids.numel() // step
    if n == 0:
        raise LowbitError(f"evaluation text has {ids.numel()} tokens, fewer than one window of --seqlen {seqlen}")
    if max_tokens is not None:
        n = min(n, max_tokens // seqlen)
    windows = ids.reshape(-1)[:n * step].reshape(n, step).long()
    if bos_id is not None:
        windows = torch.cat([torch.full((n, 1), bos_id, dtype=torch.long), windows], dim=1)
    return windows.contiguous()
