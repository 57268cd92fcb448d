"""lowbit: quantize LLM weights to a few bits, with the accuracy of recent research, and prove it.

Public API: :func:`quantize`, :func:`load`, :func:`evaluate_ppl` (see :mod:`lowbit.api`).
"""
__version__ = "0.1.0"

from .api import QuantizeResult, evaluate_ppl, load, load_any, quantize  # noqa: E402
from .config import CalibConfig, Method, QuantConfig  # noqa: E402
from .errors import LowbitError  # noqa: E402

__all__ = ["quantize", "load", "load_any", "evaluate_ppl", "QuantizeResult", "QuantConfig", "CalibConfig",
           "Method", "LowbitError", "__version__"]
