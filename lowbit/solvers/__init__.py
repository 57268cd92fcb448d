"""Solvers: pure functions ``solve(W, H, cfg) -> (packed weight, info)``, one file per method."""
from ..config import Method
from . import gptq, gwq, quip, rtn, squeeze

SOLVERS = {Method.RTN: rtn.solve, Method.GPTQ: gptq.solve, Method.FOEM: gptq.solve,
           Method.GWQ: gwq.solve, Method.SQUEEZE: squeeze.solve,
           Method.QUIP: quip.solve}  # FOEM = GPTQ with β > 0
