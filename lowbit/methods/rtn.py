"""RTN: round-to-nearest on the group grid (with the MSE range search); data-free, no Hessian.

The method's loop is the data-free block walk (:func:`lowbit.calib.runner.quantize_data_free`): each linear's
float32 weight ``W`` (m, n) goes to :func:`lowbit.solvers.rtn.solve` (or a GGUF type's grid with
``--gguf-type``) and becomes a :class:`~lowbit.packed.qlinear.QuantLinear`.
"""
from ..solvers import rtn
from .base import MethodSpec, RunContext, register


def run(ctx: RunContext) -> dict:
    from ..calib.runner import quantize_data_free

    return quantize_data_free(ctx.model, ctx.spec, ctx.solve, ctx.offload)


register(MethodSpec(
    name="rtn", title="round-to-nearest on the group grid; data-free", order=0,
    solve=rtn.solve, run=run, needs=frozenset(), resume=False, gguf=True, produces="int"))
