"""GWQ's saliency: the accumulated magnitude of the next-token loss gradient of every linear weight.

For windows ``x_1 … x_S`` (each ``(T,)`` token ids) and ``L_s`` the mean next-token cross-entropy
of window ``s``, the score of weight ``W[i, j]`` of every block linear is

    s[i, j] = Σ_s |∂L_s / ∂W[i, j]|

(one backward per window, so gradients of different windows do not cancel).  Only the block
linears' weights require gradients; embeddings, norms and the head are frozen, so autograd keeps
one gradient tensor per linear and no optimizer state.  Activations can be recomputed block by
block in the backward pass (``checkpointing``: memory of one block's activations instead of all)
and run in bfloat16 (``dtype``) through autocast; the scores are accumulated in float32 on the CPU,
window by window in the global window order, also under torchrun (rank ``r`` computes the windows
``r, r + R, …`` and :func:`~lowbit.calib.distributed.add_in_window_order` adds each round's ``R``
gradients in window order), so the sums are the same bits for any number of processes.
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models.arch import ArchSpec, blocks_of, linears_of
from .distributed import add_in_window_order, rounds


def weight_saliency(model: nn.Module, spec: ArchSpec, windows: torch.Tensor, *, device="cpu",
                    dtype: torch.dtype = torch.float32, checkpointing: bool = False,
                    progress: bool = True) -> dict[str, torch.Tensor]:
    """``{layer name: s (m, n) float32 on CPU}`` for every block linear, from ``windows`` (S, T) (this rank's
    windows under torchrun; every rank returns the sums over all ranks' windows)."""
    linears = {f"{spec.blocks}.{i}.{name}": lin for i, block in enumerate(blocks_of(model, spec))
               for name, lin in linears_of(block).items()}
    was_training = model.training
    flags = {p: p.requires_grad for p in model.parameters()}
    model.to(device)
    model.eval()
    if checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for p in model.parameters():
        p.requires_grad_(False)
    for lin in linears.values():
        lin.weight.requires_grad_(True)
    scores = {name: torch.zeros(lin.weight.shape, dtype=torch.float32) for name, lin in linears.items()}
    dev = torch.device(device)
    autocast = torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32)
    try:
        for j in tqdm(range(rounds(windows.shape[0])), desc="gradients", unit="window", disable=not progress):
            if j < windows.shape[0]:
                ids = windows[j][None].to(device)
                with autocast:
                    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                loss.backward()
            for name, lin in linears.items():  # a rank with no window left in this round adds zeros
                g = lin.weight.grad
                g = torch.zeros(lin.weight.shape) if g is None else g.detach().abs().float()
                add_in_window_order(scores[name], g)
                lin.weight.grad = None
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        if checkpointing and hasattr(model, "gradient_checkpointing_disable"):
            model.gradient_checkpointing_disable()
        model.train(was_training)
    return scores
