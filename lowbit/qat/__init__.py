"""DL-QAT — weight-decomposed low-rank quantization-aware training (arXiv 2504.09223).

1. **Initial solution** (``init``): every decoder linear is quantized once, by RTN or by GPTQ (the
   calibration runner on a copy of the model).  Its group grid ``s, z`` (m, G) is then fixed, and
   the frozen base weight is ``W₀ = W`` (RTN: the float weights) or ``W₀ = s·(q_GPTQ − z)`` (GPTQ:
   the compensated, dequantized weights, so training starts exactly at the GPTQ model).
2. **Train** group magnitudes ``m`` (m, G) and LoRA ``A`` (r, n), ``B`` (m, r) of every decoder linear
   through ``Ŵ = fp16(m·s)·(clamp(round((W₀ + BA)/s) + z, 0, 2^b − 1) − z)`` (see :mod:`.fakequant`)
   on next-token CE or KL to the float model's logits (see :mod:`.train`).  Everything else is frozen.
3. **Export** (see :mod:`.export`): codes from ``W₀ + BA`` on the fixed grid, ``m`` folded into fp16
   scales: an ordinary ``GroupQuantWeight`` per linear — the checkpoint is plain group-wise INT-b.

With ``--gguf-type`` (:mod:`.gguf`) each layer's grid is set from its GGUF type (Q4_0 = w4 sym g32 …) and
the export is the type's blocks: the trained weight itself on the legacy types, projected onto the others.
"""
from __future__ import annotations

import copy
import hashlib
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ..config import CalibConfig, Method, QuantConfig
from ..data import calibration_windows, read_text, tokenize
from ..errors import LowbitError
from ..models.arch import ArchSpec, blocks_of, linears_of
from ..models.modules import replace_module
from ..packed.qlinear import QuantLinear
from ..packed.qweight import GroupQuantWeight
from .config import QATConfig
from .export import export, trainable_fraction, trainable_params, unique_param_count, wrap
from .fakequant import FakeQuantLinear
from .train import train as train_loop

__all__ = ["QATConfig", "FakeQuantLinear", "QATResults", "quantize_dlqat", "initial_solution"]


class QATResults(dict):
    """``{layer name: (packed, info)}`` like the calibration runner's, plus ``stats`` for the report."""

    stats: dict


def initial_solution(model: nn.Module, tokenizer, spec: ArchSpec, quant: QuantConfig, calib: CalibConfig,
                     qat: QATConfig, device, progress: bool = False,
                     grids: dict | None = None) -> dict[str, tuple[GroupQuantWeight, torch.Tensor]]:
    """``{full layer name: (packed initial solution, W₀ (m, n) float32)}`` for every decoder linear, by
    RTN, GPTQ (on ``calib``) or read from the checkpoint folder ``qat.init``; ``model`` is left untouched.
    ``grids`` ``{full name: QuantConfig | None}`` gives a layer its own grid (``--gguf-type``: :mod:`.gguf`);
    a layer mapped to ``None`` is not trained and left out."""
    def grid(full):
        return quant if grids is None else grids[full]

    if qat.init == "rtn":
        from ..solvers import rtn

        out = {}
        for i, block in enumerate(blocks_of(model, spec)):
            for name, lin in linears_of(block).items():
                full = f"{spec.blocks}.{i}.{name}"
                if grid(full) is not None:
                    W = lin.weight.detach().float().cpu()
                    out[full] = (rtn.solve(W, None, replace(grid(full), method=Method.RTN))[0], W)
        return out
    if qat.init != "gptq":
        return _from_checkpoint(model, spec, grid, qat.init)
    from ..calib.dtype import calib_dtype
    from ..calib.runner import quantize_blocks
    from ..solvers import gptq

    def solve(W, H, name):
        if grid(name) is None:  # not trained: the layer's float weight stands for itself
            from .gguf import float16

            return float16(W), {}
        return gptq.solve(W, H, replace(grid(name), method=Method.GPTQ))

    ids = tokenize(tokenizer, read_text(calib.source, split="calib"))
    windows = calibration_windows(ids, calib.nsamples, calib.seqlen, calib.seed)
    work = copy.deepcopy(model)  # the runner swaps the copy's linears for packed ones
    results = quantize_blocks(work, spec, windows, solve, device=device,
                              dtype=calib_dtype(calib.dtype, device), batch_size=calib.windows_per_batch(),
                              true_sequential=calib.true_sequential, progress=progress)
    del work
    return {name: (packed, packed.dequantize(torch.float32)) for name, (packed, _info) in results.items()
            if grid(name) is not None}


def _from_checkpoint(model: nn.Module, spec: ArchSpec, grid, folder: str) -> dict:
    """Initial solution read from a lowbit checkpoint of the same model: every decoder linear must be
    stored as a ``GroupQuantWeight`` of its grid's (``grid(full name)``) bits and group size, and the same shape."""
    from ..packed.checkpoint import load

    qmodel = load(folder, device="cpu")[0]
    out = {}
    for i, block in enumerate(blocks_of(model, spec)):
        for name, lin in linears_of(block).items():
            full = f"{spec.blocks}.{i}.{name}"
            quant = grid(full)
            if quant is None:
                continue
            packed = getattr(qmodel.get_submodule(full), "packed", None) if _has(qmodel, full) else None
            gguf_sym = quant.gguf_type is not None and packed is not None and packed.sym != quant.sym  # the type's
            if not isinstance(packed, GroupQuantWeight) or packed.shape != tuple(lin.weight.shape) \
                    or packed.bits != quant.bits or packed.group_size != quant.group_size_for(packed.shape[1]) \
                    or gguf_sym:
                kind = f" {'symmetric' if quant.sym else 'asymmetric'}" if quant.gguf_type is not None else ""
                raise LowbitError(f"--init '{folder}': layer '{full}' is not a {quant.bits}-bit{kind}, group "
                                  f"{quant.group_size} integer weight of shape {tuple(lin.weight.shape)}")
            out[full] = (packed, packed.dequantize(torch.float32))
    return out


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def quantize_dlqat(fp_model: nn.Module, tokenizer, spec: ArchSpec, quant: QuantConfig, calib: CalibConfig,
                   qat: QATConfig, device, progress: bool = True, work_dir: str | Path | None = None,
                   gguf_types: dict | None = None) -> QATResults:
    """Quantize ``fp_model``'s decoder linears by DL-QAT, in place: they end as :class:`QuantLinear`.

    ``calib`` gives the training window length (``seqlen``) and, for ``init="gptq"``, the GPTQ
    calibration data; ``work_dir`` holds the training checkpoints (``save_every``/``resume``).  With
    ``quant.gguf_type`` or ``gguf_types`` ``{layer: GGUF type}`` (``--target-bpw``'s plan) the layers train on
    their types' grids and end as their blocks (:mod:`.gguf`).
    Returns ``{layer: (packed, info)}`` with ``.stats`` = trainable_fraction, train_loss_first/_last
    (means over the first/last tenth of the steps), train_seconds, init_seconds, seconds_per_step, train_losses, fingerprint."""
    t0 = time.perf_counter()
    if work_dir is None and (qat.resume or qat.save_every):
        raise LowbitError(f"--{'resume' if qat.resume else 'save-every'} needs --out (checkpoints go to OUT.work/)")
    text = qat.train_text or calib.source
    ids = tokenize(tokenizer, read_text(text, split="calib"))
    if ids.numel() < calib.seqlen:
        raise LowbitError(f"training text {text!r} has {ids.numel()} tokens, fewer than one window "
                          f"of --seqlen {calib.seqlen}")
    total_params = unique_param_count(fp_model)
    teacher = None
    if qat.distill:
        teacher = copy.deepcopy(fp_model).to(device).eval()
        teacher.requires_grad_(False)
    layers = None
    if quant.gguf_type is not None or gguf_types:  # each layer's grid from its GGUF type (lowbit.qat.gguf)
        from .gguf import plan

        layers = plan(fp_model, spec, quant, gguf_types)
    inits = initial_solution(fp_model, tokenizer, spec, quant, calib, qat, device, progress,
                             grids=None if layers is None else {k: v.grid for k, v in layers.items()})
    t_init = time.perf_counter() - t0
    fp_model.to(device)
    fp16_min = frozenset(k for k, v in (layers or {}).items() if v.exact and v.gtype.codec.has_min)
    modules = wrap(fp_model, spec, inits, qat.lora_rank, qat.seed, fp16_min)
    del inits
    params = trainable_params(modules)
    from ..calib.dtype import calib_dtype

    dtype = calib_dtype(calib.dtype, device)
    stats = train_loop(fp_model, params, ids, qat, calib.seqlen, device, teacher=teacher,
                       work_dir=None if work_dir is None else Path(work_dir), progress=progress, dtype=dtype,
                       grid={"quant": quant.to_json(), "gguf_types": gguf_types or {}})
    del teacher
    results = QATResults(export(fp_model, modules, layers))
    for full, lp in (layers or {}).items():
        if lp.grid is None:  # not trained: its float weight as F16
            from .gguf import float16

            lin = fp_model.get_submodule(full)
            packed = float16(lin.weight)
            replace_module(fp_model, full, QuantLinear(packed, lin.bias).to(lin.weight.device))
            results[full] = (packed, lp.info())
    losses = stats["losses"]
    k = max(1, len(losses) // 10)  # first/last losses are means over a tenth of the steps: one step is noisy
    results.stats = {
        "trainable_fraction": trainable_fraction(modules, total_params),
        "trainable_params": sum(p.numel() for p in params.values()),
        "train_loss_first": sum(losses[:k]) / k if losses else None,
        "train_loss_last": sum(losses[-k:]) / k if losses else None,
        "train_seconds": stats["train_seconds"],
        "seconds_per_step": stats["seconds_per_step"],
        "init_seconds": t_init,
        "resumed_from": stats["resumed_from"],
        "train_dtype": str(dtype).removeprefix("torch."),
        "train_losses": losses,
        "fingerprint": hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:16],
    }
    return results
