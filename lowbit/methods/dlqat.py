"""DL-QAT (arXiv 2504.09223): LoRA + group-magnitude quantization-aware training (:mod:`lowbit.qat`).

Its own loop: the initial solution (RTN or GPTQ), training on a text, export to plain group-wise INT-b.  Its
training settings are :class:`lowbit.qat.config.QATConfig` (``run_options``, saved under ``"qat"``).

``--gguf-type TYPE`` (:mod:`lowbit.qat.gguf`): each layer trains on its type's grid — exactly the legacy types'
(Q4_0 = w4 sym g32 …, stored as their blocks bit for bit), the nearest int grid for the others (K-, I-quants),
whose trained weight is then put onto the type by its RTN.
"""
from dataclasses import replace

from ..qat.config import QATConfig
from .base import MethodSpec, RunContext, register


def run(ctx: RunContext) -> dict:
    from ..qat import quantize_dlqat

    qat = ctx.extra.get("qat") or QATConfig(seed=ctx.calib.seed)
    if ctx.resume and not qat.resume:
        qat = replace(qat, resume=True)
    results = quantize_dlqat(ctx.model, ctx.tokenizer, ctx.spec, ctx.quant, ctx.calib, qat, ctx.device,
                             ctx.progress, work_dir=None if ctx.out is None else f"{ctx.out}.work",
                             gguf_types=ctx.extra.get("gguf_types"))  # --target-bpw's per-tensor types
    stats = dict(results.stats)
    ctx.extra["fingerprint"] = stats.pop("fingerprint")  # of the training text's tokens
    ctx.extra["stats"] = stats  # trainable_fraction, train_loss_first/last, train_seconds… (the report)
    ctx.extra["meta"] = {"qat": qat.to_json()}
    return dict(results)


register(MethodSpec(
    name="dlqat", title="DL-QAT: LoRA + group-magnitude quantization-aware training (arXiv 2504.09223)", order=6,
    run=run, needs=frozenset({"train_text"}), offload=lambda cfg: "(training needs the whole float model)",
    run_options=QATConfig, run_key="qat", gguf=True, produces="int"))
