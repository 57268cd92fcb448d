"""Per-block fine-tuning against the float block (QuIP#'s ``--finetune``, Squeeze10's scale fit): the one loop.

After the runner has quantized every linear of a block, the quantized linears a *trainable view* applies to
(:mod:`lowbit.calib.views`, one per packed format, ``view.applies(packed)``) are swapped for views whose codes
stay frozen and whose few real parameters (signs, scales, offsets) are trained with Adam to reproduce the float
block:

    loss = MSE(block_q(h), block_fp(h̃))

``h`` the calibration inputs the runner feeds this block (the quantized upstream's outputs); ``h̃ = h``, or,
with FIAS (the runner's ``fp_targets``), the FP stream's inputs of the same windows, so the block learns to
undo upstream errors too.  ``steps`` Adam steps of ``FT_WINDOWS`` windows each, in float32.  The loss on a
fixed held-out slice of windows is measured before and after; if training did not lower it the block keeps
its untrained weights.  :func:`block_finetuner` builds the runner's callback for one packed kind.
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models.modules import replace_module, run_block
from ..packed.mixed import MixedBinaryWeight
from ..packed.qlinear import QuantLinear
from .views import VIEWS

FT_WINDOWS = 2  # calibration windows per Adam step


def _to32(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device=device, dtype=torch.float32) if obj.is_floating_point() else obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to32(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to32(v, device) for k, v in obj.items()}
    return obj


def _take(obj, idx: torch.Tensor, batch: int):
    """Rows ``idx`` of every tensor whose first dim is the micro-batch (size ``batch`` > 1); others as they are."""
    if isinstance(obj, torch.Tensor):
        return obj[idx] if batch > 1 and obj.dim() and obj.shape[0] == batch else obj
    if isinstance(obj, (tuple, list)):
        return type(obj)(_take(o, idx, batch) for o in obj)
    if isinstance(obj, dict):
        return {k: _take(v, idx, batch) for k, v in obj.items()}
    return obj


class BlockFinetuner:
    """The runner's ``finetune_block(work, fp_block, inputs, calls, index, fp_inputs=None)`` callback.

    ``trainable``: the view class (:mod:`lowbit.calib.views`).  Replaces the matching :class:`QuantLinear`
    modules of ``work`` by trained ones; ``history`` keeps ``(held-out MSE before, after)`` per block.  The window
    order is seeded by the block ``index`` (default: the number of blocks seen so far), so a run resumed at
    block k trains block k exactly like an uninterrupted one."""

    def __init__(self, trainable: type, steps: int, lr: float, progress: bool = True):
        self.trainable, self.steps, self.lr, self.progress = trainable, steps, lr, progress
        self.history: list[tuple[float, float]] = []

    def __call__(self, work: nn.Module, fp_block: nn.Module, inputs: list, calls: list, index: int | None = None,
                 fp_inputs: list | None = None) -> None:
        index = len(self.history) if index is None else index
        targets_in = inputs if fp_inputs is None else fp_inputs
        found = {n: m for n, m in work.named_modules() if isinstance(m, QuantLinear) and self.trainable.applies(m.packed)}
        if not found or self.steps == 0:
            return
        device = inputs[0].device
        train, fp = copy.deepcopy(work).float(), copy.deepcopy(fp_block).float()
        mods = {}
        for name, q in found.items():
            mods[name] = self.trainable(q.packed, q.bias).to(device)
            replace_module(train, name, mods[name])
        for p in list(train.parameters()) + list(fp.parameters()):
            p.requires_grad_(False)
        groups = [g for m in mods.values() for g in m.param_groups(self.lr)]
        for g in groups:
            for p in g["params"]:
                p.requires_grad_(True)
        samples = [(b, r) for b, h in enumerate(inputs) for r in range(h.shape[0])]     # (micro-batch, row)
        held = samples[:: max(1, len(samples) // FT_WINDOWS)][:FT_WINDOWS]

        def batch_loss(picks, grad: bool) -> torch.Tensor:
            total = 0.0
            for b in sorted({b for b, _ in picks}):
                idx = torch.tensor([r for bb, r in picks if bb == b], device=device)
                call = _to32(_take(calls[b], idx, inputs[b].shape[0]), device)
                with torch.no_grad():
                    target = run_block(fp, targets_in[b][idx].float(), call)
                with torch.set_grad_enabled(grad):
                    total = total + (run_block(train, inputs[b][idx].float(), call) - target).pow(2).mean() * len(idx) / len(picks)
            return total

        before = float(batch_loss(held, False))
        opt = torch.optim.Adam(groups)
        order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(index))
        bar = tqdm(range(self.steps), desc=f"finetune block {index}", leave=False, disable=not self.progress)
        for step in bar:
            picks = [samples[int(order[(step * FT_WINDOWS + k) % len(samples)])] for k in range(FT_WINDOWS)]
            opt.zero_grad(set_to_none=True)
            loss = batch_loss(picks, True)
            loss.backward()
            opt.step()
            bar.set_postfix(mse=f"{float(loss):.3g}")
        after = float(batch_loss(held, False))
        self.history.append((before, after))
        if self.progress:
            tqdm.write(f"finetune block {index}: held-out MSE {before:.4g} -> {after:.4g}"
                       + ("" if after < before else " (kept the untrained weights)"))
        if after >= before:
            return
        for name, mod in mods.items():
            new = QuantLinear(mod.export(), found[name].bias).to(device)
            replace_module(work, name, new)


def block_finetuner(kind: str, steps: int, lr: float, progress: bool = True) -> BlockFinetuner:
    """The runner's ``finetune_block`` callback that trains the linears stored in packed format ``kind`` (a key of
    :data:`lowbit.calib.views.VIEWS`: ``"quip"``, ``"bin+int"``; ``"mixed"``, its module's name, means ``"bin+int"``)."""
    kind = MixedBinaryWeight.kind if kind == "mixed" else kind
    if kind not in VIEWS:
        raise ValueError(f"no trainable view for packed kind {kind!r} (have: {', '.join(VIEWS)})")
    return BlockFinetuner(VIEWS[kind], steps, lr, progress)
