"""GPTQ (Frantar et al. 2022): column feedback with the calibration Hessian ``H = 2/N·XᵀX`` (n, n).

The shared grid (:class:`lowbit.config.GridConfig`: bits, groups, act-order, static groups, damp, block
size, MSE) is all its settings; the solver is :func:`lowbit.solvers.gptq.solve`.
"""
from ..solvers import gptq
from .base import MethodSpec, register

register(MethodSpec(
    name="gptq", title="GPTQ: column feedback with the calibration Hessian (Frantar et al. 2022)", order=1,
    solve=gptq.solve, gguf=True, produces="int"))
