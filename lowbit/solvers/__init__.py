"""Solvers: pure functions ``solve(W, H, cfg) -> (packed weight, info)``, one file per method."""
from ..config import Method
from . import gptq, gwq, rtn

SOLVERS = {Method.RTN: rtn.solve, Method.GPTQ: gptq.solve, Method.FOEM: gptq.solve,
           Method.GWQ: gwq.solve}  # FOEM = GPTQ with β > 0
