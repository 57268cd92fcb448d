"""GWQ (arXiv 2411.00850): the most loss-sensitive weights stay exact in fp16 (CSR), the rest is GPTQ or RTN.

With ``--saliency grad`` it needs ``Σ|∂L/∂W|`` over ``--grad-samples`` calibration windows before the runner
(:func:`lowbit.calib.gradients.weight_saliency`); the solver (:func:`lowbit.solvers.gwq.solve`) gets each
layer's sum as ``saliency=``.
"""
from dataclasses import dataclass

from ..errors import LowbitError
from ..solvers import gwq
from .base import MethodSpec, option, register


@dataclass(frozen=True)
class GWQOptions:
    outlier_frac: float = option(0.01, "fraction of weights kept exactly in fp16")
    saliency: str = option("grad", "outlier score: grad (Σ|∂L/∂W|), hessian (w²/[H⁻¹]_jj²) or magnitude (|w|)",
                           choices=("grad", "hessian", "magnitude"))
    outlier_select: str = option("matrix", "top fraction per matrix, per row or per group",
                                 choices=("matrix", "row", "group"))
    gwq_solver: str = option("gptq", "dense part by gptq (error feedback) or rtn", choices=("gptq", "rtn"))

    def __post_init__(self):
        if not 0 <= self.outlier_frac < 0.5:
            raise LowbitError(f"--outlier-frac {self.outlier_frac} must be in [0, 0.5)")
        for flag, value, choices in (("--saliency", self.saliency, ("grad", "hessian", "magnitude")),
                                     ("--outlier-select", self.outlier_select, ("matrix", "row", "group")),
                                     ("--gwq-solver", self.gwq_solver, ("gptq", "rtn"))):
            if value not in choices:
                raise LowbitError(f"{flag} {value!r}: choose {', '.join(choices)}")


def _needs(cfg) -> frozenset:
    return frozenset({"calibration", "gradients"} if cfg.saliency == "grad" else {"calibration"})


def _offload(cfg) -> str | None:
    if cfg.saliency == "grad":
        return ("--saliency grad (the gradient pass needs the whole float model); use --saliency hessian or "
                "magnitude")
    return None


register(MethodSpec(
    name="gwq", title="GWQ: gradient-selected fp16 outliers + GPTQ/RTN for the rest (arXiv 2411.00850)", order=3,
    options=GWQOptions, solve=gwq.solve, needs=frozenset({"calibration", "gradients"}), needs_for=_needs,
    offload=_offload, produces="int+outliers"))
