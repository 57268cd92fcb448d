"""Squeeze10-LLM (arXiv 2507.18073): staged mixed precision, 80 % of the cells 1-bit, 20 % 4-bit.

``solve(W (m, n), H (n, n), cfg) -> (MixedBinaryWeight, info)``; pure.  A cell is one row of one
group of ``gs`` input columns (``G = ceil(n/gs)`` cells per row).

1. **Stage 1** (``cfg.squeeze_staged``): GPTQ at ``cfg.high_bits`` gives ``Q₄``; the reference is
   ``R = Q₄``.  One-shot ablation: ``R = W``.
2. **PBAR** (post-binarization activation robustness): the output error of binarizing a cell of
   ``R``, ``score[i, g] = Σ_{j∈g} (B(R)_ij − R_ij)² H_jj`` (the diagonal part of
   ``‖(B(R) − R)_g X_gᵀ‖²``), with ``B(r) = μ + α·sign(r − μ)``, ``μ`` the cell mean and
   ``α = mean|r − μ|``.  Ablation ``magnitude``: ``score = Σ_{j∈g} R_ij²``.
   The ``round(binary_frac·m·G)`` cells with the lowest score are binarized.
3. **Stage 2**: the column-feedback engine from the original ``W``; at a group's first column
   each row fits both grids (binary ``α, μ``; ``b``-bit ``s, z``) to the current, compensated columns
   and quantizes the cell with the one its mask says.  Columns in natural order (no act-order).

**Residual binarization** (``cfg.binary_residual``, BiLLM-style): a binary cell gets a second sign,
``B₂(w) = μ + α₁·b₁ + α₂·b₂`` with ``b₁ = sign(w − μ)``, ``α₁ = mean|w − μ|``, ``r = w − μ − α₁b₁``,
``α₂ = mean|r|`` (fitted at the group's first column, like the plain fit).  Each weight then takes
the nearest of the four levels ``μ ± α₁ ± α₂``, which is exactly ``b₂ = sign(r)`` when ``α₂ ≤ α₁``
and never worse otherwise (with error feedback the later columns of a cell have moved since the fit).
PBAR scores the cells with the same binarizer.
"""
from __future__ import annotations

import torch

from ..config import QuantConfig
from ..packed.mixed import MixedBinaryWeight
from .feedback import column_feedback, inverse_cholesky
from .gptq import solve_dense
from .grid import FP16_MIN_NORMAL, UniformGrid
from .loss import fixed_inputs, proxy_loss


def binary_fit(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``α`` (m,) and ``μ`` (m,) of ``w`` (m, k), fp16-exact: ``μ = mean w``, ``α = mean|w − μ|``."""
    mu = w.mean(dim=1).half().float()
    alpha = (w - mu[:, None]).abs().mean(dim=1).half().float()
    return alpha, mu


def binarize(w: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """``μ + α·sign(w − μ)`` (sign 0 → +1) with per-row ``α, μ`` (m,) broadcast over ``w`` (m, k)."""
    return torch.where(w >= mu[:, None], mu[:, None] + alpha[:, None], mu[:, None] - alpha[:, None])


def residual_fit(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row ``α₁, μ, α₂`` (m,) of ``w`` (m, k), fp16-exact: the plain fit, then ``α₂ = mean|r|`` of
    the residual ``r = w − (μ + α₁·sign(w − μ))``."""
    alpha, mu = binary_fit(w)
    alpha2 = (w - binarize(w, alpha, mu)).abs().mean(dim=1).half().float()
    return alpha, mu, alpha2


def binarize_residual(w: torch.Tensor, alpha: torch.Tensor, mu: torch.Tensor, alpha2: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest of ``μ + α₁·(2t − 1) + α₂·(2u − 1)`` for ``w`` (m, k), per-row ``α₁, μ, α₂`` (m,).

    Returns ``(values, t, u)``, all (m, k) float (``t, u ∈ {0, 1}``); ties go to the lower ``(t, u)``.
    The value is computed as ``(μ + α₁·s₁) + α₂·s₂``, the order :class:`MixedBinaryWeight` decodes in."""
    mu, a1, a2 = mu[:, None, None], alpha[:, None, None], alpha2[:, None, None]
    t = torch.tensor([0.0, 0.0, 1.0, 1.0], device=w.device)
    u = torch.tensor([0.0, 1.0, 0.0, 1.0], device=w.device)
    levels = (mu + a1 * (2 * t - 1)) + a2 * (2 * u - 1)                # (m, 1, 4)
    k = (w[..., None] - levels).abs().argmin(dim=-1)                    # (m, k)
    return levels.expand(*w.shape, 4).gather(-1, k[..., None])[..., 0], t[k], u[k]


def cell_scores(R: torch.Tensor, H: torch.Tensor, gs: int, how: str = "pbar", residual: bool = False) -> torch.Tensor:
    """(m, G) robustness scores of the cells of ``R`` (m, n); lower = safer to binarize.  ``residual``:
    PBAR of the residual binarizer (the one the cells will get)."""
    m, n = R.shape
    hdiag = torch.diag(H).float()
    out = []
    for g0 in range(0, n, gs):
        r = R[:, g0:g0 + gs]
        if how == "magnitude":
            out.append(r.pow(2).sum(dim=1))
        else:
            if residual:
                b = binarize_residual(r, *residual_fit(r))[0]
            else:
                b = binarize(r, *binary_fit(r))
            out.append(((b - r).pow(2) * hdiag[None, g0:g0 + gs]).sum(dim=1))
    return torch.stack(out, dim=1)


def choose_high(scores: torch.Tensor, binary_frac: float) -> torch.Tensor:
    """(m, G) bool: True for the cells that stay high-bit (all but the ``binary_frac`` lowest scores)."""
    k_bin = round(binary_frac * scores.numel())
    high = torch.ones_like(scores, dtype=torch.bool)
    if k_bin:
        high.view(-1)[scores.flatten().topk(k_bin, largest=False).indices] = False
    return high


def solve(W: torch.Tensor, H: torch.Tensor, cfg: QuantConfig) -> tuple[MixedBinaryWeight, dict]:
    """Squeeze10 for one layer.  ``info = {"loss", "damp", "binary_frac": measured fraction of binary weights}``."""
    W, H = fixed_inputs(W, H)  # read-only from here on (the caller's tensors when nothing needed fixing)
    m, n = W.shape
    gs = cfg.group_size_for(n)
    G = -(-n // gs)
    if cfg.squeeze_staged:
        stage1 = QuantConfig(method="gptq", bits=cfg.high_bits, group_size=gs, sym=cfg.sym, act_order=cfg.act_order,
                             damp=cfg.damp, block_size=cfg.block_size, mse=cfg.mse)
        R = solve_dense(W, H, stage1)[1]
    else:
        R = W
    residual = cfg.binary_residual
    high = choose_high(cell_scores(R, H, gs, cfg.squeeze_score, residual), cfg.binary_frac).to(W.device)
    del R

    grid = UniformGrid(cfg.high_bits, cfg.sym, cfg.mse)
    p1 = torch.zeros(m, G, device=W.device)
    p2 = torch.zeros(m, G, device=W.device)
    p3 = torch.zeros(m, G, device=W.device)   # residual: α₂ (binary cells)
    T = torch.zeros(m, n, device=W.device) if residual else None    # residual: first sign t of the binary weights
    Ures = torch.zeros(m, n, device=W.device) if residual else None  # residual: second sign u of the binary weights
    U, lam = inverse_cholesky(H, cfg.damp)

    def quantize(p: int, Wlive: torch.Tensor) -> torch.Tensor:
        g = p // gs
        if p % gs == 0:
            cols = Wlive[:, p:p + gs]
            if residual:
                a, mu, a2 = residual_fit(cols)
                p3[:, g] = torch.where(high[:, g], torch.zeros_like(a2), a2)
            else:
                a, mu = binary_fit(cols)
            s, z = grid.fit(cols)
            p1[:, g] = torch.where(high[:, g], s, a)
            p2[:, g] = torch.where(high[:, g], z, mu)
        w = Wlive[:, p:p + 1]
        s1, s2 = p1[:, g:g + 1], p2[:, g:g + 1]
        if residual:
            qb, t, u = binarize_residual(w, s1[:, 0], s2[:, 0], p3[:, g])
            T[:, p:p + 1], Ures[:, p:p + 1] = t, u
        else:
            qb = torch.where(w >= s2, s2 + s1, s2 - s1)
        qh = (torch.clamp(torch.round(w / s1.clamp(min=FP16_MIN_NORMAL)) + s2, 0, grid.maxq) - s2) * s1
        return torch.where(high[:, g:g + 1], qh, qb)

    Q, _ = column_feedback(W, U, quantize, block_size=gs * max(1, cfg.block_size // gs), with_loss=False)
    del U
    col_group = torch.arange(n, device=W.device) // gs
    hw = high[:, col_group]
    P1, P2 = p1[:, col_group], p2[:, col_group]
    codes = torch.where(hw, torch.clamp(torch.round(Q / P1.clamp(min=FP16_MIN_NORMAL) + P2), 0, grid.maxq),
                        T if residual else (Q > P2).float()).long()
    extra = {"res": Ures.long(), "p3": p3} if residual else {}
    packed = MixedBinaryWeight.from_codes(codes, high, p1, p2, cfg.high_bits, gs, **extra)
    frac = float((~hw).float().mean())
    return packed, {"loss": proxy_loss(W, Q, H), "damp": lam, "binary_frac": frac}
