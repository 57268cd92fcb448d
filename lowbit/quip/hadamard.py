"""QuIP#'s seeded randomized Hadamard transform (RHT) for the solver: ``V = T·diag(s)`` with drawn signs.

``T`` is the orthonormal Hadamard (``n = K·2^p``) or FFT transform of :mod:`lowbit.packed.rht` (where the
Hadamard matrices are generated; its names are re-exported here).  ``RHT(n, seed)``: seeded signs
s ∈ {±1}ⁿ (own ``torch.Generator``, the global RNG is untouched).  For a weight W (m, n) and Hessian H (n, n),
with ``U = RHT(m, ·)``: ``W̃ = U W Vᵀ``, ``H̃ = V H Vᵀ`` and ``tr(ΔW̃ H̃ ΔW̃ᵀ) = tr(ΔW H ΔWᵀ)``.  At inference
``y = W x = Uᵀ W̃ (V x)``: ``y = U.inverse(W̃ @ V.forward(x))`` (what ``QuipWeight`` does with the stored signs).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

from ..packed.rht import (fft_transform, fwht, hadamard_dense, hadamard_factor, hadamard_matrix,  # noqa: F401
                          hadamard_transform, jacobsthal, paley1, paley2, recipe, sylvester)


# ---------------------------------------------------------------- seeded RHT
@dataclass(frozen=True)
class RHT:
    """Randomized orthogonal transform ``V = T·diag(s)`` over a last dim of size ``n``.

    ``kind``: "hadamard" (n = K·2^p), "fft" (n even) or "auto" (Hadamard when possible, else FFT); the
    resolved kind is stored.  ``s`` (n,) ±1 comes from ``torch.Generator().manual_seed(seed)``.
    """

    n: int
    seed: int
    kind: str = "auto"

    def __post_init__(self):
        kind = self.kind
        if kind == "auto":
            kind = "hadamard" if hadamard_factor(self.n) else "fft"
        if kind not in ("hadamard", "fft"):
            raise ValueError(f"RHT kind must be 'auto', 'hadamard' or 'fft', not {self.kind!r}")
        if kind == "hadamard" and hadamard_factor(self.n) is None:
            raise ValueError(f"dimension {self.n} has no constructible Hadamard decomposition")
        if kind == "fft" and self.n % 2:
            raise ValueError(f"dimension {self.n} is odd: neither a Hadamard nor the FFT transform applies")
        object.__setattr__(self, "kind", kind)

    @cached_property
    def signs(self) -> torch.Tensor:
        """s (n,) float32 in {−1, +1}, CPU."""
        g = torch.Generator().manual_seed(self.seed)
        return torch.randint(0, 2, (self.n,), generator=g).float() * 2 - 1

    def _T(self, x: torch.Tensor, inverse: bool) -> torch.Tensor:
        return (hadamard_transform if self.kind == "hadamard" else fft_transform)(x, inverse=inverse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``V x = T(s ⊙ x)`` over the last dim; x (..., n)."""
        return self._T(x * self.signs.to(device=x.device, dtype=x.dtype), inverse=False)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """``Vᵀ y = s ⊙ Tᵀ(y)`` over the last dim; y (..., n)."""
        return self._T(y, inverse=True) * self.signs.to(device=y.device, dtype=y.dtype)

    def matrix(self) -> torch.Tensor:
        """V (n, n) float64 explicitly (tests, small n)."""
        return self.forward(torch.eye(self.n, dtype=torch.float64)).T


def _check(what: str, *pairs: tuple[RHT, int]) -> None:
    for rht, size in pairs:
        if rht.n != size:
            raise ValueError(f"{what} has a dimension of size {size} but the RHT is for n={rht.n}")


def rotate_weight(W: torch.Tensor, U: RHT, V: RHT) -> torch.Tensor:
    """``W̃ = U W Vᵀ`` for W (m, n), U over m, V over n -> (m, n)."""
    _check("W", (U, W.shape[0]), (V, W.shape[1]))
    return U.forward(V.forward(W).mT).mT


def unrotate_weight(Wt: torch.Tensor, U: RHT, V: RHT) -> torch.Tensor:
    """``W = Uᵀ W̃ V`` (inverse of ``rotate_weight``) -> (m, n)."""
    _check("W̃", (U, Wt.shape[0]), (V, Wt.shape[1]))
    return U.inverse(V.inverse(Wt).mT).mT


def rotate_hessian(H: torch.Tensor, V: RHT) -> torch.Tensor:
    """``H̃ = V H Vᵀ`` for H (n, n) -> (n, n)."""
    _check("H", (V, H.shape[0]), (V, H.shape[1]))
    return V.forward(V.forward(H).mT).mT
