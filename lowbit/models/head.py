"""Quantize the output head (``lm_head``) too, as llama.cpp does with ``output.weight`` (``--head-bits``).

The head of a small model is a large share of its weights (SmolLM2-135M: 49 152 × 576 = 28 M of 135 M)
and, at batch-1 decoding, of the bytes read per token.  Weight-only PTQ methods leave it in float by
default (GPTQModel, llm-compressor); ``--head-bits B`` rounds it to a ``B``-bit symmetric grid with groups of
32 columns (RTN with the MSE range search: the head's input is the final norm's output, which every method
sees only at the very end, so there is no Hessian to use).  Symmetric g32 is exactly GGUF's Q8_0 / Q4_0,
so the head exports losslessly.  With tied input/output embeddings the
embedding keeps its own float table (a lookup reads one row per token) and the saved ``config.json``
says ``tie_word_embeddings: false``, so the checkpoint loads back with a separate packed head.
"""
from __future__ import annotations

from torch import nn

from ..config import Method, QuantConfig
from ..errors import LowbitError
from ..packed.qlinear import QuantLinear
from .modules import replace_module

HEAD_GROUP_SIZE = 32


def head_config(bits: int) -> QuantConfig:
    return QuantConfig(method=Method.RTN, bits=bits, group_size=HEAD_GROUP_SIZE, sym=True, mse=True)


def quantize_head(model: nn.Module, bits: int, solve) -> tuple[str, object, dict]:
    """Replace ``model``'s output linear by a packed ``bits``-bit one, in place -> ``(name, packed, info)``.

    ``solve(cfg, W, H, name)`` is the solver entry point (RTN here, ``H = None``)."""
    head = model.get_output_embeddings()
    name = next((n for n, m in model.named_modules() if m is head), None)
    if not isinstance(head, nn.Linear) or name is None:
        raise LowbitError(f"--head-bits: this model's output head is a {type(head).__name__}, not a linear layer")
    W = head.weight.detach().float().clone()  # a copy: with tied embeddings the float table stays for lookups
    packed, info = solve(head_config(bits), W, None, name)
    replace_module(model, name, QuantLinear(packed, head.bias))
    if getattr(model.config, "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False
    return name, packed, info

