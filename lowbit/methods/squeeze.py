"""``--method squeeze`` (the Squeeze10-LLM paper, arXiv 2507.18073): staged 1-bit/4-bit mixed precision: a GPTQ stage at ``--high-bits``, then
the ``--binary-frac`` of (row, group) cells with the least output error (PBAR) binarized; layer targets from
the float model's stream (FIAS, on by default); optional fine-tuning of the cells' scales.  Solver:
:func:`lowbit.solvers.squeeze.solve`; fine-tuning: :func:`lowbit.calib.finetune.block_finetuner` ("bin+int")."""
from dataclasses import dataclass

from ..errors import LowbitError
from ..solvers import squeeze
from .base import FinetuneOptions, MethodSpec, finetuner, option, register


@dataclass(frozen=True)
class SqueezeOptions(FinetuneOptions):
    binary_frac: float = option(0.8, "fraction of (row, group) cells binarized")
    high_bits: int = option(4, "bits of the cells that are not binarized", choices=(2, 3, 4, 5, 6, 7, 8))
    squeeze_score: str = option("pbar", "which cells to binarize: pbar (output error) or magnitude",
                                choices=("pbar", "magnitude"))
    squeeze_staged: bool = option(True, "score the cells against the high-bit stage-1 solution (off: against FP, "
                                        "no stage 1)", negate="--one-shot")
    binary_residual: bool = option(False, "binary cells μ + α₁·b₁ + α₂·b₂ (BiLLM residual; +1 bit/weight, "
                                          "+fp16/cell)")
    ft_lr: float = option(5e-3, "--finetune: Adam learning rate of the cells' scales/offsets")

    def __post_init__(self):
        if not 0 <= self.binary_frac <= 1:
            raise LowbitError(f"--binary-frac {self.binary_frac} must be in [0, 1]")
        if not 2 <= self.high_bits <= 8:
            raise LowbitError(f"--high-bits {self.high_bits} is not supported (2..8)")
        if self.squeeze_score not in ("pbar", "magnitude"):
            raise LowbitError(f"--squeeze-score {self.squeeze_score!r}: choose pbar or magnitude")
        super().__post_init__()


register(MethodSpec(
    name="squeeze", title="staged 1-bit/4-bit mixed precision with PBAR and FIAS (Squeeze10-LLM, arXiv 2507.18073)",
    order=4, options=SqueezeOptions, solve=squeeze.solve, needs=frozenset({"calibration", "fp_targets"}),
    finetuner=finetuner("bin+int"), produces="bin+int"))
