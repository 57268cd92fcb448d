"""Two small ``nn.Module`` helpers every model walk needs: swap a submodule by name, run one block.

* :func:`replace_module` — ``root.<dotted_name> = new`` for a dotted path (``"mlp.down_proj"``,
  ``"model.layers.3.self_attn.q_proj"``; a plain ``"lm_head"`` replaces a direct child).
* :func:`run_block` — one decoder block's forward on the hidden state ``h`` (B, T, d) with the extra
  arguments the runner captured at block 0 (``call = (args, kwargs)``: attention mask, position
  embeddings, …), returning only the new hidden state (B, T, d) (blocks return a tuple or a tensor,
  depending on the architecture and the transformers version).
"""
from __future__ import annotations

import torch
from torch import nn


def replace_module(root: nn.Module, dotted_name: str, new: nn.Module) -> None:
    """Put ``new`` where ``root.get_submodule(dotted_name)`` is (the parent must exist)."""
    parent, _, leaf = dotted_name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, new)


def run_block(block: nn.Module, h: torch.Tensor, call: tuple) -> torch.Tensor:
    """``block(h, *args, **kwargs)`` with ``(args, kwargs) = call``; the hidden state of its output."""
    args, kwargs = call
    out = block(h, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out
