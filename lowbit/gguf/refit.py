"""Re-fit a solved GGUF weight's fp16 block parameters to the layer's Hessian, its integer codes kept.

Every GGUF type decodes linearly in its stored float fields once the integers (codes, sub-block scales and
mins, grid indices, signs) are fixed: ``Ŵ = Σ_k P_k ⊙ Φ_k`` with ``P_k`` the field ``k`` (``d``, ``dmin``, ``m``:
one value per block of ``B_k`` weights, shape (m, n/B_k)) broadcast over its block and ``Φ_k`` (m, n) the
weight decoded with ``P_k = 1`` and the other float fields 0 (Q4_0: ``q − 8``; Q4_1: ``q`` and 1; Q4_K:
``sc·q`` and ``−mn``; IQ2_XS: ``(½ + l)·¼·g·σ``).  So the proxy loss of row ``r``

    L_r(p) = (w_r − Φ_r p)ᵀ H (w_r − Φ_r p),     p = that row's float fields (P ≤ 2·n/32 values)

is a quadratic in ``p`` minimised by ``A_r p = b_r`` with ``A_r = Φ_rᵀ H Φ_r``, ``b_r = Φ_rᵀ H w_r``.  ``Φ_r`` is
block-sparse, so ``A_r`` costs ``O(n²)`` per row (not ``O(P n²)``): ``Y_k = Φ_k`` block rows times ``H``, then
summed against ``Φ_k'`` over the column blocks.  The solution is rounded to fp16 and kept, row by row, only where
the row's proxy loss drops (so the loss never rises); rows whose system is singular keep their parameters.

The column-feedback solvers fix each block's parameters before its codes exist (from the weights at the
block's first column, weighted by ``diag H``); this step closes that gap with the full ``H`` once the codes
are known — a step GPTQ-style tools leave out.  It changes only fp16 fields, so the blocks stay exactly the
type's bytes and llama.cpp reads them unchanged.
"""
from __future__ import annotations

import torch

ROWS = 64  # rows per chunk: bounds the (R, P, n) intermediates


def float_fields(f: dict) -> list[str]:
    """The stored float fields of unpacked fields ``f`` (their integers are everything else)."""
    return [k for k, v in f.items() if v.is_floating_point()]


def basis(codec, f: dict) -> dict[str, torch.Tensor]:
    """``Φ_k`` (m, n) for every float field ``k`` of ``f`` (unpacked: stored fields only)."""
    keys = float_fields(f)
    out = {}
    for k in keys:
        g = {**f, **{j: (torch.ones_like(f[j]) if j == k else torch.zeros_like(f[j])) for j in keys}}
        out[k] = codec.decode(g)
    return out


def refit(codec, f: dict, W: torch.Tensor, H: torch.Tensor) -> tuple[dict, int]:
    """Fields ``f`` (unpacked) with their float fields re-fitted to ``H`` (n, n) for ``W`` (m, n) (module docstring).
    Returns ``(fields, rows improved)``."""
    keys = float_fields(f)
    if not keys:
        return f, 0
    W, H = W.float(), H.float()
    m, n = W.shape
    phi = basis(codec, f)
    sizes = [n // f[k].shape[1] for k in keys]
    counts = [f[k].shape[1] for k in keys]
    offs = [sum(counts[:i]) for i in range(len(keys))]
    P = sum(counts)
    old = codec.decode(f)
    new_f = {k: f[k].clone() for k in keys}
    improved = 0
    WH = W @ H
    for r0 in range(0, m, ROWS):
        r1 = min(m, r0 + ROWS)
        R = r1 - r0
        A = torch.zeros(R, P, P, dtype=torch.float64, device=W.device)
        b = torch.zeros(R, P, dtype=torch.float64, device=W.device)
        for i, k in enumerate(keys):
            pk = phi[k][r0:r1].view(R, counts[i], sizes[i])
            Y = torch.einsum("rbi,bin->rbn", pk, H.view(counts[i], sizes[i], n))       # (R, nb_k, n) = Φ_kᵀ H
            b[:, offs[i]:offs[i] + counts[i]] = (pk * WH[r0:r1].view(R, counts[i], sizes[i])).sum(-1).double()
            for j, k2 in enumerate(keys):
                pj = phi[k2][r0:r1].view(R, counts[j], sizes[j])
                blk = torch.einsum("rbcj,rcj->rbc", Y.view(R, counts[i], counts[j], sizes[j]), pj)
                A[:, offs[i]:offs[i] + counts[i], offs[j]:offs[j] + counts[j]] = blk.double()
        diag = A.diagonal(dim1=1, dim2=2)
        live = diag > 0                                       # a parameter whose basis is all zero stays as is
        A = A + torch.diag_embed(torch.where(live, diag * 1e-9, torch.ones_like(diag)))
        b = torch.where(live, b, torch.zeros_like(b))
        sol, info = torch.linalg.solve_ex(A, b)
        ok = (info == 0) & torch.isfinite(sol).all(1)
        cand = {k: f[k][r0:r1].clone() for k in keys}
        for i, k in enumerate(keys):
            s = sol[:, offs[i]:offs[i] + counts[i]].float().to(torch.float16).float()
            lv = live[:, offs[i]:offs[i] + counts[i]] & torch.isfinite(s)
            cand[k] = torch.where(lv & ok[:, None], s, cand[k])
        Wn = codec.decode({k: cand.get(k, v[r0:r1]) for k, v in f.items()})  # as the type decodes them
        e_old = _row_loss(W[r0:r1] - old[r0:r1], H)
        e_new = _row_loss(W[r0:r1] - Wn, H)
        better = ok & (e_new < e_old)
        improved += int(better.sum())
        for k in keys:
            new_f[k][r0:r1] = torch.where(better[:, None], cand[k], f[k][r0:r1])
    return {**f, **new_f}, improved


def _row_loss(E: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """``diag(E H Eᵀ)`` (R,) in float64."""
    E = E.double()
    return ((E @ H.double()) * E).sum(1)


def refine(codec, f: dict, W: torch.Tensor, H: torch.Tensor, rounds: int, resolve) -> dict:
    """``rounds`` of (:func:`refit` the float fields of ``f`` (unpacked), then ``resolve(fields)`` → new fields: the
    codes solved again with those parameters fixed), keeping for every row the lowest proxy loss seen.  Each
    round never raises a row's loss."""
    W, H = W.float(), H.float()
    best = f
    for _ in range(rounds):
        g, k = refit(codec, best, W, H)
        if k == 0:
            break
        h = codec.unpack(codec.pack(resolve(g)))
        take = _row_loss(W - codec.decode(h), H) < _row_loss(W - codec.decode(g), H)
        best = {key: torch.where(take.view(-1, *([1] * (g[key].dim() - 1))), h[key], g[key]) for key in g}
    return best
