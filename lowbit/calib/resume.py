"""Per-block checkpoints of the calibration runner, so a killed run continues where it stopped (``--resume``).

Layout of the work area ``OUT.work/blocks/`` (``OUT`` = the ``--out`` folder; DL-QAT keeps its own training
checkpoints directly in ``OUT.work/``)::

    block_NNNN.safetensors   packed tensors of block NNNN's quantized linears, keys ``<layer>/<tensor>``
    inputs_NNNN.safetensors  the hidden states block NNNN produced, i.e. the next block's inputs
                             (one tensor ``input.MMMMM`` per micro-batch, in the runner's dtype)
    block_NNNN.json          commit record: fingerprint, block index, per layer its packed ``meta()`` and ``info``

Why it is exact.  The runner's state between blocks is: the packed results of the finished blocks, the next
block's inputs, and things recomputed identically on every run (the captured per-block keyword arguments, GWQ's
gradients, the float weights of the remaining blocks).  Both saved parts are stored bit for bit (safetensors,
JSON floats round-trip exactly), so a resumed run feeds block ``k+1`` exactly what an uninterrupted run would have
and writes byte-identical files.  (QuIP#'s fine-tuning seeds its window order from the block index for the same
reason.)

Why it is safe.  Every file is written to a temporary name and renamed into place, and the ``.json`` of a block is
written last: a block counts as finished only when its commit record exists, so a kill at any point leaves either
a finished block or leftovers that are ignored and overwritten.  The inputs of block ``k-1`` are deleted only after
block ``k`` is committed, so the newest finished block always has its inputs (older inputs are not kept: for the
demo model each set is ~40 MB).  The fingerprint (:func:`fingerprint`) covers the source model, its config, the
resolved quantization and calibration configs, the runner's device type and dtype, the calibration windows and
the lowbit version; a work area written with anything different refuses to resume with a :class:`LowbitError`
instead of silently mixing two runs.  No pickles: tensors in safetensors, everything else JSON.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError

from ..errors import LowbitError
from ..jsonio import dumps


def _source_files(source: dict) -> list:
    """``(name, size, mtime_ns)`` of the model's files: a cheap identity of the weights themselves
    (hashing every weight would cost minutes on a large model); a changed file refuses to resume."""
    kind, path = source.get("kind"), source.get("path")
    if kind not in ("folder", "gguf", "lowbit") or not path or not Path(path).is_dir():
        return []
    files = [Path(path) / source["gguf_file"]] if kind == "gguf" else sorted(Path(path).iterdir())
    out = []
    for f in files:
        if f.is_file():
            st = f.stat()
            out.append((f.name, st.st_size, st.st_mtime_ns))
    return out


def fingerprint(source: dict, model_config: str, quant: dict, calib: dict, windows: str, runner: dict,
                version: str) -> str:
    """sha256 over everything that decides the runner's results (see the module docstring)."""
    blob = dumps({"source": source, "files": _source_files(source), "model_config": model_config,
                       "quant": quant, "calib": calib, "windows": windows, "runner": runner, "lowbit": version},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:  # safetensors reports its I/O errors (disk full) as SafetensorError
        tmp.unlink(missing_ok=True)
        why = getattr(e, "strerror", None) or str(e).splitlines()[0][:200]
        raise LowbitError(f"--out: cannot write the block checkpoint '{path}' ({why}); "
                          f"fix that and rerun with --resume") from None


class BlockCheckpoints:
    """The runner's per-block checkpoints in ``work_dir/blocks`` for one run identified by ``key``.

    ``restore(n_blocks)`` (called once, before the first block) clears a stale area unless ``resume``, and with
    ``resume`` returns what the finished blocks left; ``save(i, layers, inputs)`` commits block ``i``;
    ``finish()`` removes the area once the output is saved."""

    def __init__(self, work_dir: str | os.PathLike, key: str, resume: bool = False):
        self.work = Path(work_dir)
        self.dir = self.work / "blocks"
        self.key, self.resume = key, resume

    def _clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def _meta(self, i: int) -> dict | None:
        path = self.dir / f"block_{i:04d}.json"
        if not path.is_file():
            return None
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError):
            raise LowbitError(f"--resume: '{path}' is unreadable or corrupt; rerun without --resume") from None
        if not isinstance(meta, dict) or meta.get("fingerprint") != self.key or meta.get("block") != i:
            raise LowbitError(f"--resume: the work folder '{self.work}' was written with different settings (model, "
                              f"quantization or calibration config, calibration data or lowbit version); rerun "
                              f"without --resume to start over, or delete it")
        return meta

    def _tensors(self, path: Path) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # missing, truncated or corrupt: safetensors raises its own error types
            raise LowbitError(f"--resume: '{path}' is missing or corrupt ({str(e).splitlines()[0][:120]}); "
                              f"rerun without --resume") from None

    def restore(self, n_blocks: int) -> tuple[int, dict[str, tuple[object, dict]], list[torch.Tensor] | None]:
        """``(next block to run, {layer: (packed, info)} of the finished blocks, inputs of the next block)``;
        ``(0, {}, None)`` when there is nothing to resume (then the area is cleared)."""
        from ..packed.qweight import FormatError, from_tensors

        if not self.resume:
            self._clear()
            return 0, {}, None
        metas = []
        for i in range(n_blocks):
            meta = self._meta(i)
            if meta is None:
                break
            metas.append(meta)
        if not metas:
            return 0, {}, None
        results: dict[str, tuple[object, dict]] = {}
        for i, meta in enumerate(metas):
            path = self.dir / f"block_{i:04d}.safetensors"
            tensors = self._tensors(path)
            layers = meta.get("layers")
            if not isinstance(layers, dict):
                raise LowbitError(f"--resume: '{self.dir / f'block_{i:04d}.json'}' lacks 'layers'")
            for name, entry in layers.items():
                mine = {k[len(name) + 1:]: t for k, t in tensors.items() if k.startswith(name + "/")}
                try:
                    results[name] = (from_tensors(mine, entry["meta"]), entry["info"])
                except (FormatError, KeyError, TypeError) as e:
                    raise LowbitError(f"--resume: '{path}': layer '{name}': {e}") from None
        k = len(metas) - 1
        saved = self._tensors(self.dir / f"inputs_{k:04d}.safetensors")
        n_inputs = metas[k].get("inputs")
        keys = [f"input.{j:05d}" for j in range(n_inputs if isinstance(n_inputs, int) else -1)]
        if not keys or any(key not in saved for key in keys):
            raise LowbitError(f"--resume: '{self.dir / f'inputs_{k:04d}.safetensors'}' does not hold "
                              f"the inputs of block {k + 1}; rerun without --resume")
        return len(metas), results, [saved[key] for key in keys]

    def save(self, i: int, layers: dict[str, tuple[object, dict]], inputs: list[torch.Tensor]) -> None:
        """Commit block ``i``: its layers' packed weights and infos, and the inputs of block ``i+1``."""
        from safetensors.torch import save_file

        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise LowbitError(f"--out: cannot write the work folder '{self.dir}' ({e.strerror or e})") from None
        tensors = {f"{name}/{k}": t.detach().cpu().contiguous()
                   for name, (packed, _) in layers.items() for k, t in packed.tensors().items()}
        _write_atomic(self.dir / f"block_{i:04d}.safetensors", lambda p: save_file(tensors, str(p)))
        hidden = {f"input.{j:05d}": h.detach().cpu().contiguous() for j, h in enumerate(inputs)}
        _write_atomic(self.dir / f"inputs_{i:04d}.safetensors", lambda p: save_file(hidden, str(p)))
        record = {"fingerprint": self.key, "block": i, "inputs": len(inputs),
                  "layers": {name: {"meta": packed.meta(), "info": info} for name, (packed, info) in layers.items()}}
        _write_atomic(self.dir / f"block_{i:04d}.json", lambda p: p.write_text(dumps(record, indent=1) + "\n"))
        if i > 0:  # only the newest finished block's outputs are needed to continue
            (self.dir / f"inputs_{i - 1:04d}.safetensors").unlink(missing_ok=True)

    def finish(self) -> None:
        """The output is saved: drop the checkpoints (and the work folder if nothing else is in it)."""
        self._clear()
        try:
            self.work.rmdir()
        except OSError:
            pass
