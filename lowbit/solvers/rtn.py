"""Round-to-nearest: every group's grid fitted to the original weights, no error feedback.

``solve(W (m, n), H (n, n) | None, cfg) -> (GroupQuantWeight, info)``; pure.  ``H`` only serves the
reported proxy loss (``nan`` without it), so RTN and GPTQ losses are comparable.
"""
from __future__ import annotations

import torch

from ..config import QuantConfig
from ..packed.qweight import GroupQuantWeight
from .grid import UniformGrid
from .loss import proxy_loss


def solve(W: torch.Tensor, H: torch.Tensor | None, cfg: QuantConfig) -> tuple[GroupQuantWeight, dict]:
    W = W.float()
    m, n = W.shape
    gs = cfg.group_size_for(n)
    grid = UniformGrid(cfg.bits, cfg.sym, cfg.mse)
    codes, scales, zeros = [], [], []
    for g0 in range(0, n, gs):
        s, z = grid.fit(W[:, g0:g0 + gs])
        codes.append(grid.quantize(W[:, g0:g0 + gs], s, z))
        scales.append(s)
        zeros.append(z)
    codes_t, scales_t, zeros_t = torch.cat(codes, 1).long(), torch.stack(scales, 1), torch.stack(zeros, 1)
    qw = GroupQuantWeight.from_codes(codes_t, scales_t, None if cfg.sym else zeros_t, cfg.bits, gs)
    loss = float("nan") if H is None else proxy_loss(W, qw.dequantize().to(W.device), H.float())
    return qw, {"loss": loss}
