"""lowbit: quantize LLM weights to a few bits, with the accuracy of recent research, and prove it.

Public API: :func:`quantize`, :func:`load`, :func:`evaluate_ppl` (see :mod:`lowbit.api`).
The names are imported on first use, so ``lowbit --help`` and argument errors do not wait for torch.
"""
from ._version import __version__  # noqa: F401

from .errors import LowbitError  # noqa: E402
from .lazy import lazy

_LAZY = {"quantize": "api", "load": "api", "load_any": "api", "evaluate_ppl": "api", "QuantizeResult": "api",
         "QuantConfig": "config", "CalibConfig": "config", "GridConfig": "config", "Method": "config"}

__all__ = ["quantize", "load", "load_any", "evaluate_ppl", "QuantizeResult", "QuantConfig", "CalibConfig",
           "GridConfig", "Method", "LowbitError", "__version__"]


__getattr__, __dir__ = lazy(__name__, _LAZY, __all__)
