"""``QuantEmbedding``: an ``nn.Embedding`` stand-in whose table is a packed GGUF weight (``--embedding-type``).

The table ``E`` (V, d) is a :class:`~.ggufw.GGUFWeight`: row ``v`` is the ``d/block`` consecutive blocks of
bytes ``blocks[v]``, so a lookup gathers the looked-up rows' bytes and decodes only those,

    out[…, :] = decode(blocks[ids[…]])        ids (…,) int  ->  out (…, d)

(memory: the packed table, ``V·d·bpw/8`` bytes, plus ``k·d`` floats for the ``k`` tokens of the batch; the
float table is never built).  Gemma's scaled embedding (``embed_scale``) is kept and applied after the
lookup, as its own module does.

Tied input/output embeddings (llama.cpp's single ``token_embd``): the head is a
:class:`~.qlinear.QuantLinear` on the same packed weight, and :meth:`QuantEmbedding.tie` makes it hold the
very tensor this module holds — also after ``.to(device)``, which copies buffers module by module
(:meth:`_apply` puts this module's tensor back into the head), so the table is in memory once and is saved
once (``<embedding>.blocks``; :mod:`lowbit.packed.checkpoint` restores the tie).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .ggufw import GGUFWeight


class QuantEmbedding(nn.Module):
    """A token-embedding lookup from a :class:`GGUFWeight` table ``(num_embeddings, embedding_dim)``."""

    def __init__(self, qweight: GGUFWeight, dtype: torch.dtype = torch.float32, embed_scale=None,
                 padding_idx: int | None = None):
        super().__init__()
        self._template = qweight
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.padding_idx = padding_idx
        self.register_buffer("blocks", qweight.blocks)
        # the output dtype; a float buffer so that ``model.to(dtype)`` changes it as it changes the other layers
        self.register_buffer("_out", torch.empty(0, dtype=dtype), persistent=False)
        if embed_scale is not None:
            self.register_buffer("embed_scale", torch.as_tensor(embed_scale, dtype=torch.float32).clone(),
                                 persistent=False)

    @classmethod
    def replacing(cls, emb: nn.Embedding, qweight: GGUFWeight) -> "QuantEmbedding":
        """The stand-in for ``emb`` (its dtype, ``padding_idx`` and a Gemma ``embed_scale``)."""
        scale = getattr(emb, "embed_scale", None)
        return cls(qweight, emb.weight.dtype, None if scale is None else scale.detach().float().cpu(),
                   getattr(emb, "padding_idx", None))

    @property
    def packed(self) -> GGUFWeight:
        """The packed table around the current buffer (on its current device)."""
        return dataclasses.replace(self._template, blocks=self.blocks)

    def tie(self, head: nn.Module) -> None:
        """Make ``head`` (a :class:`QuantLinear` on this table) hold this module's tensor, now and after moves."""
        self.__dict__["_tied_head"] = head  # a plain reference, not a submodule (it is the model's head)
        head._buffers["blocks"] = self.blocks

    def _apply(self, fn, recurse: bool = True):
        out = super()._apply(fn, recurse)
        head = self.__dict__.get("_tied_head")
        if head is not None:
            head._buffers["blocks"] = self.blocks
        return out

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        codec = self._template.type.codec
        rows = self.blocks.index_select(0, ids.reshape(-1).to(self.blocks.device))
        out = codec.decode(codec.unpack(rows)).view(*ids.shape, self.embedding_dim).to(self._out.dtype)
        scale = self._buffers.get("embed_scale")
        return out if scale is None else out * scale.to(out.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, gguf_type={self._template.gguf_type}"
