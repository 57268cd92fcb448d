"""The Python API: ``quantize``, ``load``, ``evaluate_ppl`` — what the CLI calls, nothing more.

    result = lowbit.quantize("smollm2-135m", method="gptq", bits=4, group_size=64, out="out/w4")
    model, tokenizer, meta = lowbit.load("out/w4")
    lowbit.evaluate_ppl(model, tokenizer, text="default", seqlen=512)
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from . import methods
from ._version import __version__
from .calib import distributed
from .calib.dtype import calib_dtype  # noqa: F401 (part of the API: lowbit.api.calib_dtype)
from .calib.resume import BlockCheckpoints
from .calib.resume import fingerprint as resume_fingerprint
from .calib.runner import quantize_blocks
from .config import CalibConfig, QuantConfig
from .data import calibration_windows, check_window_count, read_text, tokenize
from .devices import check_device, default_device  # noqa: F401 (default_device: part of the API)
from .errors import LowbitError
from .eval.memory import bits_per_weight, model_bytes, peak_rss_bytes
from .eval.machine import machine
from .eval.ppl import evaluate_ppl
from .methods.base import MethodSpec, RunContext
from .models.arch import blocks_of, resolve_spec
from .models.head import quantize_embeddings, quantize_head
from .models.rotate import rotate_model
from .models.sources import check_finite, load_model
from .packed import checkpoint
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


def _configs(quant: QuantConfig | None, calib: CalibConfig | None, settings: dict) -> tuple[QuantConfig, CalibConfig]:
    """The configs from whole objects and/or flat settings (each to the config that has it)."""
    cnames = {f.name for f in fields(CalibConfig)}
    ckw = {k: v for k, v in settings.items() if k in cnames}
    qkw = {k: v for k, v in settings.items() if k not in cnames}
    return quant or QuantConfig(**qkw), calib or CalibConfig(**ckw)


def _solve(cfg: QuantConfig, W: torch.Tensor, H: torch.Tensor | None, name: str = "?", n_layers: int | None = None,
           gguf_type: str | None = None, **extra):
    """One layer: the method's solver, or a GGUF type's grid with ``gguf_type`` (:mod:`lowbit.gguf.solve`; a
    preset's per-tensor type depends on the layer's ``name`` and the model's ``n_layers`` blocks; the argument
    ``gguf_type`` is the layer's type in a ``--target-bpw`` plan)."""
    try:
        if cfg.gguf_type is not None or gguf_type is not None:
            from .gguf.solve import solve as gguf_solve

            return gguf_solve(W, H, cfg, name=name, n_layers=n_layers, gguf_type=gguf_type)
        return methods.get(cfg.method).solve(W, H, cfg, **extra)
    except NotPositiveDefinite as e:
        raise LowbitError(f"layer '{name}': {e}; try more calibration data or a larger --damp") from None


def _block_finetuner(method: MethodSpec, quant: QuantConfig, world_size: int, progress: bool):
    """The method's per-block fine-tuning callback for the runner (``None`` when it has none or it is off)."""
    ft = method.finetuner(quant, progress) if method.finetuner is not None else None
    if ft is not None and world_size > 1:
        raise LowbitError("--finetune runs in a single process (each rank would train on its own shard)")
    return ft


def _check_resume(method: MethodSpec, out, world_size: int) -> None:
    """``resume=True`` needs a work area to resume from: an ``out``, a method that has checkpoints, and one
    process unless the method's own loop checkpoints itself (DL-QAT)."""
    if out is None:
        raise LowbitError("--resume needs --out (checkpoints live in OUT.work/)")
    if not method.resume:
        resumable = ", ".join(m.name for m in methods.REGISTRY.values() if m.resume)
        why = " is data-free and" if not method.needs & {"calibration", "train_text"} else ""
        raise LowbitError(f"--resume applies to {resumable}; {method.name}{why} has no checkpoints")
    if world_size > 1 and method.run is None:
        raise LowbitError("--resume runs in a single process (per-block checkpoints are not written under torchrun)")


def _check_offload(method: MethodSpec, quant: QuantConfig) -> None:
    """``--offload disk`` works block by block; a method that needs the whole float model at once refuses it."""
    why = method.offload_refusal(quant)
    if why is not None:
        raise LowbitError(f"--offload disk is not supported with --method {method.name} {why}")


def _load(model: str, calib: CalibConfig, method: MethodSpec, quant: QuantConfig, trust_remote_code: bool):
    """``(float model, tokenizer, source record, DiskOffload or None)``; with ``--offload disk`` the blocks'
    parameters stay on disk until the runner reaches them."""
    if calib.offload != "disk":
        return (*load_model(model, trust_remote_code=trust_remote_code), None)
    _check_offload(method, quant)
    from .models.offload import load_offloaded

    return load_offloaded(model, lambda m: resolve_spec(m).blocks, trust_remote_code=trust_remote_code)


def _calibrated(ctx: RunContext, method: MethodSpec, source: dict, world_size: int) -> dict:
    """The calibration runner's plan for ``method``: windows, the gradient pass when it needs one, per-block
    checkpoints with ``out``, its block transform and fine-tuner.  Sets ``ctx.extra["fingerprint"]`` and
    ``["checkpoints"]``."""
    quant, calib, device, needs = ctx.quant, ctx.calib, ctx.device, method.needs_of(ctx.quant)
    t = time.perf_counter()
    ids = tokenize(ctx.tokenizer, read_text(calib.source, split="calib"))
    check_window_count(ids, calib.nsamples, calib.seqlen)
    if "gradients" in needs:
        check_window_count(ids, calib.grad_samples, calib.seqlen, "--grad-samples")
    windows = calibration_windows(ids, calib.nsamples, calib.seqlen, calib.seed)
    ctx.extra["fingerprint"] = hashlib.sha256(windows.numpy().tobytes()).hexdigest()[:16]
    if min(calib.nsamples, calib.grad_samples if "gradients" in method.needs else calib.nsamples) < world_size:
        raise LowbitError(f"--nsamples/--grad-samples must be at least the number of processes ({world_size})")
    dtype = calib_dtype(calib.dtype, device)
    phases = ctx.extra.setdefault("phases", {})
    phases["calibration_text"] = time.perf_counter() - t  # read, tokenize (cached: lowbit.data.windows), windows
    grads = {}
    if "gradients" in needs:
        from .calib.gradients import weight_saliency

        t = time.perf_counter()
        gw = distributed.shard(calibration_windows(ids, calib.grad_samples, calib.seqlen, calib.seed))
        grads = weight_saliency(ctx.model, ctx.spec, gw, device=device, dtype=dtype,
                                checkpointing=calib.grad_checkpointing, progress=ctx.progress)  # summed over ranks
        ctx.model.to("cpu")
        phases["gradients"] = time.perf_counter() - t

    n_layers = len(blocks_of(ctx.model, ctx.spec))
    phases["solve"] = phases["finetune"] = 0.0

    def solve(W, H, name):
        extra = {"saliency": grads.pop(name, None)} if "gradients" in method.needs else {}
        t = time.perf_counter()
        try:
            return _solve(quant, W, H, name, n_layers, ctx.extra.get("gguf_types", {}).get(name), **extra)
        finally:
            phases["solve"] += time.perf_counter() - t

    checkpoints = None
    if ctx.out is not None and world_size == 1 and method.resume:  # not under torchrun (see _check_resume)
        calib_key = {k: v for k, v in calib.to_json().items() if k != "offload"}  # offload changes no result
        key = resume_fingerprint(source, ctx.model.config.to_json_string(), quant.to_json(), calib_key,
                                 ctx.extra["fingerprint"], {"device": torch.device(device).type, "dtype": str(dtype)},
                                 __version__)
        checkpoints = ctx.extra["checkpoints"] = BlockCheckpoints(f"{ctx.out}.work", key, ctx.resume)
    prepare = None
    if method.prepare_block is not None:
        def prepare(block, inputs, calls, i):
            return method.prepare_block(block, inputs, calls, ctx.spec, quant, prefix=f"{ctx.spec.blocks}.{i}",
                                        n_layers=n_layers, gguf_types=ctx.extra.get("gguf_types"))  # per-tensor
    finetune = _block_finetuner(method, quant, world_size, ctx.progress)
    if finetune is not None:
        def finetune(*args, _ft=finetune):
            t = time.perf_counter()
            try:
                return _ft(*args)
            finally:
                phases["finetune"] += time.perf_counter() - t
    t = time.perf_counter()
    results = quantize_blocks(ctx.model, ctx.spec, distributed.shard(windows), solve, device=device, dtype=dtype,
                              checkpoints=checkpoints, batch_size=calib.windows_per_batch(),
                              true_sequential=calib.true_sequential, progress=ctx.progress,
                              fp_targets=calib.fp_targets if calib.fp_targets is not None else "fp_targets" in needs,
                              finetune_block=finetune, offload=ctx.offload, prepare_block=prepare)
    # the runner's own time: capture, block forwards, statistics (XᵀX, FIAS), AWQ's search, propagation
    phases["forward_and_stats"] = time.perf_counter() - t - phases["solve"] - phases["finetune"]
    return results


def _records(ctx: RunContext, method: MethodSpec, results: dict, source: dict, world_size: int, t0: float):
    """``(lowbit.json's contents, the run's report)``."""
    model, quant, calib = ctx.model, ctx.quant, ctx.calib
    layers = {name: {**packed.meta(), "bits_per_weight": packed.stored_bits() / (packed.shape[0] * packed.shape[1]),
                     **info} for name, (packed, info) in results.items()}
    bpw = bits_per_weight(model)
    calibrated = method.needs_of(quant) & {"calibration", "train_text"}
    meta = {
        "method": method.name,
        "config": quant.to_json(),  # only the settings that apply: the grid and the method's options
        "calibration": {**calib.to_json(), "fingerprint": ctx.extra.get("fingerprint")} if calibrated else None,
        **ctx.extra.get("meta", {}),  # DL-QAT: "qat"
        "source": source,
        "lowbit_version": __version__,
        "bits_per_weight": bpw,
        "layers": layers,
        # what this run cost, and where (the report's quantize time / memory / machine); the save is not included
        "quantize": {"seconds": time.perf_counter() - t0, "peak_rss_bytes": peak_rss_bytes(),
                     "processes": world_size, "machine": machine(ctx.device),
                     "phases": {k: round(v, 3) for k, v in ctx.extra.get("phases", {}).items()}},
    }
    report = {"seconds": time.perf_counter() - t0, "bits_per_weight": bpw, "peak_rss_bytes": peak_rss_bytes(),
              "model_bytes": model_bytes(model), "method": method.name,
              "layers": {n: {"loss": l.get("loss"), "bits_per_weight": l["bits_per_weight"]} for n, l in layers.items()},
              **ctx.extra.get("stats", {})}  # DL-QAT: trainable_fraction, train_loss_first/last, train_seconds
    return meta, report


def quantize(model: str, *, out: str | Path | None = None, quant: QuantConfig | None = None,
             calib: CalibConfig | None = None, device: str | None = None, progress: bool = True,
             trust_remote_code: bool = False, qat=None, resume: bool = False,
             force: bool = False, **settings) -> QuantizeResult:
    """Quantize the model at ``model`` (folder, .gguf, hub id or ``smollm2-135m``) and, with ``out``,
    save it.  Settings are :class:`QuantConfig` and :class:`CalibConfig` fields (``bits=3``,
    ``group_size=64``, ``nsamples=64``…) or whole config objects; ``qat`` is DL-QAT's
    :class:`lowbit.qat.config.QATConfig`.

    load → resolve the architecture → the method's plan (the calibration runner, or the method's own loop:
    RTN, DL-QAT) → metadata → save.  With ``out``, the calibration methods commit every finished block to
    ``OUT.work/blocks/`` (:mod:`lowbit.calib.resume`); ``resume=True`` continues a killed run from there
    (DL-QAT: from its latest training checkpoint in ``OUT.work/``).  The work area is removed once ``out`` is
    written.  ``out`` is refused when it exists and is not a lowbit checkpoint, unless ``force``."""
    t0 = time.perf_counter()
    quant, calib = _configs(quant, calib, settings)
    method = methods.get(quant.method)
    device = distributed.init_from_env(check_device(device))
    rank, world_size = distributed.world()
    if world_size > 1 and not method.processes:
        raise LowbitError(f"--method {method.name} runs in a single process (not under torchrun)")
    if out is not None:
        checkpoint.check_out(out, probe=rank == 0, force=force)  # before hours of work, not after
    if resume:
        _check_resume(method, out, world_size)
    if quant.target_bpw is not None and calib.offload == "disk":
        raise LowbitError("--target-bpw measures every layer of the float model first; drop --offload disk")
    if quant.rotate and calib.offload == "disk":
        raise LowbitError("--rotate needs the whole float model in memory; drop --offload disk (or --rotate)")
    fp_model, tokenizer, source, offload = _load(model, calib, method, quant, trust_remote_code)
    check_finite(fp_model, model)
    spec = resolve_spec(fp_model)
    n_layers = len(blocks_of(fp_model, spec))
    phases = {"load": time.perf_counter() - t0}  # where the seconds go (lowbit.json "quantize"/"phases")
    t = time.perf_counter()
    rotation = rotate_model(fp_model, spec) if quant.rotate else None  # before the method (lowbit.models.rotate)
    if rotation is not None:
        phases["rotate"] = time.perf_counter() - t
    plan = None
    if quant.target_bpw is not None:  # each linear's GGUF type, from the float model (lowbit.gguf.budget)
        from .gguf.budget import plan_run

        t = time.perf_counter()
        plan = plan_run(fp_model, tokenizer, spec, quant, calib, device, n_layers,
                        "calibration" in method.needs_of(quant), progress and rank == 0)
        phases["budget_plan"] = time.perf_counter() - t
    types = plan.types if plan is not None else {}
    ctx = RunContext(fp_model, tokenizer, spec, quant, calib, device, progress and rank == 0,
                     out=out, resume=resume, offload=offload, extra={"qat": qat, "gguf_types": types, "phases": phases},
                     solve=lambda W, H, name: _solve(quant, W, H, name, n_layers, types.get(name)))
    results = method.run(ctx) if method.run is not None else _calibrated(ctx, method, source, world_size)
    fp_model.to("cpu")
    if quant.head_bits:  # the output head too (data-free RTN; see lowbit.models.head)
        head_name, packed, info = quantize_head(fp_model, quant.head_bits, _solve)
        results[head_name] = (packed, info)
    if quant.embedding_type not in (None, "F16"):  # the embedding (and head) on a GGUF type (lowbit.models.head)
        results.update(quantize_embeddings(fp_model, quant, n_layers))
    meta, report = _records(ctx, method, results, source, world_size, t0)
    if rotation is not None:
        meta["rotation"] = rotation
    if plan is not None:
        meta["gguf_budget"] = plan.finish(results)
        report["gguf_budget"] = {k: v for k, v in meta["gguf_budget"].items() if k != "measured"}
    saved = None
    if out is not None and rank == 0:
        dtype = torch.bfloat16 if getattr(fp_model.config, "dtype", None) in (torch.bfloat16, "bfloat16") else torch.float16
        saved = checkpoint.save(out, fp_model, tokenizer, meta, dtype=dtype, force=force)
        if ctx.extra.get("checkpoints") is not None:
            ctx.extra["checkpoints"].finish()
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



