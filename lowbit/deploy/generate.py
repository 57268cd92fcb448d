"""Text generation with a quantized (or float) model: KV cache, greedy by default, streamed to stdout.

``generate(source, prompt, max_new_tokens)`` loads ``source`` with :func:`lowbit.api.load_any` (a lowbit
checkpoint, or any float model source; ``fp=True`` loads a checkpoint's float source recorded in
``lowbit.json`` instead), wraps the prompt in the tokenizer's chat template when it has one, and runs
``model.generate`` (KV cache on).  Greedy decoding picks ``argmax_v p(v | context)`` at every step;
with ``temperature > 0`` tokens are sampled from ``softmax(logits / temperature)`` (no top-k/top-p),
reproducibly for a given ``seed`` (the global RNG state is restored afterwards).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from ..errors import LowbitError


def load_for_generation(source: str, fp: bool = False, dtype: torch.dtype | None = None):
    """``(model, tokenizer, meta)`` for ``source``; with ``fp`` the float source of a checkpoint."""
    from .. import api
    from ..packed.checkpoint import META_FILE, read_meta

    is_ckpt = Path(source).is_dir() and (Path(source) / META_FILE).exists()
    if fp and is_ckpt:
        origin = (read_meta(source).get("source") or {}).get("source")
        if not origin:
            raise LowbitError(f"{source}/{META_FILE} records no source model for --fp")
        source = origin
    return api.load_any(source, device="cpu", dtype=dtype)


def build_inputs(tokenizer, prompt: str, chat: bool = True) -> torch.Tensor:
    """Prompt -> ``input_ids`` (1, P): the chat template with a generation prompt when the tokenizer
    has one and ``chat``; the plain tokenization (with the tokenizer's special tokens) otherwise."""
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.numel() == 0:
        raise LowbitError("--prompt: the prompt has no tokens")
    return ids


@torch.inference_mode()
def generate_ids(model, tokenizer, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 seed: int = 0, streamer=None, min_new_tokens: int | None = None) -> torch.Tensor:
    """New token ids (1, ≤ max_new_tokens) after ``input_ids`` (1, P); greedy when ``temperature == 0``."""
    if max_new_tokens < 1:
        raise LowbitError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise LowbitError(f"--temperature must be >= 0, got {temperature}")
    sample = temperature > 0
    kw = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0} if sample else {"do_sample": False}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.random.fork_rng():  # the seed stays local to this call
        torch.manual_seed(seed)
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, use_cache=True,
                             pad_token_id=pad, streamer=streamer, **kw)
    return out[:, input_ids.shape[1]:]


def generate(source: str, prompt: str, max_new_tokens: int = 128, *, fp: bool = False, temperature: float = 0.0,
             seed: int = 0, chat: bool = True, stream: object = "stdout") -> str:
    """Load ``source``, generate, stream the new text to ``stream`` (``"stdout"``: the current
    ``sys.stdout``; a file object; ``None``: silent); returns the new text."""
    if max_new_tokens < 1:
        raise LowbitError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    if not prompt:
        raise LowbitError("--prompt is empty")
    model, tok, _meta = load_for_generation(source, fp=fp)
    ids = build_inputs(tok, prompt, chat)
    streamer = None
    if stream is not None:
        from transformers import TextStreamer

        out = sys.stdout if stream == "stdout" else stream
        streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        streamer.on_finalized_text = lambda text, stream_end=False: print(text, end="\n" if stream_end else "",
                                                                       file=out, flush=True)
    new = generate_ids(model, tok, ids, max_new_tokens, temperature, seed, streamer)
    return tok.decode(new[0], skip_special_tokens=True)
