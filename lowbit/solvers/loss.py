"""Small pure helpers every solver shares: dead inputs, the proxy loss, codes from grid values."""
from __future__ import annotations

import torch


def fix_dead_inputs(W: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs never active in calibration (``H_ii = 0``): ``H_ii = 1`` and ``W[:, i] = 0`` (in place)."""
    dead = torch.diag(H) == 0
    if dead.any():
        idx = dead.nonzero().flatten()
        H[idx, idx] = 1
        W[:, idx] = 0
    return W, H


def fixed_inputs(W: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``fix_dead_inputs`` on float32 copies, copied only when an input is dead.

    Otherwise ``W.float()`` and ``H`` itself come back, the caller's tensors when already float32 (treat
    them as read-only) and ``H`` in its own dtype: read it as float32 (``torch.diag(H).float()``,
    :func:`proxy_loss` and :func:`~.feedback.inverse_cholesky` convert), which gives the values a
    float32 copy would hold.  Saves the n×n copy (or two, for a float64 ``H``) per solve."""
    if (torch.diag(H).float() == 0).any():
        return fix_dead_inputs(W.float().clone(), H.float().clone())
    return W.float(), H


def proxy_loss(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    """``½·tr((Q − W) H (Q − W)ᵀ)``; with ``H = 2/N·XᵀX`` this is the mean over calibration tokens of
    ``‖(Q − W) x‖²``, the layer's squared output error per token.  ``W, Q`` (m, n), ``H`` (n, n)."""
    D = (Q - W).float()
    return float((D @ H.float()).mul_(D).sum(dtype=torch.float64) / 2)


def codes_from_values(Q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, col_groups: torch.Tensor,
                      maxq: int) -> torch.Tensor:
    """Integer codes of grid values ``Q = s·(q − z)`` (m, n); ``scales``/``zeros`` (m, G), ``col_groups`` (n,)."""
    x = Q / scales[:, col_groups]
    x.add_(zeros[:, col_groups]).round_().clamp_(0, maxq)
    return x.to(torch.int64)
