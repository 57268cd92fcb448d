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



def quantize_embeddings(model: nn.Module, cfg: QuantConfig, n_layers: int) -> dict[str, tuple]:
    """``--embedding-type``: the token embedding (and the output head) on a GGUF type, in place ->
    ``{name: (GGUFWeight, info)}`` for ``lowbit.json``'s layers (empty when the setting keeps them float).

    The type comes from :func:`lowbit.gguf.embedding.resolve_role` (an explicit type, or llama-quantize's
    choice for ``auto``, then llama.cpp's row-length fallback, reported in ``info["gguf_fallback"]``); the
    table is rounded by the type's codec without an importance matrix, as llama-quantize does.  A tied head
    becomes a :class:`QuantLinear` on the same packed table (one tensor, llama.cpp's ``token_embd``;
    ``tie_word_embeddings`` stays true); an untied head (``output``) gets its own type."""
    from ..gguf import TYPES
    from ..gguf.embedding import resolve_role
    from ..packed.ggufw import GGUFWeight
    from ..packed.qembedding import QuantEmbedding

    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = bool(getattr(model.config, "tie_word_embeddings", False)) and head is not None \
        and getattr(head, "weight", None) is emb.weight
    names = {id(m): n for n, m in model.named_modules()}
    results: dict[str, tuple] = {}

    def packed_of(mod: nn.Module, role: str) -> tuple[GGUFWeight, dict] | None:
        W = mod.weight.detach()
        t, why = resolve_role(cfg, role, tuple(W.shape), n_layers, tied)
        if t == "F16":  # not quantized (asked for, or a row length no type holds): the float table stays
            return None
        packed = GGUFWeight.from_fields(t, TYPES[t].codec.quantize(W.float()))
        return packed, {"loss": None, "role": role, **({"tied": True} if tied else {}),
                        **({"gguf_fallback": why} if why else {})}

    if not isinstance(emb, nn.Embedding):
        raise LowbitError(f"--embedding-type: this model's input embedding is a {type(emb).__name__}, not an "
                          "embedding table")
    got = packed_of(emb, "token_embd")
    if got is not None:
        qemb = QuantEmbedding.replacing(emb, got[0])
        replace_module(model, names[id(emb)], qemb)
        results[names[id(emb)]] = got
        if tied:
            qhead = QuantLinear(got[0], head.bias)
            replace_module(model, names[id(head)], qhead)
            qemb.tie(qhead)
    if not tied and head is not None:
        if not isinstance(head, nn.Linear):
            raise LowbitError(f"--embedding-type: this model's output head is a {type(head).__name__}, not a linear "
                              "layer")
        got = packed_of(head, "output")
        if got is not None:
            replace_module(model, names[id(head)], QuantLinear(got[0], head.bias))
            results[names[id(head)]] = got
    return results
