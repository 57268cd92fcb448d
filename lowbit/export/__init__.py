"""Export a lowbit checkpoint to other runtimes' formats.

* :func:`export_gguf` (:mod:`.gguf`) — one GGUF file for llama.cpp / transformers' GGUF loader;
  uniform-integer layers on a 32-aligned grid are re-encoded losslessly as Q4_0/Q4_1/Q5_0/Q5_1/Q8_0.
* :func:`export_gptq` (:mod:`.gptq`) — a Hugging Face GPTQ checkpoint folder (AutoGPTQ/GPTQModel
  "gptq" v1 packing for symmetric grids, "gptq_v2" for asymmetric ones).
* :func:`export_compressed_tensors` (:mod:`.compressed_tensors`) — a compressed-tensors
  ``pack-quantized`` folder (vLLM / llm-compressor), written by the ``compressed-tensors`` library.
* :func:`check_export` (:mod:`.check`) — load an export with its reference client and compare its
  perplexity with lowbit's own.

The CLI is ``lowbit export DIR --format gguf|gptq|compressed-tensors --out PATH [--check]`` (:mod:`.cli`).
"""
from __future__ import annotations


def export_gguf(model_dir, out, requantize=None, dtype="f16") -> dict:
    from .gguf import export_gguf as run

    return run(model_dir, out, requantize=requantize, dtype=dtype)


def export_gptq(model_dir, out, checkpoint_format=None) -> dict:
    from .gptq import export_gptq as run

    return run(model_dir, out, checkpoint_format=checkpoint_format)


def export_compressed_tensors(model_dir, out) -> dict:
    from .compressed_tensors import export_compressed_tensors as run

    return run(model_dir, out)


def check_export(model_dir, exported, fmt, **kw) -> dict:
    from .check import check_export as run

    return run(model_dir, exported, fmt, **kw)


__all__ = ["export_gguf", "export_gptq", "export_compressed_tensors", "check_export"]
