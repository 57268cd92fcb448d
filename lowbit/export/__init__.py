"""Export a lowbit checkpoint to other runtimes' formats.

* :func:`export_gguf` (:mod:`.gguf`) — one GGUF file for llama.cpp / transformers' GGUF loader;
  uniform-integer layers on a 32-aligned grid are re-encoded losslessly as Q4_0/Q4_1/Q5_0/Q5_1/Q8_0.
* :func:`export_gptq` (:mod:`.gptq`) — a Hugging Face GPTQ checkpoint folder (AutoGPTQ/GPTQModel
  "gptq" v1 packing, or "gptq_v2").

The CLI is ``lowbit export DIR --format gguf|gptq --out PATH`` (:mod:`.cli`).
"""
from __future__ import annotations


def export_gguf(model_dir, out, requantize=None, dtype="f16") -> dict:
    from .gguf import export_gguf as run

    return run(model_dir, out, requantize=requantize, dtype=dtype)


def export_gptq(model_dir, out, checkpoint_format="gptq") -> dict:
    from .gptq import export_gptq as run

    return run(model_dir, out, checkpoint_format=checkpoint_format)


__all__ = ["export_gguf", "export_gptq"]
