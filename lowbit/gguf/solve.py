"""RTN, GPTQ and FOEM (and AWQ's scaled weights) on a GGUF type's own grid:
``solve(W (m, n), H (n, n) | None, cfg) -> (GGUFWeight, info)``.

Pure, like the other solvers.  The type is ``cfg.gguf_type``, or for a llama.cpp preset (``Q4_K_M``…) the
type :func:`lowbit.gguf.presets.preset_type` gives the layer ``name``; a row length it cannot hold falls back
as llama.cpp does (:func:`lowbit.gguf.types.resolve`), reported in ``info["gguf_fallback"]``.

* RTN (``H`` None, ``cfg.method`` rtn, or AWQ with ``--awq-solver rtn``: :func:`feedback`): every block's
  parameters and codes from the original weights — for the legacy types byte-identical to
  ``gguf.quants.quantize`` / ggml's reference.
* GPTQ / FOEM: the column-feedback engine (:func:`lowbit.solvers.feedback.column_feedback`) with the
  type's own rounding as its quantizer, so the error fed back is the grid's.  Without act-order a
  block's parameters (K-quants: super-block ``d``/``dmin``) are fixed when its first column is
  reached and each sub-block's integer scale/min when its first column is reached, both from the
  current, error-updated weights (lazy blocks are whole super-blocks so those columns are current).
  Vector grids (IQ2_*, IQ3_*: ``codec.unit`` = 8) go unit by unit (BlockLDLQ, :func:`_vector_feedback`);
  this is also ``--method quip``'s solve on those types (:mod:`lowbit.methods.quip`: the same path, after the
  residual rotation of :mod:`lowbit.models.rotate`).
  With act-order (GGUF has no ``g_idx``: static groups only) all parameters are fitted up front on
  the original weights and the columns are quantized by decreasing ``diag(H)``.  Every parameter fit
  weights column ``j``'s squared error by ``H_jj``, as llama.cpp's importance matrix does.
* ``--gguf-refit N`` (:mod:`.refit`): then N rounds of the fp16 block fields re-fitted to the full ``H`` with the
  codes fixed, and the codes solved again with those fields fixed (``fixed=``), the best per row kept.
"""
from __future__ import annotations

import torch

from ..config import Method, QuantConfig
from ..errors import LowbitError
from ..packed.ggufw import GGUFWeight
from ..solvers.feedback import column_feedback, inverse_cholesky
from ..solvers.loss import fixed_inputs, proxy_loss
from .presets import canonical, is_preset, preset_type
from .types import resolve


def feedback(cfg: QuantConfig, hessian: bool = True) -> bool:
    """Whether a layer is solved by column feedback (GPTQ, FOEM, AWQ with ``--awq-solver gptq``) rather than by the
    type's RTN (no Hessian, ``--method rtn``, AWQ with ``--awq-solver rtn``: its scaled weights rounded)."""
    if not hessian or cfg.method == Method.RTN:
        return False
    return not (cfg.method == "awq" and cfg.awq_solver == "rtn")


def layer_type(cfg: QuantConfig, shape: tuple[int, int], name: str | None = None, n_layers: int | None = None,
               imatrix: bool = False) -> str:
    """The type asked for a layer of weight ``shape`` (m, n): ``cfg.gguf_type``, or for a preset the type llama.cpp
    gives the layer ``name`` (``model.layers.3.mlp.down_proj``) of a model of ``n_layers`` blocks (``imatrix``: the
    solver weights its fits by ``diag(H)``, as an importance matrix does).  Before the row-length fallback."""
    wanted = cfg.gguf_type
    if not is_preset(canonical(wanted)):
        return wanted
    if name is None or n_layers is None:
        raise LowbitError(f"--gguf-type {wanted}: a preset needs each layer's name and the model's number of "
                          "layers (lowbit.gguf.solve.solve(..., name=, n_layers=))")
    return preset_type(wanted, name, None, n_layers, tuple(shape), imatrix=imatrix)


def solve(W: torch.Tensor, H: torch.Tensor | None, cfg: QuantConfig, name: str | None = None,
          n_layers: int | None = None, gguf_type: str | None = None) -> tuple[GGUFWeight, dict]:
    """``name``: the layer's full name (``model.layers.3.mlp.down_proj``) and ``n_layers`` the model's number of
    blocks, which a preset ``cfg.gguf_type`` (``Q4_K_M``…) needs to pick this tensor's type (its layer rules).
    ``gguf_type``: this layer's type, given instead of ``cfg``'s (``--target-bpw``'s plan, :mod:`.budget`)."""
    m, n = W.shape
    fb = feedback(cfg, H is not None)
    gtype, why = resolve(gguf_type or layer_type(cfg, (m, n), name, n_layers, imatrix=fb), n)
    codec = gtype.codec
    info: dict = {"gguf_fallback": why} if why else {}
    if not fb:
        W = W.float()
        packed = GGUFWeight.from_fields(gtype.name, codec.quantize(W))
        loss = float("nan") if H is None else proxy_loss(W, packed.dequantize().to(W.device), H)
        return packed, {"loss": loss, **info}
    W, H = fixed_inputs(W, H)
    imp = torch.diag(H).float()
    run = _vector_feedback if codec.unit > 1 else _scalar_feedback
    f, lam = run(W, H, imp, codec, cfg)
    if cfg.gguf_refit:
        from .refit import refine

        f = refine(codec, codec.unpack(codec.pack(f)), W, H, cfg.gguf_refit,
                   lambda fixed: run(W, H, imp, codec, cfg, fixed)[0])
    packed = GGUFWeight.from_fields(gtype.name, f)
    return packed, {"loss": proxy_loss(W, packed.dequantize().to(W.device), H), "damp": lam, **info}


def _scalar_feedback(W: torch.Tensor, H: torch.Tensor, imp: torch.Tensor, codec, cfg: QuantConfig,
                     fixed: dict | None = None):
    """GPTQ/FOEM on a scalar type, column by column (module docstring).  ``fixed``: stored fields whose
    parameters are kept (:mod:`.refit`); only the codes are solved, in act-order or natural order."""
    m, n = W.shape
    f = codec.fields(m, n, W.device)
    upfront = cfg.act_order or fixed is not None
    if fixed is not None:
        _install(codec, f, fixed)
    elif upfront:
        codec.fit_all(f, W, imp)
    perm = torch.argsort(imp, descending=True, stable=True) if cfg.act_order else None
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
    return f, lam


def _install(codec, f: dict, fixed: dict) -> None:
    """Copy the stored parameters of ``fixed`` (every field but the codes) into solver fields ``f``."""
    for k, v in fixed.items():
        if k != "codes":
            f[k] = v.clone()
    derive = getattr(codec, "derive", None)
    if derive is not None:
        derive(f)


def _vector_feedback(W: torch.Tensor, H: torch.Tensor, imp: torch.Tensor, codec, cfg: QuantConfig,
                     fixed: dict | None = None):
    """GPTQ/FOEM on a vector grid (:class:`~.iquants.VectorIQ`): BlockLDLQ, the engine with ``unit = 8``
    consecutive columns quantized at once (nearest grid point and signs, weighted by ``diag(H)``) and their
    error fed back through ``U_kk⁻¹``.  Act-order moves whole units (by decreasing ``Σ diag(H)`` over the 8),
    with every scale fitted up front on the original weights (static groups); otherwise ``d`` and ``l`` are
    fixed from the current weights when the super-block's / sub-block's first column is reached.  ``fixed``:
    stored fields whose scales are kept (:mod:`.refit`)."""
    m, n = W.shape
    u8 = codec.unit
    f = codec.fields(m, n, W.device)
    perm = None
    if cfg.act_order:
        order = torch.argsort(imp.view(-1, u8).sum(1), descending=True, stable=True)
        perm = (order[:, None] * u8 + torch.arange(u8, device=W.device)).reshape(-1)
        if fixed is None:
            codec.fit_all(f, W, imp)
    if fixed is not None:
        _install(codec, f, fixed)
    unit_of = (perm[::u8] // u8 if perm is not None else torch.arange(n // u8, device=W.device)).tolist()
    U, lam = inverse_cholesky(H, cfg.damp, perm=perm)
    block, sub = codec.block, codec.sub

    def quantize(p: int, Wlive: torch.Tensor) -> torch.Tensor:
        if perm is None and fixed is None:
            if p % block == 0:
                codec.fit_block(f, p // block, Wlive[:, p:p + block], imp[p:p + block])
            if p % sub == 0:
                codec.fit_sub(f, p // sub, Wlive[:, p:p + sub], imp[p:p + sub])
        u = unit_of[p // u8]
        return codec.round_unit(f, u, Wlive[:, p:p + u8], imp[u * u8:(u + 1) * u8])

    lazy = max(u8, cfg.block_size // u8 * u8) if perm is not None else block * max(1, cfg.block_size // block)
    beta = cfg.beta if cfg.method == Method.FOEM else 0.0
    column_feedback(W, U, quantize, unit=u8, block_size=lazy, beta=beta, W_orig=W, pullback=cfg.pullback,
                    perm=perm, with_loss=False)
    return f, lam
