"""The Python API: ``quantize``, ``load``, ``evaluate_ppl`` — what the CLI calls, nothing more.

    result = lowbit.quantize("smollm2-135m", method="gptq", bits=4, group_size=64, out="out/w4")
    model, tokenizer, meta = lowbit.load("out/w4")
    lowbit.evaluate_ppl(model, tokenizer, text="default", seqlen=512)
"""
from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass, fields

from pathlib import Path

import torch

from . import __version__
from .calib import distributed
from .calib.gradients import weight_saliency
from .calib.resume import BlockCheckpoints
from .calib.resume import fingerprint as resume_fingerprint
from .calib.runner import quantize_blocks
from .config import CalibConfig, Method, QuantConfig
from .data import calibration_windows, check_window_count, read_text, tokenize
from .devices import check_device, default_device  # noqa: F401 (default_device: part of the API)
from .errors import LowbitError
from .eval.memory import bits_per_weight, model_bytes, peak_rss_bytes
from .eval.machine import machine
from .eval.ppl import evaluate_ppl
from .models.arch import blocks_of, linears_of, resolve_spec
from .models.head import quantize_head
from .models.sources import check_finite, load_model
from .packed import checkpoint
from .packed.qlinear import QuantLinear
from .qat.config import QATConfig
from .solvers import SOLVERS
from .solvers.feedback import NotPositiveDefinite

__all__ = ["quantize", "load", "evaluate_ppl", "load_any", "QuantizeResult"]


@dataclass
class QuantizeResult:
    """What :func:`quantize` returns: the in-memory quantized model and its report."""

    model: torch.nn.Module
    tokenizer: object
    meta: dict     # what lowbit.json holds
    report: dict   # seconds, bits_per_weight, peak_rss_bytes, per-layer losses
    out: Path | None


def calib_dtype(name: str, device: str) -> torch.dtype:
    """Activation dtype of the runner; ``auto`` = bfloat16 where the hardware runs it fast."""
    if name != "auto":
        return getattr(torch, name)
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    fast_bf16 = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)()
    return torch.bfloat16 if fast_bf16 else torch.float32


def _split_settings(settings: dict) -> tuple[dict, dict]:
    qnames = {f.name for f in fields(QuantConfig)}
    cnames = {f.name for f in fields(CalibConfig)}
    unknown = set(settings) - qnames - cnames
    if unknown:
        raise LowbitError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    return ({k: v for k, v in settings.items() if k in qnames}, {k: v for k, v in settings.items() if k in cnames})


def _solve(cfg: QuantConfig, W: torch.Tensor, H: torch.Tensor | None, name: str = "?", **extra):
    try:
        if cfg.gguf_type is not None:  # rtn/gptq/foem on a GGUF type's own grid (lowbit.gguf.solve)
            from .gguf.solve import solve as gguf_solve

            return gguf_solve(W, H, cfg)
        return SOLVERS[cfg.method](W, H, cfg, **extra)
    except NotPositiveDefinite as e:
        raise LowbitError(f"layer '{name}': {e}; try more calibration data or a larger --damp") from None


def _block_finetuner(quant: QuantConfig, world_size: int, progress: bool):
    """The per-block fine-tuning callback for the runner: QuIP#'s signs/scales or Squeeze10's cell scales
    (``None`` unless ``--finetune``)."""
    if not quant.finetune:
        return None
    if world_size > 1:
        raise LowbitError("--finetune runs in a single process (each rank would train on its own shard)")
    if quant.method == Method.QUIP:
        from .quip.finetune import BlockFinetuner
    else:
        from .solvers.squeeze_scales import BlockFinetuner
    return BlockFinetuner(quant.ft_steps, quant.ft_lr, progress)


def _check_resume(quant: QuantConfig, out, world_size: int) -> None:
    """``resume=True`` needs a work area to resume from: an ``out``, one process, a method that has checkpoints."""
    if out is None:
        raise LowbitError("--resume needs --out (checkpoints live in OUT.work/)")
    if quant.method == Method.RTN:
        raise LowbitError("--resume applies to the calibration methods and dlqat; rtn is data-free and has no checkpoints")
    if world_size > 1 and quant.method != Method.DLQAT:
        raise LowbitError("--resume runs in a single process (per-block checkpoints are not written under torchrun)")


def _check_offload(quant: QuantConfig) -> None:
    """``--offload disk`` works block by block; the methods that need the whole float model at once refuse it."""
    if quant.method == Method.DLQAT:
        raise LowbitError("--offload disk is not supported with --method dlqat (training needs the whole float model)")
    if quant.method == Method.GWQ and quant.saliency == "grad":
        raise LowbitError("--offload disk is not supported with --method gwq --saliency grad (the gradient pass needs "
                          "the whole float model); use --saliency hessian or magnitude")


def quantize(model: str, *, out: str | Path | None = None, quant: QuantConfig | None = None,
             calib: CalibConfig | None = None, device: str | None = None, progress: bool = True,
             trust_remote_code: bool = False, qat: QATConfig | None = None, resume: bool = False,
             force: bool = False, **settings) -> QuantizeResult:
    """Quantize the model at ``model`` (folder, .gguf, hub id or ``smollm2-135m``) and, with ``out``,
    save it.  Settings are :class:`QuantConfig` and :class:`CalibConfig` fields (``bits=3``,
    ``group_size=64``, ``nsamples=64``…) or whole config objects.

    With ``out``, the calibration methods commit every finished block to ``OUT.work/blocks/``
    (:mod:`lowbit.calib.resume`); ``resume=True`` continues a killed run from there (DL-QAT: from its latest
    training checkpoint in ``OUT.work/``).  The work area is removed once ``out`` is written.  ``out`` is refused
    when it exists and is not a lowbit checkpoint, unless ``force``."""
    t0 = time.perf_counter()
    qkw, ckw = _split_settings(settings)
    quant = quant or QuantConfig(**qkw)
    calib = calib or CalibConfig(**ckw)
    device = distributed.init_from_env(check_device(device))
    rank, world_size = distributed.world()
    if out is not None:
        checkpoint.check_out(out, probe=rank == 0, force=force)  # before hours of work, not after
    if resume:
        _check_resume(quant, out, world_size)
    progress = progress and rank == 0
    offload = None  # --offload disk: the blocks' parameters stay on disk until the runner reaches them
    if calib.offload == "disk":
        _check_offload(quant)
        from .models.offload import load_offloaded

        fp_model, tokenizer, source, offload = load_offloaded(model, lambda m: resolve_spec(m).blocks,
                                                              trust_remote_code=trust_remote_code)
    else:
        fp_model, tokenizer, source = load_model(model, trust_remote_code=trust_remote_code)
    check_finite(fp_model, model)
    spec = resolve_spec(fp_model)
    fingerprint = None
    checkpoints = None  # per-block checkpoints of the calibration runner (lowbit.calib.resume)
    qat_stats: dict = {}
    if quant.method == Method.DLQAT:  # quantization-aware training (lowbit.qat); installs QuantLinear modules
        from .qat import quantize_dlqat

        qat = qat or QATConfig(seed=calib.seed)
        if resume and not qat.resume:
            qat = dataclasses.replace(qat, resume=True)
        results = quantize_dlqat(fp_model, tokenizer, spec, quant, calib, qat, device, progress,
                                 work_dir=None if out is None else f"{out}.work")
        qat_stats = results.stats
        fingerprint = qat_stats.pop("fingerprint")  # of the training text's tokens
    elif quant.method == Method.RTN:  # data-free
        results = {}
        for i, block in enumerate(blocks_of(fp_model, spec)):
            if offload is not None:
                offload.materialize(i)
            for name, lin in linears_of(block).items():
                full = f"{spec.blocks}.{i}.{name}"
                packed, info = _solve(quant, lin.weight.detach().float(), None, full)
                results[full] = (packed, info)
                parent, _, leaf = name.rpartition(".")
                setattr(block.get_submodule(parent) if parent else block, leaf, QuantLinear(packed, lin.bias))
            if offload is not None:
                lin = None  # the float linear may go
                offload.release(i)
    else:
        ids = tokenize(tokenizer, read_text(calib.source, split="calib"))
        check_window_count(ids, calib.nsamples, calib.seqlen)
        if quant.method == Method.GWQ and quant.saliency == "grad":
            check_window_count(ids, calib.grad_samples, calib.seqlen, "--grad-samples")
        windows = calibration_windows(ids, calib.nsamples, calib.seqlen, calib.seed)
        fingerprint = hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16]
        if min(calib.nsamples, calib.grad_samples if quant.method == Method.GWQ else calib.nsamples) < world_size:
            raise LowbitError(f"--nsamples/--grad-samples must be at least the number of processes ({world_size})")
        grads = {}
        if quant.method == Method.GWQ and quant.saliency == "grad":
            gw = distributed.shard(calibration_windows(ids, calib.grad_samples, calib.seqlen, calib.seed))
            grads = weight_saliency(fp_model, spec, gw, device=device, dtype=calib_dtype(calib.dtype, device),
                                    checkpointing=calib.grad_checkpointing, progress=progress)  # summed over ranks
            fp_model.to("cpu")

        def solve(W, H, name):
            extra = {"saliency": grads.pop(name, None)} if quant.method == Method.GWQ else {}
            return _solve(quant, W, H, name, **extra)

        if out is not None and world_size == 1:  # distributed runs are not checkpointed (see _check_resume)
            calib_key = {k: v for k, v in calib.to_json().items() if k != "offload"}  # offload changes no result
            key = resume_fingerprint(source, fp_model.config.to_json_string(), quant.to_json(), calib_key,
                                     fingerprint, {"device": torch.device(device).type,
                                                   "dtype": str(calib_dtype(calib.dtype, device))}, __version__)
            checkpoints = BlockCheckpoints(f"{out}.work", key, resume)
        results = quantize_blocks(fp_model, spec, distributed.shard(windows), solve, device=device,
                                  dtype=calib_dtype(calib.dtype, device), checkpoints=checkpoints, batch_size=calib.windows_per_batch(),
                                  true_sequential=calib.true_sequential, progress=progress,
                                  fp_targets=calib.fp_targets if calib.fp_targets is not None
                                  else quant.method == Method.SQUEEZE,
                                  finetune_block=_block_finetuner(quant, world_size, progress), offload=offload)
    fp_model.to("cpu")
    if quant.head_bits:  # the output head too (data-free RTN; see lowbit.models.head)
        head_name, packed, info = quantize_head(fp_model, quant.head_bits, _solve)
        results[head_name] = (packed, info)
    layers = {name: {**packed.meta(), "bits_per_weight": packed.stored_bits() / (packed.shape[0] * packed.shape[1]),
                     **{k: v for k, v in info.items()}} for name, (packed, info) in results.items()}
    bpw = bits_per_weight(fp_model)
    meta = {
        "method": quant.method.value,
        "config": quant.to_json(),
        "calibration": None if quant.method == Method.RTN else {**calib.to_json(), "fingerprint": fingerprint},
        **({"qat": qat.to_json()} if quant.method == Method.DLQAT else {}),
        "source": source,
        "lowbit_version": __version__,
        "bits_per_weight": bpw,
        "layers": layers,
        # what this run cost, and where (the report's quantize time / memory / machine); the save is not included
        "quantize": {"seconds": time.perf_counter() - t0, "peak_rss_bytes": peak_rss_bytes(),
                     "processes": world_size, "machine": machine(device)},
    }
    report = {"seconds": time.perf_counter() - t0, "bits_per_weight": bpw, "peak_rss_bytes": peak_rss_bytes(),
              "model_bytes": model_bytes(fp_model), "method": quant.method.value,
              "layers": {n: {"loss": l.get("loss"), "bits_per_weight": l["bits_per_weight"]} for n, l in layers.items()}}
    report.update(qat_stats)  # DL-QAT: trainable_fraction, train_loss_first/last, train_seconds
    saved = None
    if out is not None and rank == 0:
        dtype = torch.bfloat16 if getattr(fp_model.config, "dtype", None) in (torch.bfloat16, "bfloat16") else torch.float16
        saved = checkpoint.save(out, fp_model, tokenizer, meta, dtype=dtype, force=force)
        if checkpoints is not None:
            checkpoints.finish()
        report["seconds"] = time.perf_counter() - t0
    report["processes"] = world_size
    distributed.barrier()  # no rank returns before rank 0 has written the output
    return QuantizeResult(fp_model, tokenizer, meta, report, saved)


def load(model_dir: str | Path, device: str | None = None, dtype: torch.dtype | None = None):
    """Load a lowbit checkpoint -> ``(model, tokenizer, meta)``; linears stay packed in memory."""
    return checkpoint.load(model_dir, device=check_device(device), dtype=dtype)


def load_any(source: str, device: str | None = None, dtype: torch.dtype | None = None):
    """A lowbit checkpoint or any float model source -> ``(model, tokenizer, meta or None)``."""
    device = check_device(device)
    if Path(source).is_dir() and (Path(source) / checkpoint.META_FILE).exists():
        return load(source, device=device, dtype=dtype)
    model, tokenizer, _ = load_model(source, dtype=dtype or torch.float32)
    return model.to(device), tokenizer, None



