"""QuIP#'s within-block fine-tuning (``--finetune``): train the sign vectors and scales against the FP block.

After the runner has quantized every linear of a block, each QuIP# linear ``y = diag(s_u) T_mᵀ W̃ T_n diag(s_v) x``
with ``W̃ = Σ_k g_k·scales[k]·C_k`` (codes ``C_k`` frozen) gets trainable real vectors ``s_u`` (m,), ``s_v`` (n,)
(initialised to the ±1 signs) and per-stage gains ``g_k`` (init 1), trained by the shared loop of
:mod:`lowbit.calib.finetune` (MSE to the float block; Adam, signs at lr = ``cfg.ft_lr``, gains at ``cfg.ft_lr/10``;
``cfg.ft_steps`` steps; kept only if the held-out loss went down).  The trained signs are stored as fp16
vectors (``QuipWeight.sign_mode == "real"``: +16·(m + n) bits per matrix, counted in bits/weight).

Not done (the paper's fuller recipe): updating the still-unquantized weights between the block's matrices, and the
end-to-end stage (signs, scales and lm_head against the FP logits).
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..calib import finetune
from ..packed.quipw import QuipWeight, decode_stage, rht_forward, rht_inverse


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

    @staticmethod
    def applies(packed) -> bool:
        return isinstance(packed, QuipWeight) and packed.sign_mode != "none"

    def param_groups(self, lr: float) -> list[dict]:
        return [{"params": [self.su, self.sv], "lr": lr}, {"params": [self.gain], "lr": lr / 10}]

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


class BlockFinetuner(finetune.BlockFinetuner):
    """The runner's per-block callback for ``--method quip --finetune`` (see :mod:`lowbit.calib.finetune`)."""

    def __init__(self, steps: int, lr: float, progress: bool = True):
        super().__init__(TrainableQuip, steps, lr, progress)
