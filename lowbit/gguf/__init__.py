"""GGUF (llama.cpp) quantization types: one table (:mod:`.types`), a codec per type family, llama.cpp's
per-tensor presets (:mod:`.presets`), and the solvers that put RTN, GPTQ and FOEM onto those grids (:mod:`.solve`)."""
from .presets import canonical, is_preset, preset_type
from .types import QUANT_TYPES, TYPES, GGUFType, get, resolve

__all__ = ["TYPES", "QUANT_TYPES", "GGUFType", "get", "resolve", "canonical", "is_preset", "preset_type"]
