"""GPTQ (Frantar et al. 2022): group-wise integer grids solved with the column-feedback engine.

``solve(W (m, n), H (n, n), cfg) -> (GroupQuantWeight, info)``; pure: no modules, files or prints.

1. Dead inputs (``H_ii = 0``): ``H_ii = 1``, ``W[:, i] = 0``.
2. Act-order: columns by decreasing ``diag(H)``.  Static groups fit every group's grid on the
   original columns before permuting, so groups stay contiguous (no ``g_idx``); otherwise groups
   are consecutive in the permuted order and ``g_idx`` is stored.
3. ``U = chol((H + λ·mean(diag H)·I)⁻¹)`` upper, λ raised ×10 until it factors.
4. Column feedback (with FOEM's first-order term when ``cfg.method`` is FOEM); a group's grid is fitted from the current, already updated columns when its
   first column is reached (lazy blocks are aligned to groups so those columns are up to date).
"""
from __future__ import annotations

import torch

from ..config import Method, QuantConfig
from ..packed.qweight import GroupQuantWeight
from .feedback import UniformColumns, column_feedback, inverse_cholesky
from .grid import UniformGrid
from .loss import codes_from_values, fixed_inputs, proxy_loss


def solve(W: torch.Tensor, H: torch.Tensor, cfg: QuantConfig) -> tuple[GroupQuantWeight, dict]:
    """Quantize ``W`` (m, n) against the proxy Hessian ``H`` (n, n); returns the packed weight and
    ``info = {"loss": ½·tr(ΔW H ΔWᵀ), "damp": λ used}``."""
    dense, _, info = solve_dense(W, H, cfg)
    return dense, info


def solve_dense(W: torch.Tensor, H: torch.Tensor, cfg: QuantConfig, keep: torch.Tensor | None = None,
                feedback: bool = True) -> tuple[GroupQuantWeight, torch.Tensor, dict]:
    """The GPTQ loop, optionally around weights kept exactly (GWQ's outliers).

    ``keep`` (m, n) bool, original column order: those entries are excluded from their group's
    grid fit (set to 0, which every grid represents exactly, so they move neither min/max nor the
    MSE search) and are "quantized" to their current, already-compensated value rounded to fp16,
    so they feed back only that rounding error.  Their dense codes are the zero point (decode to
    exactly 0), so ``Ŵ = dense + sparse``.  ``feedback=False`` uses ``U = I`` (no compensation:
    round-to-nearest on the same grids).  Returns ``(dense packed weight, Ŵ (m, n), info)``.
    """
    W, H = fixed_inputs(W, H)  # read-only from here on (the caller's tensors when nothing needed fixing)
    m, n = W.shape
    gs = cfg.group_size_for(n)
    n_groups = -(-n // gs)
    grid = UniformGrid(cfg.bits, cfg.sym, cfg.mse)
    scales = torch.zeros(m, n_groups, device=W.device)
    zeros = torch.zeros(m, n_groups, device=W.device)
    if keep is not None:
        keep = keep.to(W.device)

    def fit(g: int, cols: torch.Tensor, kept: torch.Tensor | None) -> None:
        scales[:, g], zeros[:, g] = grid.fit(cols if kept is None else cols.masked_fill(kept, 0.0))

    upfront = gs == n or (cfg.act_order and cfg.static_groups)
    if upfront and n % gs == 0:  # every group at once: rows (m·G, gs), the same per-row arithmetic as one by one
        cols = W if keep is None else W.masked_fill(keep, 0.0)
        s_all, z_all = grid.fit(cols.reshape(m * n_groups, gs))
        scales.copy_(s_all.view(m, n_groups))
        zeros.copy_(z_all.view(m, n_groups))
        del cols, s_all, z_all
    elif upfront:
        for g in range(n_groups):
            fit(g, W[:, g * gs:(g + 1) * gs], None if keep is None else keep[:, g * gs:(g + 1) * gs])

    perm = torch.argsort(torch.diag(H).float(), descending=True, stable=True) if cfg.act_order and feedback else None
    keep_p = keep
    if perm is not None:  # W and H stay in the original order: the engine and the factorization permute
        keep_p = None if keep is None else keep[:, perm]
    positions = torch.arange(n, device=W.device)
    orig_col = perm if perm is not None else positions
    group_of = (orig_col if upfront else positions) // gs  # group of each permuted position
    group_of_list = group_of.tolist()

    if feedback:
        U, lam = inverse_cholesky(H, cfg.damp, perm=perm)
    else:
        U, lam = torch.eye(n, device=W.device), 0.0

    maxq = grid.maxq

    def quantize(p: int, Wlive: torch.Tensor) -> torch.Tensor:
        g = group_of_list[p]
        if not upfront and p % gs == 0:
            fit(g, Wlive[:, p:p + gs], None if keep_p is None else keep_p[:, p:p + gs])
        s, z = scales[:, g:g + 1], zeros[:, g:g + 1]
        q = torch.clamp(torch.round(Wlive[:, p:p + 1] / s) + z, 0, maxq).sub_(z).mul_(s)
        if keep_p is not None:
            kept = keep_p[:, p:p + 1]
            q = torch.where(kept, Wlive[:, p:p + 1].half().float(), q)
        return q

    block = gs * max(1, cfg.block_size // gs) if not upfront else cfg.block_size
    beta = cfg.beta if cfg.method == Method.FOEM else 0.0
    uniform = None
    if keep_p is None:  # the plain grid: the engine may run the loop compiled (same operations, same bits)
        def refit(p: int, Wlive: torch.Tensor) -> None:
            fit(group_of_list[p], Wlive[:, p:p + gs], None)
        uniform = UniformColumns(scales, zeros, group_of.to(torch.int64).contiguous(), float(maxq),
                                 None if upfront else refit, gs)
    Q = column_feedback(W, U, quantize, block_size=block, beta=beta, W_orig=W, pullback=cfg.pullback, perm=perm,
                        with_loss=False, uniform=uniform)[0]
    del U

    g_idx = None
    if perm is not None:
        inv = torch.argsort(perm)
        Q = Q[:, inv]
        if not upfront:
            g_idx = group_of[inv]
    col_groups = g_idx if g_idx is not None else positions // gs
    codes = codes_from_values(Q, scales, zeros, col_groups, grid.maxq)
    if keep is not None:
        codes = torch.where(keep, zeros[:, col_groups].to(codes.dtype), codes)
    qw = GroupQuantWeight.from_codes(codes, scales, None if cfg.sym else zeros, cfg.bits, gs, g_idx)
    del codes
    return qw, Q, {"loss": proxy_loss(W, Q, H), "damp": lam}
