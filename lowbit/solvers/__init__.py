"""Solvers: pure functions ``solve(W, H, cfg) -> (packed weight, info)``, one file per algorithm.

``SOLVERS`` maps each registered method's name to its solver (:mod:`lowbit.methods`, the one table), built
on first use: the method files import these modules, so this package does not import them back at load.
"""


def __getattr__(name: str):
    if name == "SOLVERS":
        from ..methods import REGISTRY

        value = {m.name: m.solve for m in REGISTRY.values() if m.solve is not None}
        globals()["SOLVERS"] = value
        return value
    raise AttributeError(f"module 'lowbit.solvers' has no attribute {name!r}")
