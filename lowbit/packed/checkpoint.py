"""The lowbit checkpoint folder: packed weights that load back into a working transformers model.

Layout of ``DIR``::

    lowbit.json          format name + version, method, resolved config, source model,
                         calibration fingerprint, per-layer format and stats, bits/weight
    model.safetensors    packed tensors of quantized linears (``<layer>.qweight`` …) and every other
                         tensor of the model (embeddings, norms, head) in fp16/bf16; tied copies once
    config.json, tokenizer files, generation_config.json   as transformers writes them

:func:`save` writes into a temporary sibling folder and renames it into place, so ``DIR`` is either
the complete old checkpoint or the complete new one, never half-written.  :func:`load` checks the
version, the key set and every shape, and fails with a :class:`LowbitError` naming the file.
``lowbit.json`` records the sha256 of ``model.safetensors`` (``weights_sha256``): flipped bits inside the
tensor data leave a well-formed file that only a checksum can catch (≈ 1 s per GB to verify at load;
checkpoints without the field, written before it existed, load unchecked).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from ..errors import LowbitError
from ..jsonio import dumps
from ..models.modules import replace_module
from .qlinear import QuantLinear
from .base import FORMATS, FormatError, from_tensors

FORMAT = "lowbit"
FORMAT_VERSION = 1
META_FILE = "lowbit.json"
WEIGHTS_FILE = "model.safetensors"


def packed_tensor_names() -> frozenset[str]:
    """The tensor names (suffixes of a layer's name) that the packed formats store: ``qweight``, ``scales``,
    ``qsign``, ``codes``, ``su`` … (the tensor fields of every registered format)."""
    return frozenset(f.name for cls in FORMATS.values() for f in dataclasses.fields(cls) if "Tensor" in str(f.type))


def packed_leftover(keys) -> str | None:
    """The first tensor name among ``keys`` that belongs to a packed layer: a layer ``X`` with at least two
    packed tensors (``X.qweight``, ``X.scales`` …) and no float ``X.weight``; ``None`` for a float model."""
    keys, names = set(keys), packed_tensor_names()
    layers: dict[str, list[str]] = {}
    for k in sorted(keys):
        layer, _, leaf = k.rpartition(".")
        if leaf in names and f"{layer}.weight" not in keys:
            layers.setdefault(layer, []).append(k)
    return next((found[0] for found in layers.values() if len(found) >= 2), None)


def _state_for_saving(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Model tensors to store: packed buffers as they are, float tensors in ``dtype``, tied copies once."""
    seen, out = set(), {}
    for name, t in model.state_dict().items():
        if t.device.type == "meta":
            raise LowbitError(f"tensor '{name}' has no data (meta device); cannot save")
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        is_packed = isinstance(model.get_submodule(name.rpartition(".")[0]) if "." in name else model, QuantLinear)
        if t.is_floating_point() and not (is_packed and not name.endswith(".bias")):
            t = t.to(dtype)
        out[name] = t.detach().cpu().contiguous()
    return out


def is_checkpoint(path: Path) -> bool:
    """Whether the folder ``path`` is a lowbit checkpoint (ours to replace)."""
    return (path / META_FILE).is_file()


def check_out(out_dir: str | os.PathLike, probe: bool = False, force: bool = False) -> None:
    """Refuse an ``--out`` that is someone else's (a file, or a non-empty folder without ``lowbit.json``) unless
    ``force`` and, with ``probe``, one whose nearest existing ancestor cannot be written
    (:func:`lowbit.outputs.probe`).  :func:`lowbit.quantize` calls this before any work, so a bad ``--out``
    fails in a second, not after hours of calibration; :func:`save` checks again."""
    from ..outputs import check_folder

    check_folder(out_dir, "--out", is_checkpoint, "a lowbit checkpoint", force=force, probe_parent=probe)


def swap_into_place(tmp: Path, out: Path) -> None:
    """Put the finished folder ``tmp`` at ``out``: renamed in place, an existing ``out`` moved aside
    first and deleted after, so ``out`` is always either the old or the new complete folder."""
    from ..outputs import remove

    if out.exists() or out.is_symlink():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        remove(old)
    else:
        tmp.rename(out)

def save(out_dir: str | os.PathLike, model: nn.Module, tokenizer, meta: dict, dtype: torch.dtype = torch.float16,
         force: bool = False) -> Path:
    """Write ``model`` (with its :class:`QuantLinear` layers), tokenizer and ``meta`` to ``out_dir``
    (``force``: even over a folder or file that is not a lowbit checkpoint)."""
    from safetensors.torch import save_file

    from ..outputs import make_parents, remove_made

    out = Path(out_dir)
    check_out(out, force=force)
    made = []
    try:
        made = make_parents(out.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; a checkpoint is an ordinary folder
    except OSError as e:
        remove_made(made)
        raise LowbitError(f"--out '{out}': cannot write there ({e.strerror})") from None
    try:
        save_file(_state_for_saving(model, dtype), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        full = {"format": FORMAT, "format_version": FORMAT_VERSION, "dtype": str(dtype).replace("torch.", ""), **meta,
                "weights_sha256": _sha256(tmp / WEIGHTS_FILE)}
        (tmp / META_FILE).write_text(dumps(full, indent=1, sort_keys=False) + "\n")
        swap_into_place(tmp, out)
    except (OSError, SafetensorError) as e:  # safetensors reports its own I/O errors (disk full) as SafetensorError
        shutil.rmtree(tmp, ignore_errors=True)
        remove_made(made)
        why = getattr(e, "strerror", None) or str(e).splitlines()[0][:200]
        raise LowbitError(f"--out '{out}': writing the checkpoint failed ({why})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_made(made)
        raise
    return out


def read_meta(model_dir: str | os.PathLike) -> dict:
    """``lowbit.json`` of a checkpoint, validated for format and version."""
    path = Path(model_dir) / META_FILE
    if not Path(model_dir).is_dir():
        raise LowbitError(f"checkpoint '{model_dir}' not found")
    if not path.is_file():
        raise LowbitError(f"'{model_dir}' is not a lowbit checkpoint: {META_FILE} is missing")
    try:
        meta = json.loads(path.read_text())
    except RecursionError:
        raise LowbitError(f"{path}: not valid JSON (nested too deeply)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LowbitError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise LowbitError(f"{path}: not a lowbit checkpoint description")
    version = meta.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:  # (True == 1 in Python: not a version)
        raise LowbitError(f"{path}: unknown format version {version!r} (this lowbit reads version {FORMAT_VERSION})")
    if not isinstance(meta.get("layers"), dict):
        raise LowbitError(f"{path}: missing or invalid 'layers'")
    _check_types(meta, path)
    return meta


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_types(meta: dict, path: Path) -> None:
    """The fields that readers format: objects where objects are written, numbers where numbers are."""
    for key in ("config", "calibration", "source", "qat"):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            raise LowbitError(f"{path}: '{key}' is not an object")
    if "bits_per_weight" in meta and not _is_number(meta["bits_per_weight"]):
        raise LowbitError(f"{path}: 'bits_per_weight' is not a number")
    for name, layer in meta["layers"].items():
        if not isinstance(layer, dict):
            raise LowbitError(f"{path}: layer '{name}' is not an object")
        if "bits_per_weight" in layer and not _is_number(layer["bits_per_weight"]):
            raise LowbitError(f"{path}: layer '{name}': 'bits_per_weight' is not a number")
        if layer.get("loss") is not None and not _is_number(layer["loss"]):
            raise LowbitError(f"{path}: layer '{name}': 'loss' is not a number")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise LowbitError(f"{path} is missing")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
        raise LowbitError(f"{path} is truncated or corrupt ({str(e).splitlines()[0][:200]})") from None


def check_weights(model_dir: str | os.PathLike) -> Path:
    """``DIR/model.safetensors`` is present and whole, without reading a tensor: safetensors checks that its
    header parses and that the tensors' byte ranges cover the rest of the file exactly (a truncated file fails)."""
    from safetensors import safe_open

    path = Path(model_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise LowbitError(f"{path} is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as e:  # SafetensorError, or OSError for an unreadable file
        raise LowbitError(f"{path} is truncated or corrupt ({(str(e).splitlines() or [type(e).__name__])[0][:200]})") from None
    return path


def load(model_dir: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """Load a checkpoint -> ``(model, tokenizer, meta)``; quantized linears stay packed in memory.

    Unquantized tensors are cast to ``dtype`` (default: float32 on CPU, the stored dtype elsewhere)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    meta = read_meta(model_dir)
    tensors = _read_tensors(model_dir / WEIGHTS_FILE)
    in_file = set(tensors)
    stored = getattr(torch, str(meta.get("dtype", "float16")), torch.float16)
    dtype = dtype or (torch.float32 if torch.device(device).type == "cpu" else stored)
    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)  # (None would prompt on stdin)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    except Exception as e:
        raise LowbitError(f"{model_dir}/config.json: cannot build the model ({str(e).splitlines()[0][:200]})") from None
    wpath = model_dir / WEIGHTS_FILE
    tied_table = False
    for name, lmeta in meta["layers"].items():
        prefix = name + "."
        mine = {k[len(prefix):]: tensors.pop(k) for k in [k for k in tensors if k.startswith(prefix)]}
        bias = mine.pop("bias", None)
        try:
            packed = from_tensors(mine, lmeta)
            old = model.get_submodule(name)
        except FormatError as e:
            raise LowbitError(f"{wpath}: layer '{name}': {e}") from None
        except AttributeError:
            raise LowbitError(f"{wpath}: layer '{name}' does not exist in this model") from None
        if lmeta.get("role") == "token_embd":  # --embedding-type: a GGUF table (and the tied head on it)
            tied_table = _restore_embedding(model, name, old, packed, lmeta, wpath) or tied_table
            continue
        if not isinstance(old, nn.Linear) or tuple(packed.shape) != (old.out_features, old.in_features):
            raise LowbitError(f"{wpath}: layer '{name}' has shape {tuple(packed.shape)}, the model expects "
                              f"{(getattr(old, 'out_features', '?'), getattr(old, 'in_features', '?'))}")
        if old.bias is not None and bias is None:
            raise LowbitError(f"{wpath}: missing tensor '{name}.bias'")
        replace_module(model, name, QuantLinear(packed, None if bias is None else bias.to(dtype)))
    expected = model.state_dict()
    for k, t in tensors.items():
        if k not in expected:
            raise LowbitError(f"{wpath}: unexpected tensor '{k}'")
        if tuple(t.shape) != tuple(expected[k].shape):
            raise LowbitError(f"{wpath}: tensor '{k}' has shape {tuple(t.shape)}, expected {tuple(expected[k].shape)}")
    model.load_state_dict({k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()},
                          strict=False, assign=True)
    if not tied_table:  # (a quantized tied table is tied already: the head holds the embedding's tensor)
        model.tie_weights()
    from ..models.sources import stored_names

    # every parameter and persistent buffer from the file (init_empty_weights leaves the rest on meta or, for
    # buffers, at their initial values): none may run unloaded
    missing = [n for n in stored_names(model) if n not in in_file]
    if missing:
        raise LowbitError(f"{wpath}: missing tensor '{missing[0]}'")
    digest = meta.get("weights_sha256")  # last: a broken structure gets the more telling message above
    if digest is not None and digest != _sha256(wpath):
        raise LowbitError(f"{wpath} is corrupt: its sha256 differs from the one recorded in {META_FILE}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    except Exception as e:
        raise LowbitError(f"{model_dir}: cannot load the tokenizer ({str(e).splitlines()[0][:200]})") from None
    model.to(device).eval()
    return model, tokenizer, meta


def _restore_embedding(model: nn.Module, name: str, old: nn.Module, packed, lmeta: dict, wpath: Path) -> bool:
    """Put a :class:`~.qembedding.QuantEmbedding` on ``packed`` at ``name`` and, when ``lmeta["tied"]``, the
    output head as a :class:`QuantLinear` holding the same tensor -> whether it was tied."""
    from .ggufw import GGUFWeight
    from .qembedding import QuantEmbedding

    if not isinstance(old, nn.Embedding) or not isinstance(packed, GGUFWeight) \
            or tuple(packed.shape) != (old.num_embeddings, old.embedding_dim):
        raise LowbitError(f"{wpath}: layer '{name}' is not this model's token embedding "
                          f"{(getattr(old, 'num_embeddings', '?'), getattr(old, 'embedding_dim', '?'))}")
    qemb = QuantEmbedding.replacing(old, packed)
    replace_module(model, name, qemb)
    tied = lmeta.get("tied") is True
    if tied:
        head = model.get_output_embeddings()
        hname = next((n for n, m in model.named_modules() if m is head), None)
        if not isinstance(head, nn.Linear) or hname is None or head.bias is not None \
                or not getattr(model.config, "tie_word_embeddings", False):
            raise LowbitError(f"{wpath}: layer '{name}' is marked tied, but this model's config has no tied head")
        qhead = QuantLinear(packed)
        replace_module(model, hname, qhead)
        qemb.tie(qhead)
    return tied
