"""QuIP#'s within-block fine-tuning (``--finetune``): train the sign vectors and scales against the FP block.

After the runner has quantized every linear of a block, each QuIP# linear ``y = diag(s_u) T_mᵀ W̃ T_n diag(s_v) x``
with ``W̃ = Σ_k g_k·scales[k]·C_k`` (codes ``C_k`` frozen) gets trainable real vectors ``s_u`` (m,), ``s_v`` (n,)
(initialised to the ±1 signs) and per-stage gains ``g_k`` (init 1).  Loss: ``MSE(block_q(h), block_fp(h))`` over
the calibration inputs ``h`` the runner feeds this block (the quantized upstream's outputs), targets from the float
block on the same inputs.  Adam (signs: lr = ``cfg.ft_lr``; gains: ``cfg.ft_lr/10``), ``cfg.ft_steps`` steps of
``FT_WINDOWS`` windows each, in float32.  The loss on a fixed held-out slice of windows is measured before and
after; if training did not lower it the block keeps its untrained weights.  The trained signs are stored as fp16
vectors (``QuipWeight.sign_mode == "real"``: +16·(m + n) bits per matrix, counted in bits/weight).

Not done (the paper's fuller recipe): updating the still-unquantized weights between the block's matrices, and the
end-to-end stage (signs, scales and lm_head against the FP logits).
"""
from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn
from tqdm.auto import tqdm

from ..packed.qlinear import QuantLinear
from ..packed.quipw import QuipWeight, decode_stage, rht_forward, rht_inverse

FT_WINDOWS = 2  # calibration windows per Adam step


class TrainableQuip(nn.Module):
    """A QuIP# linear with real-valued ``su``, ``sv`` and per-stage ``gain`` as parameters; codes frozen."""

    def __init__(self, packed: QuipWeight, bias: torch.Tensor | None):
        super().__init__()
        m, n = packed.shape
        self.packed = packed
        su, sv = packed.signs()
        self.su, self.sv = nn.Parameter(su.float().clone()), nn.Parameter(sv.float().clone())
        self.gain = nn.Parameter(torch.ones(len(packed.stages)))
        stored = [packed.codes, packed.codes2]
        self.register_buffer("C", torch.stack([packed.scales[k].float() * decode_stage(st, stored[k].cpu(), m, n, packed.bits)
                                               for k, st in enumerate(packed.stages)]))  # (stages, m, n)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        Wt = (self.gain[:, None, None] * self.C).sum(0)                       # W̃ (m, n)
        y = rht_inverse(rht_forward(x, self.sv, self.packed.in_kind) @ Wt.T, self.su, self.packed.out_kind)
        return y if self.bias is None else y + self.bias

    def export(self) -> QuipWeight:
        """The trained weight: real signs in fp16, scales × gains (float32), codes unchanged (CPU)."""
        p = self.packed
        return dataclasses.replace(p, codes=p.codes.cpu(), codes2=None if p.codes2 is None else p.codes2.cpu(),
                                   scales=(p.scales.cpu().float() * self.gain.detach().cpu()).contiguous(),
                                   su=self.su.detach().cpu().half(), sv=self.sv.detach().cpu().half())


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


def _run(block: nn.Module, h: torch.Tensor, call: tuple) -> torch.Tensor:
    out = block(h, *call[0], **call[1])
    return out[0] if isinstance(out, (tuple, list)) else out


class BlockFinetuner:
    """The runner's ``finetune_block(work, fp_block, inputs, calls, index)`` callback for QuIP# (see module docstring).

    Replaces the QuIP# :class:`QuantLinear` modules of ``work`` by trained ones; ``history`` keeps
    ``(held-out MSE before, after)`` per block.  The window order is seeded by the block ``index`` (default: the
    number of blocks seen so far), so a run resumed at block k trains block k exactly like an uninterrupted one."""

    def __init__(self, steps: int, lr: float, progress: bool = True):
        self.steps, self.lr, self.progress = steps, lr, progress
        self.history: list[tuple[float, float]] = []

    def __call__(self, work: nn.Module, fp_block: nn.Module, inputs: list, calls: list, index: int | None = None) -> None:
        index = len(self.history) if index is None else index
        quip = {n: m for n, m in work.named_modules() if isinstance(m, QuantLinear) and isinstance(m.packed, QuipWeight)
                and m.packed.sign_mode != "none"}
        if not quip or self.steps == 0:
            return
        device = inputs[0].device
        train, fp = copy.deepcopy(work).float(), copy.deepcopy(fp_block).float()
        mods = {}
        for name, q in quip.items():
            mods[name] = TrainableQuip(q.packed, q.bias).to(device)
            parent, _, leaf = name.rpartition(".")
            setattr(train.get_submodule(parent) if parent else train, leaf, mods[name])
        for p in list(train.parameters()) + list(fp.parameters()):
            p.requires_grad_(False)
        params = [p for m in mods.values() for p in (m.su, m.sv, m.gain)]
        for p in params:
            p.requires_grad_(True)
        samples = [(b, r) for b, h in enumerate(inputs) for r in range(h.shape[0])]     # (micro-batch, row)
        held = samples[:: max(1, len(samples) // FT_WINDOWS)][:FT_WINDOWS]

        def batch_loss(picks, grad: bool) -> torch.Tensor:
            total = 0.0
            for b in sorted({b for b, _ in picks}):
                idx = torch.tensor([r for bb, r in picks if bb == b], device=device)
                h = inputs[b][idx].float()
                call = _to32(_take(calls[b], idx, inputs[b].shape[0]), device)
                with torch.no_grad():
                    target = _run(fp, h, call)
                with torch.set_grad_enabled(grad):
                    total = total + (_run(train, h, call) - target).pow(2).mean() * len(idx) / len(picks)
            return total

        before = float(batch_loss(held, False))
        opt = torch.optim.Adam([{"params": [m.su for m in mods.values()] + [m.sv for m in mods.values()], "lr": self.lr},
                                {"params": [m.gain for m in mods.values()], "lr": self.lr / 10}])
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
            new = QuantLinear(mod.export(), quip[name].bias).to(device)
            parent, _, leaf = name.rpartition(".")
            setattr(work.get_submodule(parent) if parent else work, leaf, new)
