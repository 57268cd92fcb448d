"""QuIP# (arXiv 2402.04396): randomized Hadamard incoherence on both sides, BlockLDLQ with the E8P lattice
codebook (residual stages for 3/4 bits); optional per-block fine-tuning of signs and scales.  Solver:
:func:`lowbit.solvers.quip.solve`; fine-tuning: :func:`lowbit.calib.finetune.block_finetuner` ("quip")."""
from dataclasses import dataclass

from ..errors import LowbitError
from ..solvers import quip
from .base import FinetuneOptions, MethodSpec, finetuner, option, register


@dataclass(frozen=True)
class QuIPOptions(FinetuneOptions):
    codebook: str = option("e8p", "e8p (E8P lattice, residual stages for 3/4 bits) or scalar (uniform grid ablation)",
                           choices=("e8p", "scalar"))
    rht: bool = option(True, "randomized Hadamard transform on both sides (--no-rht: ablation)")
    rht_seed: int = option(0, "sign vectors seeded by (rht_seed, layer shape, side)")
    scale_search: bool = option(True, "pick the per-matrix scale among 3 by proxy loss (--no-scale-search: fixed)")
    ft_lr: float = option(1e-3, "--finetune: Adam learning rate (signs; scales at lr/10)")

    def __post_init__(self):
        if self.codebook not in ("e8p", "scalar"):
            raise LowbitError(f"--codebook {self.codebook!r}: choose e8p or scalar")
        super().__post_init__()

    def check_grid(self, grid) -> None:
        if grid.bits not in (2, 3, 4):
            raise LowbitError(f"--bits {grid.bits} is not supported by --method quip (choose 2, 3 or 4)")


register(MethodSpec(
    name="quip", title="QuIP#: RHT incoherence + BlockLDLQ with the E8P lattice codebook (arXiv 2402.04396)",
    order=5, options=QuIPOptions, solve=quip.solve, finetuner=finetuner("quip"),
    produces="quip"))
