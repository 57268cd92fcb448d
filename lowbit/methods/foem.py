"""FOEM (arXiv 2507.11017): GPTQ plus a first-order term that pulls quantized columns back toward the
original weights, ``β·(W₀ − W)`` of the columns already done; ``β = 0`` is GPTQ.  Same solver as GPTQ
(:func:`lowbit.solvers.gptq.solve` reads ``beta`` and ``pullback`` when the method is foem)."""
from dataclasses import dataclass

from ..errors import LowbitError
from ..solvers import gptq
from .base import MethodSpec, option, register


@dataclass(frozen=True)
class FOEMOptions:
    beta: float = option(0.1, "first-order coefficient β (0 = GPTQ; > 0.5 degrades)")
    pullback: str = option("next", "pull back the next column only, or all remaining ones", choices=("next", "all"))

    def __post_init__(self):
        if not 0 <= self.beta < 1:
            raise LowbitError(f"--beta {self.beta} must be in [0, 1)")
        if self.pullback not in ("next", "all"):
            raise LowbitError(f"--pullback {self.pullback!r}: choose 'next' or 'all'")


register(MethodSpec(
    name="foem", title="FOEM: GPTQ + first-order error compensation (arXiv 2507.11017)", order=2,
    options=FOEMOptions, solve=gptq.solve, gguf=True, produces="int"))
