"""Running statistics of a linear layer's inputs, and the hook that collects them.

``window_gram`` is the pure step: ``P_w = X_wᵀX_w`` of one calibration window ``X_w`` (T, n).  The sum
``S = Σ_w P_w`` runs in float64 over the windows in their global order, one window at a time
(:func:`~lowbit.calib.distributed.add_in_window_order`), and the proxy Hessian is ``H = 2/N·S`` (``N`` tokens).  Each ``P_w`` is one matrix
product of the same shape whatever the micro-batch, and the float64 sum has a fixed order, so ``S`` does not
depend on how the windows are grouped into micro-batches or spread over processes.  ``capture_inputs``
wraps it in a context manager that always removes its hook.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .distributed import add_in_window_order, total_count, world


def float_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` (…, n) as rows ``X`` (N, n) in float32 at least, whatever the activations' dtype: a bf16
    product is 4× faster on CPUs with bf16 units, but its output rounding (~2⁻⁹ relative) measurably hurt
    GPTQ on the demo model (ppl +1.9 %, README design choices); float16 sums of squares can also overflow."""
    X = x.reshape(-1, x.shape[-1])
    return X if X.dtype in (torch.float32, torch.float64) else X.float()


def windows_of(X: torch.Tensor, rows: int) -> tuple[torch.Tensor, ...]:
    """The calibration windows in rows ``X`` (B·T, n): consecutive blocks of ``rows`` = T rows
    (``rows = 0``: ``X`` is one window)."""
    return X.split(rows) if rows else (X,)


PANEL = 128  # columns per panel of window_gram (measured fastest on 2 AVX-512 cores for n = 576 and 1536)


def window_gram(X: torch.Tensor) -> torch.Tensor:
    """``P = XᵀX`` (n, n) of one window's rows ``X`` (T, n), computed as a symmetric rank-T update.

    With ``X = [X_1 … X_k]`` in column panels of :data:`PANEL`, only the upper panels are multiplied,
    ``P[a, a:] = X_aᵀ X[:, a:]``, and the lower ones are their transposes: ``≈ (k + 1)/2k`` of the
    ``2·T·n²`` FLOPs of the full product (0.55× at n = 1536), and ``P`` is exactly symmetric.  Each entry is
    the same length-``T`` dot product the full product computes, and BLAS blocks the ``T`` sum the same
    way (checked bit for bit against ``X.T @ X`` on the demo model's shapes, tests/test_solvers.py)."""
    n = X.shape[1]
    if n < 2 * PANEL:
        return X.T @ X
    P = X.new_empty(n, n)
    for a in range(0, n, PANEL):
        P[a:a + PANEL, a:] = X[:, a:a + PANEL].T @ X[:, a:]
    for a in range(0, n - PANEL, PANEL):
        P[a + PANEL:, a:a + PANEL] = P[a:a + PANEL, a + PANEL:].T
    return P


def add_upper_gram(S: torch.Tensor, X: torch.Tensor) -> bool:
    """``S += XᵀX`` on the upper panels of ``S`` only (``S[a, a:] += X_aᵀ X[:, a:]`` per panel ``a`` of
    :data:`PANEL` columns, in ``S``'s dtype): the products of :func:`window_gram` without forming the lower
    half, and about half the float64 memory traffic of ``S += P``, which on 2 cores cost as much as the
    product itself (n = 1536: 6 ms per window against 12 ms).  Returns whether only the upper panels were
    touched (``n ≥ 2·PANEL``; then :func:`mirror_upper` completes ``S``); for a small ``n``, ``S += XᵀX``.
    The entries summed are the same bits as in :func:`window_gram`, in the same order, so the mirrored sum
    equals the full one exactly."""
    n = X.shape[1]
    if n < 2 * PANEL:
        S += (X.T @ X).to(S.device)
        return False
    for a in range(0, n, PANEL):
        S[a:a + PANEL, a:] += (X[:, a:a + PANEL].T @ X[:, a:]).to(S.device)
    return True


def mirror_upper(S: torch.Tensor) -> None:
    """Fill the lower panels of ``S`` (n, n) from its upper ones, in place (after :func:`add_upper_gram`)."""
    n = S.shape[0]
    for a in range(0, n - PANEL, PANEL):
        S[a + PANEL:, a:a + PANEL] = S[a:a + PANEL, a + PANEL:].T


@dataclass
class InputStats:
    """Running ``S = Σ_w X_wᵀX_w`` over windows (float64, window order) and token count ``N`` of one input;
    ``hessian()`` = ``2/N·S`` (float32).

    ``window``: tokens per calibration window (each ``add`` splits its rows into windows of that many;
    0 = each ``add`` is one window).  ``rounds``: under torchrun, the rounds every rank must take part in
    (:func:`~lowbit.calib.distributed.rounds`); a rank with fewer windows adds zeros in ``hessian()``."""

    n: int
    device: torch.device
    window: int = 0
    rounds: int = 0
    S: torch.Tensor = field(init=False)
    count: int = 0
    seen: int = 0
    upper: bool = False  # S holds only its upper panels (see add_upper_gram) until hessian() mirrors them

    def __post_init__(self):
        self.S = torch.zeros(self.n, self.n, dtype=torch.float64, device=self.device)

    def add(self, x: torch.Tensor) -> None:
        X = float_rows(x)
        for Xw in windows_of(X, self.window):
            if world()[1] == 1:  # one process: only the upper panels are summed (mirrored in hessian())
                self.upper = add_upper_gram(self.S, Xw) or self.upper
            else:
                add_in_window_order(self.S, window_gram(Xw))
            self.seen += 1
        self.count += X.shape[0]

    def pad(self) -> None:
        """Take part in the rounds this rank has no window for (zeros), so every rank's collectives match."""
        if world()[1] > 1 and self.seen < self.rounds:
            zeros = torch.zeros(self.n, self.n, dtype=torch.float32, device=self.device)
            while self.seen < self.rounds:
                add_in_window_order(self.S, zeros)
                self.seen += 1

    def hessian(self, free: bool = False) -> torch.Tensor:
        """``2/N·S`` over every rank's tokens when distributed (every rank already holds the whole ``S``).

        Converted a few rows at a time (no n×n float64 temporary); ``free=True`` then drops ``S`` (the
        float64 n×n is not held while the layer is solved; this object can no longer accumulate)."""
        if self.S is None:
            raise RuntimeError("InputStats.hessian() after hessian(free=True)")
        self.pad()
        if self.upper:
            mirror_upper(self.S)
            self.upper = False
        count = total_count(self.count)
        c = 2.0 / max(count, 1)
        H = torch.empty(self.S.shape, dtype=torch.float32, device=self.S.device)
        rows = max(1, (1 << 20) // max(self.n, 1))
        for r0 in range(0, self.S.shape[0], rows):
            H[r0:r0 + rows] = self.S[r0:r0 + rows] * c   # the same float64 product, rounded to float32
        if free:
            self.S = None
        return H


class StopForward(Exception):
    """Raised by a hook to end a forward pass once the inputs it needs are collected."""


@contextmanager
def capture_inputs(module: nn.Linear, stats: InputStats, stop: bool = False):
    """While active, every call of ``module`` adds its input to ``stats``; with ``stop`` the forward
    pass is then cut short by :class:`StopForward` (the caller catches it)."""

    def hook(_mod, args):
        stats.add(args[0].detach())
        if stop:
            raise StopForward

    handle = module.register_forward_pre_hook(hook)
    try:
        yield stats
    finally:
        handle.remove()
