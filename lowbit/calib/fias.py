"""FIAS (full-information activation supervision, Squeeze10): layer targets from the FP model.

A layer of the quantized model sees inputs ``x`` (the quantized stream: every earlier layer already
quantized), while the float model's same layer sees ``x̃`` (the FP stream).  FIAS asks the quantized
layer to reproduce the *float* layer's output, ``W x̃``, from what it actually gets, ``x``:

    L(Q) = Σ_t ‖W x̃_t − Q x_t‖² + λ‖Q − W‖²_F

With ``H = Σ x xᵀ`` and ``C = Σ x̃ xᵀ`` (both (n, n)) this is a quadratic in ``Q`` whose minimiser is

    W* = (W C + λ W)(H + λ I)⁻¹                                     (m, n)

and, expanding, ``L(Q) = L(W*) + tr((Q − W*)(H + λI)(Q − W*)ᵀ)``: quantizing ``W*`` with the usual
``H``-weighted solvers (GPTQ, Squeeze10, …) minimises exactly the FIAS objective.  Upstream errors are
thereby compensated layer by layer instead of accumulating.  ``λ = damp · mean(diag H)`` pulls ``W*``
towards ``W`` where ``x`` carries little energy; when the two streams agree (``C = H``) ``W* = W``
exactly, so a layer whose inputs are unperturbed is untouched.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .distributed import add_in_window_order, total_count, world
from .hessian import StopForward, windows_of


@dataclass
class CrossStats:
    """Running ``S = Σ_w X_wᵀX_w`` (quantized stream), ``C = Σ_w X̃_wᵀX_w`` (FP stream against it) and token
    count, per calibration window and summed in float64 in window order like
    :class:`~lowbit.calib.hessian.InputStats` (``window``, ``rounds`` as there)."""

    n: int
    device: torch.device
    window: int = 0
    rounds: int = 0
    S: torch.Tensor = field(init=False)
    C: torch.Tensor = field(init=False)
    count: int = 0
    seen: int = 0

    def __post_init__(self):
        self.S = torch.zeros(self.n, self.n, dtype=torch.float64, device=self.device)
        self.C = torch.zeros(self.n, self.n, dtype=torch.float64, device=self.device)

    def add(self, x: torch.Tensor, x_fp: torch.Tensor) -> None:
        """``x``, ``x_fp`` (…, n): the same tokens' inputs to the layer in the quantized and the FP stream."""
        X = x.reshape(-1, self.n).float()
        Xf = x_fp.reshape(-1, self.n).float()
        if X.shape != Xf.shape:
            raise ValueError(f"CrossStats: {tuple(X.shape)} quantized-stream rows vs {tuple(Xf.shape)} FP rows")
        for Xw, Xfw in zip(windows_of(X, self.window), windows_of(Xf, self.window)):
            add_in_window_order(self.S, Xw.T @ Xw)
            add_in_window_order(self.C, Xfw.T @ Xw)
            self.seen += 1
        self.count += X.shape[0]

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(H, C)`` = ``2/N·(S, C)``, float64, over every rank's windows when distributed; frees the sums."""
        if world()[1] > 1 and self.seen < self.rounds:
            zeros = torch.zeros(self.n, self.n, dtype=torch.float32, device=self.device)
            for _ in range(self.rounds - self.seen):  # this rank has no window left in these rounds
                add_in_window_order(self.S, zeros)
                add_in_window_order(self.C, zeros)
            self.seen = self.rounds
        c = 2.0 / max(total_count(self.count), 1)
        H, C = self.S * c, self.C * c
        self.S = self.C = None
        return H, C


def fias_targets(Ws: list[torch.Tensor], H: torch.Tensor, C: torch.Tensor, damp: float = 0.01) -> list[torch.Tensor]:
    """``W* = (W C + λW)(H + λI)⁻¹`` for every ``W`` (m_k, n) of a group sharing ``H``, ``C`` (n, n);
    ``λ = damp·mean(diag H)``.

    One float64 Cholesky factorization serves the whole group; returns each ``W*`` in its ``W``'s dtype.
    A dead input (``x_j ≡ 0``) has ``H``'s and ``C``'s column ``j`` zero, so its weight column stays as it was."""
    Hd, Cd = H.double(), C.double()
    lam = damp * float(torch.diag(Hd).mean().clamp(min=1e-12))
    L = torch.linalg.cholesky(Hd + lam * torch.eye(Hd.shape[0], dtype=Hd.dtype, device=Hd.device))
    out = []
    for W in Ws:
        Wd = W.double()
        rhs = (Wd @ Cd + lam * Wd).T                          # (n, m); W*ᵀ = (H + λI)⁻¹ rhs (symmetric)
        out.append(torch.cholesky_solve(rhs, L).T.to(W.dtype).contiguous())
    return out


def fias_target(W: torch.Tensor, H: torch.Tensor, C: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """:func:`fias_targets` for one ``W`` (m, n)."""
    return fias_targets([W], H, C, damp)[0]


def input_of(block: nn.Module, lin: nn.Module, h: torch.Tensor, call: tuple) -> torch.Tensor:
    """The input ``lin`` (a linear inside ``block``) receives when ``block`` runs on ``h`` with
    ``call = (args, kwargs)``; the forward pass stops there."""
    got: list[torch.Tensor] = []

    def hook(_mod, args):
        got.append(args[0].detach())
        raise StopForward

    handle = lin.register_forward_pre_hook(hook)
    try:
        args, kwargs = call
        block(h, *args, **kwargs)
    except StopForward:
        pass
    finally:
        handle.remove()
    if not got:
        raise RuntimeError("input_of: the linear was not called by its block")
    return got[0]
