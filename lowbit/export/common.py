"""What both exporters share: reading a lowbit checkpoint without building a model, and atomic output.

:func:`read_checkpoint` returns the packed weights of every quantized linear (rebuilt from
``model.safetensors`` with the format classes of :mod:`lowbit.packed.qweight`), every other tensor
as stored (fp16/bf16: embeddings, norms, biases, an untied head), the HF config as a dict and the
``lowbit.json`` description.  Nothing here imports transformers or builds an ``nn.Module``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import LowbitError
from ..packed import checkpoint
from ..packed.qweight import FormatError, GroupQuantWeight, from_tensors


@dataclass
class Checkpoint:
    """A lowbit checkpoint read for export."""

    path: Path
    meta: dict                       # lowbit.json
    config: dict                     # config.json
    layers: dict[str, object]        # layer name -> packed weight (GroupQuantWeight, ...)
    biases: dict[str, torch.Tensor]  # layer name -> bias of a quantized linear
    others: dict[str, torch.Tensor]  # every other tensor, by state-dict name

    def int_layers(self, what: str) -> dict[str, GroupQuantWeight]:
        """The layers as :class:`GroupQuantWeight`; any other packed format -> LowbitError naming ``what``."""
        bad = [(n, p.kind) for n, p in self.layers.items() if not isinstance(p, GroupQuantWeight)]
        if bad:
            raise LowbitError(f"{what} needs uniform-integer layers (methods rtn, gptq, foem, dlqat); "
                              f"layer '{bad[0][0]}' is '{bad[0][1]}'")
        return dict(self.layers)


def read_checkpoint(model_dir: str | os.PathLike) -> Checkpoint:
    """Read ``DIR`` (lowbit.json, model.safetensors, config.json); every failure is a one-line LowbitError."""
    path = Path(model_dir)
    meta = checkpoint.read_meta(path)
    tensors = checkpoint._read_tensors(path / checkpoint.WEIGHTS_FILE)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise LowbitError(f"{path / 'config.json'}: cannot read the model config ({e})") from None
    layers, biases = {}, {}
    for name, lmeta in meta["layers"].items():
        prefix = name + "."
        mine = {k[len(prefix):]: tensors.pop(k) for k in [k for k in tensors if k.startswith(prefix)]}
        if "bias" in mine:
            biases[name] = mine.pop("bias")
        try:
            layers[name] = from_tensors(mine, lmeta)
        except FormatError as e:
            raise LowbitError(f"{path / checkpoint.WEIGHTS_FILE}: layer '{name}': {e}") from None
    return Checkpoint(path, meta, config, layers, biases, tensors)


def fp16_state(ck: Checkpoint, layers: dict, tensors_of) -> dict[str, torch.Tensor]:
    """The exported state dict: each packed layer's tensors from ``tensors_of(name, weight)`` (a dict of
    suffix -> tensor), its bias and every other tensor (embedding, norms, head) in float16."""
    state: dict[str, torch.Tensor] = {}
    for name, p in layers.items():
        for key, t in tensors_of(name, p).items():
            state[f"{name}.{key}"] = t
        if name in ck.biases:
            state[f"{name}.bias"] = ck.biases[name].to(torch.float16).contiguous()
    for name, t in ck.others.items():
        state[name] = (t.to(torch.float16) if t.is_floating_point() else t).contiguous()
    return state


def check_out_dir(out: Path) -> None:
    """``--out`` for a folder must not exist, or be an empty folder."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LowbitError(f"--out '{out}' exists and is not an empty folder; refusing to overwrite it")


@contextmanager
def atomic_path(out: str | os.PathLike, folder: bool):
    """Yield a temporary sibling of ``out`` (a file path, or a created folder); rename it to ``out`` on success.

    On any error the temporary file or folder is removed, so ``out`` is never half-written."""
    out = Path(out)
    if folder:
        check_out_dir(out)
    elif out.is_dir():
        raise LowbitError(f"--out '{out}' is a folder; give the path of the .gguf file to write")
    from ..outputs import make_parents, remove_made

    made = []
    try:
        made = make_parents(out.parent)  # removed again on failure: nothing new is left behind
        if folder:
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)
        else:
            fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
            os.close(fd)
            tmp = Path(name)
    except OSError as e:
        remove_made(made)
        raise LowbitError(f"--out '{out}': cannot write there ({e.strerror})") from None
    try:
        yield tmp
        if folder:
            if out.exists():
                out.rmdir()  # checked empty above
            tmp.rename(out)
        else:
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, out)
    except OSError as e:
        _remove(tmp)
        remove_made(made)
        raise LowbitError(f"--out '{out}': writing failed ({e.strerror or e})") from None
    except BaseException:
        _remove(tmp)
        remove_made(made)
        raise


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _remove(p: Path) -> None:
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)
