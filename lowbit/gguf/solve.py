"""RTN, GPTQ and FOEM on a GGUF type's own grid: ``solve(W (m, n), H (n, n) | None, cfg) -> (GGUFWeight, info)``.

Pure, like the other solvers.  The type is ``cfg.gguf_type``; a row length it cannot hold falls back
as llama.cpp does (:func:`lowbit.gguf.types.resolve`), reported in ``info["gguf_fallback"]``.

* RTN (``H`` None or ``cfg.method`` rtn): every block's parameters and codes from the original
  weights — for the legacy types byte-identical to ``gguf.quants.quantize`` / ggml's reference.
* GPTQ / FOEM: the column-feedback engine (:func:`lowbit.solvers.feedback.column_feedback`) with the
  type's own rounding as its quantizer, so the error fed back is the grid's.  Without act-order a
  block's parameters (K-quants: super-block ``d``/``dmin``) are fixed when its first column is
  reached and each sub-block's integer scale/min when its first column is reached, both from the
  current, error-updated weights (lazy blocks are whole super-blocks so those columns are current).
  With act-order (GGUF has no ``g_idx``: static groups only) all parameters are fitted up front on
  the original weights and the columns are quantized by decreasing ``diag(H)``.  Every parameter fit
  weights column ``j``'s squared error by ``H_jj``, as llama.cpp's importance matrix does.
"""
from __future__ import annotations

import torch

from ..config import Method, QuantConfig
from ..packed.ggufw import GGUFWeight
from ..solvers.feedback import column_feedback, inverse_cholesky
from ..solvers.loss import fixed_inputs, proxy_loss
from .types import resolve


def solve(W: torch.Tensor, H: torch.Tensor | None, cfg: QuantConfig) -> tuple[GGUFWeight, dict]:
    m, n = W.shape
    gtype, why = resolve(cfg.gguf_type, n)
    codec = gtype.codec
    info: dict = {"gguf_fallback": why} if why else {}
    if H is None or cfg.method == Method.RTN:
        W = W.float()
        packed = GGUFWeight.from_fields(gtype.name, codec.quantize(W))
        loss = float("nan") if H is None else proxy_loss(W, packed.dequantize().to(W.device), H)
        return packed, {"loss": loss, **info}
    W, H = fixed_inputs(W, H)
    imp = torch.diag(H).float()
    f = codec.fields(m, n, W.device)
    upfront = cfg.act_order
    perm = torch.argsort(imp, descending=True, stable=True) if upfront else None
    if upfront:
        codec.fit_all(f, W, imp)
    col_of = (perm if perm is not None else torch.arange(n, device=W.device)).tolist()
    U, lam = inverse_cholesky(H, cfg.damp, perm=perm)
    block, sub = codec.block, codec.sub

    def quantize(p: int, Wlive: torch.Tensor) -> torch.Tensor:
        if not upfront:
            if p % block == 0:
                codec.fit_block(f, p // block, Wlive[:, p:p + block], imp[p:p + block])
            if p % sub == 0:
                codec.fit_sub(f, p // sub, Wlive[:, p:p + sub], imp[p:p + sub])
        c = col_of[p]
        codes = codec.round(f, c // sub, Wlive[:, p:p + 1])
        f["codes"][:, c] = codes[:, 0]
        return codec.values(f, c // sub, codes)

    lazy = cfg.block_size if upfront else block * max(1, cfg.block_size // block)
    beta = cfg.beta if cfg.method == Method.FOEM else 0.0
    column_feedback(W, U, quantize, block_size=lazy, beta=beta, W_orig=W, pullback=cfg.pullback, perm=perm,
                    with_loss=False)
    del U
    packed = GGUFWeight.from_fields(gtype.name, f)
    return packed, {"loss": proxy_loss(W, packed.dequantize().to(W.device), H), "damp": lam, **info}
