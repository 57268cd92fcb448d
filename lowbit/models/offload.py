"""Disk offload (``--offload disk``): memory bounded by one decoder block, for models bigger than RAM.

:func:`load_offloaded` builds the float model with every decoder block's *parameters* on the ``meta``
device (no memory; buffers such as rotary frequencies are computed as usual) and loads only the
tensors outside the blocks (embeddings, final norm, head) from the model's safetensors file(s).
The returned :class:`DiskOffload` is handed to the calibration runner, which calls
:meth:`DiskOffload.materialize` just before block ``i`` is processed: block ``i``'s tensors are read
from the safetensors files with ``safe_open`` (one tensor at a time, cast to float32 exactly as
``from_pretrained(dtype=float32)`` does).  Once the block is quantized its linears are
:class:`~lowbit.packed.qlinear.QuantLinear` modules holding packed weights; only they and the
block's small non-linear tensors (norms, biases) stay in memory, so the float weights of at most one
block exist at any time and the saved checkpoint is byte-identical to a run without offload.
Before any of that, :meth:`DiskOffload.check_complete` reads the files' headers: every parameter and
persistent buffer must be there with its shape, so a missing tensor fails at once, not at its block.

Sources: a Hugging Face folder with ``model.safetensors`` or a sharded
``model.safetensors.index.json``; a ``.gguf`` file (or the demo alias) is read from the float
safetensors cache that :func:`~lowbit.models.sources.load_model` writes (on first use the GGUF is
dequantized once, in full, to fill that cache).  Hub ids must be downloaded first.
"""
from __future__ import annotations

import ctypes
import gc
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..errors import LowbitError
from .sources import (_check_folder, _gguf_cache_path, _one_line, check_finite, load_model, resolve, safetensors_keys,
                      stored_names)

OFFLOAD_MODES = ("none", "disk")


@contextmanager
def _params_on_meta():
    """Modules built inside get their parameters on ``meta`` (no memory); buffers stay real."""
    orig = nn.Module.register_parameter

    def register(module, name, param):
        orig(module, name, param)
        if param is not None:
            p = module._parameters[name]
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = orig


def tensor_files(folder: str | Path) -> dict[str, Path]:
    """``{tensor name: safetensors file}`` of a model folder (single file or sharded index)."""
    return safetensors_keys(folder)


class DiskOffload:
    """Loads a model's tensors lazily from safetensors, by dotted name, one decoder block at a time."""

    def __init__(self, model: nn.Module, blocks_path: str, files: dict[str, Path], dtype: torch.dtype, source: str,
                 where: str | Path | None = None):
        self.model, self.blocks_path, self.files, self.dtype, self.source = model, blocks_path, files, dtype, source
        self.where = str(where or source)  # the weights file named in errors (the index of a sharded model)
        self.prefix = getattr(model, "base_model_prefix", "") or ""
        self.loaded: list[int] = []  # block indices in materialization order (for tests and reports)

    def _key(self, name: str) -> str:
        """The file's name for model tensor ``name`` (checkpoints may omit or add the base model prefix)."""
        if name in self.files:
            return name
        if self.prefix and name.startswith(self.prefix + ".") and name[len(self.prefix) + 1:] in self.files:
            return name[len(self.prefix) + 1:]
        if self.prefix and f"{self.prefix}.{name}" in self.files:
            return f"{self.prefix}.{name}"
        raise LowbitError(f"{self.where}: tensor '{name}' is missing (not in the model's safetensors files); "
                          "refusing to run on weights that were not loaded")

    def check_complete(self) -> None:
        """Before any work: every parameter and persistent buffer of the model is in the files (a tied head is
        the embedding's tensor under a second name), so no block fails after hours on the ones before it."""
        from safetensors import safe_open

        wanted: dict[Path, list] = {}
        state = self.model.state_dict(keep_vars=True)
        for name in stored_names(self.model):
            key = self._key(name)
            wanted.setdefault(self.files[key], []).append((name, key))
        for path, items in wanted.items():  # shapes from the headers; no tensor is read
            try:
                with safe_open(str(path), framework="pt") as f:
                    for name, key in items:
                        shape = tuple(f.get_slice(key).get_shape())
                        if shape != tuple(state[name].shape):
                            raise LowbitError(f"{path}: tensor '{key}' has shape {shape}, the model expects "
                                              f"{tuple(state[name].shape)}")
            except LowbitError:
                raise
            except Exception as e:  # a shard that is missing, truncated, or lacks the tensor its index promises
                raise LowbitError(f"{path}: cannot read it ({_one_line(e)})") from None

    def load_into(self, module: nn.Module, prefix: str) -> None:
        """Replace every meta parameter of ``module`` (named ``prefix`` in the model) by its stored tensor."""
        from safetensors import safe_open

        wanted: dict[Path, list] = {}
        for sub_name, sub in module.named_modules():
            for leaf, p in sub._parameters.items():
                if p is not None and p.device.type == "meta":
                    full = ".".join(x for x in (prefix, sub_name, leaf) if x)
                    key = self._key(full)
                    wanted.setdefault(self.files[key], []).append((sub, leaf, key, p.requires_grad))
        for path, items in wanted.items():
            with safe_open(str(path), framework="pt") as f:
                for sub, leaf, key, grad in items:
                    t = f.get_tensor(key)  # a view of the file's mmap: copy it, or every page read stays mapped
                    t = t.to(self.dtype if t.is_floating_point() else t.dtype, copy=True)  # (and counted in RSS)
                    sub._parameters[leaf] = nn.Parameter(t, requires_grad=grad and t.is_floating_point())

    def load_buffers(self) -> None:
        """Persistent buffers (few and small) are read from the files at once, as ``from_pretrained`` does."""
        from safetensors import safe_open

        for name in stored_names(self.model):
            owner, _, leaf = name.rpartition(".")
            mod = self.model.get_submodule(owner)
            if leaf in mod._buffers:
                key = self._key(name)
                with safe_open(str(self.files[key]), framework="pt") as f:
                    t = f.get_tensor(key)
                mod._buffers[leaf] = t.to(self.dtype if t.is_floating_point() else t.dtype, copy=True)

    def materialize(self, i: int) -> None:
        """Load block ``i``'s tensors (called by the runner just before the block is processed)."""
        block = self.model.get_submodule(self.blocks_path)[i]
        self.load_into(block, f"{self.blocks_path}.{i}")
        check_finite(block, self.source)
        self.loaded.append(i)

    def release(self, i: int) -> None:
        """After block ``i`` is quantized: drop what is no longer referenced (its float linear weights)."""
        _free_memory()

    def _embedding_modules(self) -> dict[str, nn.Module]:
        """``{name: module}`` of the input embedding and the output head (one entry when they are the same module)."""
        wanted = {id(m) for m in (self.model.get_input_embeddings(), self.model.get_output_embeddings()) if m is not None}
        return {name: m for name, m in self.model.named_modules() if id(m) in wanted}

    def release_embeddings(self) -> None:
        """Once the calibration inputs of block 0 are captured, the token embedding and the head are not needed
        until the model is saved: their parameters go back to ``meta`` (on a 0.9 B model with a 49 k vocabulary
        that is 0.4 GB of float32) until :meth:`materialize_embeddings` reads them again."""
        for mod in self._embedding_modules().values():
            for leaf, p in list(mod._parameters.items()):
                if p is not None and p.device.type != "meta":
                    mod._parameters[leaf] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)
        _free_memory()

    def materialize_embeddings(self) -> None:
        """Read the embedding and head back from the safetensors files (tied heads are tied again)."""
        tied = getattr(self.model.config, "tie_word_embeddings", False)
        out = self.model.get_output_embeddings()
        with torch.no_grad():
            for name, mod in self._embedding_modules().items():
                if tied and mod is out and mod is not self.model.get_input_embeddings():
                    continue  # tie_weights() below points it at the input embedding
                self.load_into(mod, name)
            if tied:
                self.model.tie_weights()


def _free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise, and they count in RSS)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def load_offloaded(source: str, blocks_path_of, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """Like :func:`~lowbit.models.sources.load_model`, but the decoder blocks' parameters stay on disk.

    ``blocks_path_of(model) -> str`` names the blocks' ``ModuleList`` (``resolve_spec(model).blocks``).
    Returns ``(model, tokenizer, info, offload)``; ``offload.materialize(i)`` loads block ``i``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    info = resolve(source)
    if info["kind"] == "lowbit":
        raise LowbitError(f"model '{source}' is already a lowbit checkpoint; load it with lowbit.load")
    if info["kind"] == "hub":
        raise LowbitError(f"--offload disk needs a local model folder or .gguf file; download '{source}' first "
                          "(huggingface-cli download) and pass its folder")
    kw = {"trust_remote_code": trust_remote_code}
    path = Path(info["path"])
    if info["kind"] == "gguf":
        path = _gguf_cache_path(info["path"], info["gguf_file"])
        if not (path / "config.json").is_file():  # first use: dequantize once to fill the float cache
            model, _, _ = load_model(source, dtype=dtype, trust_remote_code=trust_remote_code)
            del model
            gc.collect()
            if not (path / "config.json").is_file():
                raise LowbitError(f"--offload disk: could not write the float cache of '{source}' under {path.parent}")
    where = _check_folder(path, trust_remote_code)
    files = tensor_files(path)
    try:
        config = AutoConfig.from_pretrained(str(path), **kw)
        with _params_on_meta():
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kw)
        model.tie_weights()  # (the meta copies above untied a tied head; stored_names must see it tied)
    except LowbitError:
        raise
    except Exception as e:  # transformers raises many types for unreadable models
        raise LowbitError(f"cannot load model '{source}': {_one_line(e)}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), **kw)
    except Exception as e:
        raise LowbitError(f"cannot load the tokenizer of model '{source}': {_one_line(e)}") from None
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(path))
    blocks_path = blocks_path_of(model)
    offload = DiskOffload(model, blocks_path, files, dtype, source, where)
    offload.check_complete()
    offload.load_buffers()
    blocks = model.get_submodule(blocks_path)
    block_ids = {id(m) for b in blocks for m in b.modules()}
    tied = set()
    if getattr(model.config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None:
        tied.add(id(model.get_output_embeddings()))
    with torch.no_grad():
        for name, mod in model.named_modules():
            if id(mod) in block_ids or id(mod) in tied:
                continue
            for leaf, p in list(mod._parameters.items()):
                if p is not None and p.device.type == "meta":
                    sub = nn.Module()
                    sub._parameters[leaf] = p
                    offload.load_into(sub, name)
                    mod._parameters[leaf] = sub._parameters[leaf]
        model.tie_weights()
    for name, p in model.named_parameters():
        if p.device.type == "meta" and not name.startswith(blocks_path + "."):
            raise LowbitError(f"--offload disk: tensor '{name}' of model '{source}' could not be loaded")
    model.eval()
    info["model_type"] = model.config.model_type
    info["source"] = source
    return model, tokenizer, info, offload
