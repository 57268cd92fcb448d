"""GWQ (arXiv 2411.00850): the most loss-sensitive weights stay exact in fp16, the rest is quantized.

``solve(W (m, n), H (n, n), cfg, saliency=None) -> (OutlierQuantWeight, info)``; pure.

1. **Saliency** ``s`` (m, n), by ``cfg.saliency``:

   * ``grad``      — ``Σ_samples |∂L/∂W|`` of the next-token loss (computed by the caller, passed in);
   * ``hessian``   — SpQR-style ``w² / [H⁻¹]_jj²`` with the damped ``H`` (``[H⁻¹]_jj = Σ_i U_ij²``);
   * ``magnitude`` — ``|w|``.

2. **Selection** of ``k = round(f·count)`` entries with the largest ``s`` (``f = cfg.outlier_frac``),
   counted per matrix (default), per row, or per group of ``g`` input columns (over all rows).
3. **Dense part**: GPTQ (or RTN with ``cfg.gwq_solver = "rtn"``) with the selected entries excluded
   from the grids and from the error feedback (:func:`gptq.solve_dense`); the outliers keep their
   compensated value in fp16, stored as CSR (:class:`OutlierQuantWeight`).
"""
from __future__ import annotations

import torch

from ..config import QuantConfig
from ..packed.qweight import OutlierQuantWeight
from .feedback import inverse_cholesky
from .gptq import solve_dense
from .loss import fixed_inputs


def saliency_scores(W: torch.Tensor, H: torch.Tensor, cfg: QuantConfig, grad: torch.Tensor | None) -> torch.Tensor:
    """The score ``s`` (m, n) float32 of every weight (larger = more sensitive), as ``cfg.saliency`` says."""
    if cfg.saliency == "grad":
        if grad is None:
            raise ValueError("saliency 'grad' needs the accumulated |dL/dW| of this layer")
        return grad.to(device=W.device, dtype=torch.float32)
    if cfg.saliency == "magnitude":
        return W.float().abs()
    _, Hf = fixed_inputs(W, H)
    U, _ = inverse_cholesky(Hf, cfg.damp)
    hinv_diag = U.pow(2).sum(dim=0)  # diag(UᵀU) = diag(H⁻¹)
    return W.float().pow(2) / hinv_diag.pow(2)[None, :]


def select_outliers(scores: torch.Tensor, frac: float, per: str = "matrix", group_size: int = 128) -> torch.Tensor:
    """Mask (m, n) bool of the top ``frac`` of ``scores`` per matrix, per row or per column group."""
    m, n = scores.shape
    mask = torch.zeros(m, n, dtype=torch.bool, device=scores.device)
    if frac <= 0:
        return mask
    if per == "row":
        k = round(frac * n)
        if k:
            mask.scatter_(1, scores.topk(k, dim=1).indices, True)
        return mask
    if per == "group":
        for g0 in range(0, n, group_size):
            block = scores[:, g0:g0 + group_size]
            k = round(frac * block.numel())
            if k:
                sub = torch.zeros(block.numel(), dtype=torch.bool, device=scores.device)
                sub[block.flatten().topk(k).indices] = True
                mask[:, g0:g0 + group_size] = sub.view(block.shape)
        return mask
    k = round(frac * m * n)
    if k:
        mask.view(-1)[scores.flatten().topk(k).indices] = True
    return mask


def solve(W: torch.Tensor, H: torch.Tensor, cfg: QuantConfig, saliency: torch.Tensor | None = None
          ) -> tuple[OutlierQuantWeight, dict]:
    """GWQ for one layer; ``saliency`` is the accumulated ``|∂L/∂W|`` (m, n) for ``cfg.saliency == 'grad'``.
    ``info = {"loss", "damp", "outliers": count}``."""
    scores = saliency_scores(W, H, cfg, saliency)
    keep = select_outliers(scores, cfg.outlier_frac, cfg.outlier_select, cfg.group_size_for(W.shape[1]))
    dense, Q, info = solve_dense(W, H, cfg, keep=keep, feedback=cfg.gwq_solver == "gptq")
    packed = OutlierQuantWeight.from_dense(dense, Q, keep)
    return packed, {**info, "outliers": packed.nnz}
