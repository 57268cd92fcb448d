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

from typing import Callable

import torch

Quantize = Callable[[int, torch.Tensor], torch.Tensor]


class NotPositiveDefinite(ValueError):
    """The Hessian stayed singular after every damping retry."""


def inverse_cholesky(H: torch.Tensor, damp: float = 0.01, retries: int = 4) -> tuple[torch.Tensor, float]:
    """``U`` upper with ``(H + λ·mean(diag H)·I)⁻¹ = UᵀU``; λ starts at ``damp`` and grows ×10 on failure.

    Returns ``(U, λ used)`` in float32.  ``H`` (n, n) must already have its dead inputs fixed (``H_ii = 1``).
    """
    H = H.float()
    mean_diag = torch.mean(torch.diag(H))
    if not torch.isfinite(mean_diag) or mean_diag <= 0:
        raise NotPositiveDefinite(f"Hessian diagonal mean is {float(mean_diag):g} (no usable calibration signal)")
    lam = damp
    for _ in range(retries + 1):
        Hd = H.clone()
        Hd.diagonal().add_(lam * mean_diag)
        L, info = torch.linalg.cholesky_ex(Hd)
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0:
                return U, lam
        lam *= 10
    raise NotPositiveDefinite(f"Hessian not positive definite even with damping {lam / 10:g}")


def column_feedback(W: torch.Tensor, U: torch.Tensor, quantize: Quantize, *, unit: int = 1,
                    block_size: int = 128, beta: float = 0.0, W_orig: torch.Tensor | None = None,
                    pullback: str = "next") -> tuple[torch.Tensor, float]:
    """Quantize ``W`` (m, n) column unit by unit with error feedback through ``U`` (n, n).

    ``block_size`` must be a multiple of ``unit`` and ``n`` a multiple of ``unit``.
    Returns ``(Q, loss)``: the quantized weight (m, n) in the same column order, and ``Σ‖e_k‖²/2``.

    First-order term (FOEM, ``beta`` = β > 0, ``W_orig`` = 𝕎 the original weights, same order):
    the error fed back becomes ``e = ((w − q) − β (w − 𝕎)) / U_ii`` and the not-yet-quantized
    columns are pulled back toward the original, ``w ← w − β (w − 𝕎)``: only the next column
    (``pullback="next"``, applied just before that column is quantized) or every remaining column
    after each step (``"all"``; the lazy update of the columns after a block then carries the
    factors ``(1 − β)^k`` so that it equals the column-by-column order exactly).  β = 0 is GPTQ.
    """
    m, n = W.shape
    if n % unit or block_size % unit:
        raise ValueError(f"unit {unit} must divide n={n} and block_size={block_size}")
    if pullback not in ("next", "all"):
        raise ValueError(f"pullback must be 'next' or 'all', not {pullback!r}")
    foem = beta != 0.0
    Wt = torch.empty(n, m, dtype=torch.float32, device=W.device)
    Wt.copy_(W.T)                   # (n, m) working copy: a column of W is a contiguous row here
    W0t = W_orig.T.float().contiguous() if foem else None
    Qt = torch.zeros_like(Wt)
    Errt = torch.zeros_like(Wt)
    W_view = Wt.T                   # the live (m, n) matrix the callback sees
    for b0 in range(0, n, block_size):
        b1 = min(b0 + block_size, n)
        for j in range(b0, b1, unit):
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
            Qt[j:j + unit] = q.T
            Errt[j:j + unit] = e
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
                Wt[b1:].sub_(U[b0:b1, b1:].T @ (Errt[b0:b1] * c.repeat_interleave(unit)[:, None]))
            else:
                Wt[b1:].sub_(U[b0:b1, b1:].T @ Errt[b0:b1])
    return Qt.T.contiguous(), float(Errt.double().pow(2).sum() / 2)
