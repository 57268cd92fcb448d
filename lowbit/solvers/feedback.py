"""The column-feedback engine shared by GPTQ, FOEM (first-order term built in), GWQ's dense part, Squeeze10 and (Block)LDLQ.

Minimise the proxy loss ``tr((Ŵ − W) H (Ŵ − W)ᵀ)`` one unit of ``d`` columns at a time.
With ``U`` the upper Cholesky factor of ``H⁻¹`` (``H⁻¹ = UᵀU``), quantizing unit ``k`` leaves the
error ``E_k = W_k − Q(W_k)`` (m, d); the optimal update of the not-yet-quantized columns is

    e_k = E_k · U_kk⁻¹                 (d = 1:  e = (w − q)/U_ii)
    W_{>k} −= e_k · U_{k,>k}

and the proxy loss of the unit is ``‖e_k‖²/2``.  Updates are applied lazily: inside a block of ``B``
columns immediately, to the columns after the block once per block (one matmul).

The engine knows nothing about grids or codebooks: the caller passes ``quantize(start, W) -> q``,
which sees the live working matrix ``W`` (m, n) and returns the quantized values (m, d) of
``W[:, start:start+d]``.  Those columns, and every later column of the same lazy block, are current
(all feedback so far applied); columns after the block are not yet.  Group grids, outlier masks and
vector codebooks live in that callback.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

Quantize = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass
class UniformColumns:
    """What the compiled loop (:mod:`lowbit.kernels.feedback_cpu`) needs to quantize a whole lazy block itself
    when the callback is the plain uniform grid: ``q = (clamp(round(w/s) + z, 0, maxq) − z)·s`` with ``s``, ``z``
    the row's ``scales``/``zeros`` (m, G) of group ``group_of[p]`` (n,) int64 of each position ``p``.
    ``refit(p, W)``: with grids fitted lazily, called at each group's first position (``p % gs == 0``) before
    it is quantized, as the callback would (it updates ``scales``/``zeros`` in place); ``None`` when every grid
    was fitted up front."""

    scales: torch.Tensor
    zeros: torch.Tensor
    group_of: torch.Tensor
    maxq: float
    refit: Callable[[int, torch.Tensor], None] | None = None
    gs: int = 0


class NotPositiveDefinite(ValueError):
    """The Hessian stayed singular after every damping retry."""


def inverse_cholesky(H: torch.Tensor, damp: float = 0.01, retries: int = 4,
                     perm: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """``U`` upper with ``(H + λ·mean(diag H)·I)⁻¹ = UᵀU``; λ starts at ``damp`` and grows ×10 on failure.

    Returns ``(U, λ used)`` in float32 (column-major).  ``H`` (n, n), any float dtype (read as float32),
    must already have its dead inputs fixed (``H_ii = 1``); it is only read.  ``perm`` (n,): factor
    ``H[perm][:, perm]`` (act-order) without materializing that copy.

    Memory: one n×n float32 buffer, which becomes ``U``: the damped copy is factored, inverted and
    factored again in place (the same LAPACK calls on the same values as
    ``cholesky(cholesky_inverse(cholesky(H_damped)), upper=True)``, so the result is identical).
    """
    n = H.shape[0]
    diag = torch.diag(H).float()
    if perm is not None:
        diag = diag[perm]
    mean_diag = torch.mean(diag)
    if not torch.isfinite(mean_diag) or mean_diag <= 0:
        raise NotPositiveDefinite(f"Hessian diagonal mean is {float(mean_diag):g} (no usable calibration signal)")
    A = torch.empty(n, n, dtype=torch.float32, device=H.device).mT  # column-major, as LAPACK works in place
    info = torch.empty((), dtype=torch.int32, device=H.device)
    lam = damp
    for _ in range(retries + 1):
        _load(A, H, perm)
        A.diagonal().add_(lam * mean_diag)
        torch.linalg.cholesky_ex(A, out=(A, info))                    # L (lower), in place
        if int(info) == 0:
            torch.cholesky_inverse(A, out=A)                          # (LLᵀ)⁻¹, in place
            torch.linalg.cholesky_ex(A, upper=True, out=(A, info))   # U, in place
            if int(info) == 0:
                return A, lam
        lam *= 10
    raise NotPositiveDefinite(f"Hessian not positive definite even with damping {lam / 10:g}")


def _load(A: torch.Tensor, H: torch.Tensor, perm: torch.Tensor | None, rows: int = 256) -> None:
    """``A ← H`` (or ``H[perm][:, perm]``) as float32; the permuted copy goes ``rows`` columns at a time."""
    if perm is None:
        A.copy_(H)
        return
    for c0 in range(0, H.shape[0], rows):
        A[:, c0:c0 + rows] = H.index_select(1, perm[c0:c0 + rows]).index_select(0, perm)


def column_feedback(W: torch.Tensor, U: torch.Tensor, quantize: Quantize, *, unit: int = 1,
                    block_size: int = 128, beta: float = 0.0, W_orig: torch.Tensor | None = None,
                    pullback: str = "next", perm: torch.Tensor | None = None,
                    with_loss: bool = True, uniform: UniformColumns | None = None) -> tuple[torch.Tensor, float]:
    """Quantize ``W`` (m, n) column unit by unit with error feedback through ``U`` (n, n).

    ``block_size`` must be a multiple of ``unit`` and ``n`` a multiple of ``unit``.
    Returns ``(Q, loss)``: the quantized weight (m, n) in the same column order, and ``Σ‖e_k‖²/2``.

    First-order term (FOEM, ``beta`` = β > 0, ``W_orig`` = 𝕎 the original weights, same order):
    the error fed back becomes ``e = ((w − q) − β (w − 𝕎)) / U_ii`` and the not-yet-quantized
    columns are pulled back toward the original, ``w ← w − β (w − 𝕎)``: only the next column
    (``pullback="next"``, applied just before that column is quantized) or every remaining column
    after each step (``"all"``; the lazy update of the columns after a block then carries the
    factors ``(1 − β)^k`` so that it equals the column-by-column order exactly).  β = 0 is GPTQ.

    ``perm`` (n,): work on ``W[:, perm]`` (and ``W_orig[:, perm]``) without the caller materializing it;
    ``U``, the callback's column indices and the returned ``Q`` are then all in that permuted order.
    ``with_loss=False`` skips the loss (returned as NaN) and its float64 temporaries.
    ``uniform`` (optional, :class:`UniformColumns`): ``quantize`` is that uniform grid, so with ``unit = 1`` and
    the ``"next"`` pull-back each block's column loop runs compiled (:mod:`lowbit.kernels.feedback_cpu`, the
    same operations in the same order: bit-identical) where the kernel is available; ``quantize`` otherwise.

    Memory: the working copy (n, m) and the fed-back errors ((n, m); one block's with ``with_loss=False``).
    A quantized column's value is stored in place of its working column, so the callback's ``W`` holds
    the quantized values left of ``start`` (only columns from ``start`` on are meant to be read).
    """
    m, n = W.shape
    if n % unit or block_size % unit:
        raise ValueError(f"unit {unit} must divide n={n} and block_size={block_size}")
    if pullback not in ("next", "all"):
        raise ValueError(f"pullback must be 'next' or 'all', not {pullback!r}")
    foem = beta != 0.0
    Wt = torch.empty(n, m, dtype=torch.float32, device=W.device)
    if perm is None:
        Wt.copy_(W.T)               # (n, m) working copy: a column of W is a contiguous row here
    else:
        torch.index_select(W.T.float(), 0, perm, out=Wt)
    W0t = None
    if foem:
        W0t = W_orig.T.float().contiguous() if perm is None else W_orig.T.float()[perm]
    # fed-back errors: all of them for the loss, else only the current block's (all the lazy update needs)
    Errt = torch.zeros_like(Wt) if with_loss else torch.zeros(min(block_size, n), m, device=Wt.device)
    W_view = Wt.T                   # the live (m, n) matrix the callback sees
    fast = None
    if uniform is not None and unit == 1 and pullback == "next":
        from ..kernels import feedback_cpu

        fast = feedback_cpu if feedback_cpu.usable(Wt) else None
    for b0 in range(0, n, block_size):
        b1 = min(b0 + block_size, n)
        E = Errt[b0:b1] if with_loss else Errt[:b1 - b0]             # this block's errors
        if fast is not None:
            step = uniform.gs if uniform.refit is not None else b1 - b0
            for c0 in range(b0, b1, step):
                pull_start = c0
                if uniform.refit is not None:
                    if foem and c0 > 0:  # the callback's fit sees column c0 already pulled back
                        Wt[c0:c0 + 1].sub_(beta * (Wt[c0:c0 + 1] - W0t[c0:c0 + 1]))
                        pull_start = c0 + 1
                    uniform.refit(c0, W_view)
                fast.uniform_columns(Wt, W0t if foem else Wt, U, uniform.scales, uniform.zeros, uniform.group_of,
                                     E, b0, b1, c0, min(c0 + step, b1), uniform.maxq, beta, pull_start)
        for j in range(b0, b1, unit) if fast is None else ():
            if foem and pullback == "next" and j > 0:
                Wt[j:j + unit].sub_(beta * (Wt[j:j + unit] - W0t[j:j + unit]))
            q = quantize(j, W_view)                                  # (m, unit)
            d = Wt[j:j + unit] - q.T                                 # (unit, m)
            if foem:
                d.sub_(beta * (Wt[j:j + unit] - W0t[j:j + unit]))
            if unit == 1:
                e = d.div_(U[j, j])
            else:  # Ukkᵀ · e = d  with Ukk upper triangular
                e = torch.linalg.solve_triangular(U[j:j + unit, j:j + unit].T, d, upper=False)
            Wt[j:j + unit] = q.T     # the quantized column replaces the working one (never read again)
            E[j - b0:j - b0 + unit] = e
            if j + unit < b1:
                Wt[j + unit:b1].sub_(U[j:j + unit, j + unit:b1].T @ e)
                if foem and pullback == "all":
                    Wt[j + unit:b1].sub_(beta * (Wt[j + unit:b1] - W0t[j + unit:b1]))
        if b1 < n:
            if foem and pullback == "all":
                steps = (b1 - b0) // unit
                c = (1 - beta) ** torch.arange(steps, 0, -1, dtype=Wt.dtype, device=Wt.device)
                decay = (1 - beta) ** steps
                Wt[b1:].mul_(decay).add_(W0t[b1:], alpha=1 - decay)
                Wt[b1:].sub_(U[b0:b1, b1:].T @ (E * c.repeat_interleave(unit)[:, None]))
            else:
                Wt[b1:].sub_(U[b0:b1, b1:].T @ E)
    loss = float(Errt.double().pow_(2).sum() / 2) if with_loss else float("nan")
    del Errt, E, W0t, W_view
    return Wt.T.contiguous(), loss
