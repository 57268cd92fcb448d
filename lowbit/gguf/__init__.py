"""GGUF (llama.cpp) quantization types: one table (:mod:`.types`), a codec per type family, and the
solvers that put RTN, GPTQ and FOEM onto those grids (:mod:`.solve`)."""
from .types import QUANT_TYPES, TYPES, GGUFType, get, resolve

__all__ = ["TYPES", "QUANT_TYPES", "GGUFType", "get", "resolve"]
