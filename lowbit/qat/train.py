"""The DL-QAT training loop: AdamW on the group magnitudes and LoRA factors only.

Per optimizer step ``k`` (0-based): ``grad_accum`` micro-batches of ``batch_size`` windows of
``seqlen`` tokens, drawn at random offsets of the training text by a private generator seeded with
``seed·1000003 + k`` (so step ``k`` sees the same windows whether or not the run was resumed).

* CE loss: ``L = −1/(B(T−1)) Σ_{b,t} log p_θ(x_{b,t+1} | x_{b,≤t})``.
* Distillation (``distill``): ``L = 1/(BT) Σ_{b,t} KL(p_FP(·|x_{b,≤t}) ‖ p_θ(·|x_{b,≤t}))`` at temperature 1,
  the teacher's logits computed under ``no_grad``.

Learning rate ``lr·f(k)``: ``f = (k+1)/w`` for ``k < w`` (warm-up), then ``½(1 + cos(π(k−w)/(K−w)))``.
Gradients are clipped to a global norm (``max_grad_norm``).  Every ``save_every`` steps the trainable
tensors and Adam's moments go to ``work_dir/step_NNNNNN.safetensors`` (no pickles); ``resume``
continues from the latest such file.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data import calibration_windows
from ..errors import LowbitError
from ..jsonio import dumps
from .config import QATConfig


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Multiplier of the peak learning rate at optimizer step ``step`` (0-based) of ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def step_windows(ids: torch.Tensor, qat: QATConfig, seqlen: int, step: int) -> torch.Tensor:
    """The ``grad_accum·batch_size`` windows (N, seqlen) of optimizer step ``step``."""
    return calibration_windows(ids, qat.grad_accum * qat.batch_size, seqlen, qat.seed * 1000003 + step)


def lm_loss(model: nn.Module, ids: torch.Tensor, teacher: nn.Module | None = None) -> torch.Tensor:
    """Mean next-token CE of ``model`` on ``ids`` (B, T), or with ``teacher`` the mean per-token KL."""
    logits = model(input_ids=ids, use_cache=False).logits                          # (B, T, V)
    if teacher is None:
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    with torch.no_grad():
        target = F.log_softmax(teacher(input_ids=ids, use_cache=False).logits.flatten(0, 1).float(), -1)
    student = F.log_softmax(logits.flatten(0, 1).float(), -1)
    return F.kl_div(student, target, log_target=True, reduction="batchmean")


def _resume_key(qat: QATConfig, seqlen: int, names: list[str], grid: dict | None = None) -> str:
    """What a checkpoint must have been trained with to be resumed: the training settings, the window length,
    the parameters and ``grid`` (the quantization settings the fake-quantizers train on: bits, groups, types)."""
    keep = {k: v for k, v in qat.to_json().items() if k not in ("save_every", "resume")}
    return dumps({**keep, "seqlen": seqlen, "n_params": len(names), "grid": grid or {}}, sort_keys=True)


def save_state(work_dir: Path, step: int, params: dict[str, nn.Parameter], opt: torch.optim.Optimizer,
               losses: list[float], key: str) -> Path:
    """Trainable tensors + Adam moments after ``step`` steps -> ``work_dir/step_NNNNNN.safetensors``."""
    from safetensors.torch import save_file

    work_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, p in params.items():
        tensors[name] = p.detach().cpu().contiguous()
        st = opt.state.get(p, {})
        for moment in ("exp_avg", "exp_avg_sq"):
            if moment in st:
                tensors[f"opt.{moment}.{name}"] = st[moment].detach().cpu().contiguous()
    path = work_dir / f"step_{step:06d}.safetensors"
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"step": str(step), "losses": dumps(losses), "key": key})
    tmp.replace(path)
    for old in work_dir.glob("step_*.safetensors"):
        if old != path:
            old.unlink()
    return path


def load_state(work_dir: Path, params: dict[str, nn.Parameter], opt: torch.optim.Optimizer,
               key: str) -> tuple[int, list[float]]:
    """Restore the latest checkpoint in ``work_dir`` -> ``(steps done, losses so far)``; ``(0, [])`` if none."""
    from safetensors import safe_open

    files = sorted(work_dir.glob("step_*.safetensors")) if work_dir.is_dir() else []
    if not files:
        return 0, []
    path = files[-1]
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("key") != key:
            raise LowbitError(f"--resume: '{path}' was written with different DL-QAT settings; delete it or "
                              f"start without --resume")
        keys = set(f.keys())
        missing = [n for n in params if n not in keys]
        if missing:
            raise LowbitError(f"--resume: '{path}' lacks tensor '{missing[0]}'")
        step = int(meta["step"])
        for name, p in params.items():
            t = f.get_tensor(name)
            if t.shape != p.shape:
                raise LowbitError(f"--resume: tensor '{name}' in '{path}' is {tuple(t.shape)}, expected {tuple(p.shape)}")
            p.data.copy_(t)
            if f"opt.exp_avg.{name}" in keys:
                opt.state[p] = {"step": torch.tensor(float(step)),
                                "exp_avg": f.get_tensor(f"opt.exp_avg.{name}").to(p.device),
                                "exp_avg_sq": f.get_tensor(f"opt.exp_avg_sq.{name}").to(p.device)}
    return step, json.loads(meta.get("losses", "[]"))


def train(model: nn.Module, params: dict[str, nn.Parameter], ids: torch.Tensor, qat: QATConfig, seqlen: int,
          device, teacher: nn.Module | None = None, work_dir: Path | None = None, progress: bool = True,
          dtype: torch.dtype = torch.float32, grid: dict | None = None) -> dict:
    """Train ``params`` (every other parameter of ``model`` frozen) on windows of ``ids`` (L,).

    ``dtype`` bfloat16/float16: the forward passes run under autocast (matmuls in that dtype); the
    fake-quantized weights, the trained parameters and the optimizer stay float32.  ``grid`` (JSON) is the
    quantization the parameters are trained for; a checkpoint written for another one is not resumed.

    Returns ``{"losses": [per-step loss], "train_seconds", "seconds_per_step", "resumed_from"}``."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    model.eval()  # no dropout: the run is a deterministic function of the seed
    opt = torch.optim.AdamW(list(params.values()), lr=qat.lr, betas=(0.9, 0.999), weight_decay=0.0)
    key = _resume_key(qat, seqlen, list(params), grid)
    start, losses = (load_state(work_dir, params, opt, key) if qat.resume and work_dir is not None else (0, []))
    t0 = time.perf_counter()
    bar = tqdm(range(start, qat.steps), desc="dl-qat", unit="step", disable=not progress,
               initial=start, total=qat.steps)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = qat.lr * lr_factor(step, qat.steps, qat.warmup_steps)
        windows = step_windows(ids, qat, seqlen, step)
        total = 0.0
        for b0 in range(0, windows.shape[0], qat.batch_size):
            with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
                loss = lm_loss(model, windows[b0:b0 + qat.batch_size].to(device), teacher) / qat.grad_accum
            loss.backward()
            total += float(loss.detach())
        if qat.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(list(params.values()), qat.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
        bar.set_postfix(loss=f"{total:.4f}")
        if work_dir is not None and qat.save_every and ((step + 1) % qat.save_every == 0 or step + 1 == qat.steps):
            save_state(work_dir, step + 1, params, opt, losses, key)
    for p in params.values():
        p.requires_grad_(False)
    seconds = time.perf_counter() - t0
    done = qat.steps - start
    return {"losses": losses, "train_seconds": seconds, "seconds_per_step": seconds / done if done else None,
            "resumed_from": start}
