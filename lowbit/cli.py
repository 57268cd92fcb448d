"""The ``lowbit`` command line: ``quantize``, ``eval``, ``info`` (+ the subcommands of ``_EXTENSIONS``).

The CLI only parses arguments, builds the config dataclasses and calls :mod:`lowbit.api`.
A :class:`LowbitError` becomes ``lowbit: error: <one line>`` on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .errors import LowbitError
from .jsonio import dumps, finite_float, write_json
from .outputs import check_file


def _write_json(path: str | None, data: dict, force: bool = False) -> None:
    """``--json``: strict JSON (:mod:`lowbit.jsonio`), atomically; checked before the work by :func:`_check_json`."""
    if path:
        write_json(path, data, "--json", force=force)


def _check_json(a: argparse.Namespace) -> None:
    """Before the work: ``--json`` can be written (not a folder, not an existing file unless ``--force``)."""
    if getattr(a, "json", None):
        check_file(a.json, "--json", force=a.force)


class _Parser(argparse.ArgumentParser):
    """argparse with lowbit's error contract: one line ``lowbit: error: …`` on stderr, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"lowbit: error: {' '.join(message.split())}\n")


def int_at_least(low: int, high: int | None = None):
    """argparse type: an integer in ``[low, high)`` (a bad value is the one-line error of :class:`_Parser`)."""
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {s!r}") from None
        if v < low or (high is not None and v >= high):
            raise argparse.ArgumentTypeError(f"{v} must be >= {low}" if high is None else f"{v} must be in {low}..{high - 1}")
        return v
    return parse


SEED = int_at_least(-2**63, 2**63)  # what torch's generators accept


_QAT_FLAGS = ("train_text", "steps", "lora_rank", "lr", "distill", "grad_accum", "warmup", "save_every", "init", "resume")


def _qat_config(a: argparse.Namespace, method: str):
    """The DL-QAT flags as a ``QATConfig`` (``None`` for other methods, which must not be given them)."""
    given = {k: getattr(a, k) for k in _QAT_FLAGS if getattr(a, k) is not None}
    if method != "dlqat":
        given.pop("resume", None)  # the calibration methods resume from per-block checkpoints (api.quantize)
        if given:
            raise LowbitError(f"--{next(iter(given)).replace('_', '-')} applies only to --method dlqat")
        return None
    from .qat.config import QATConfig

    return QATConfig(**given, seed=a.seed, **({"batch_size": a.batch_size} if a.batch_size else {}))


def quantize_configs(a: argparse.Namespace):
    """The parsed ``lowbit quantize`` flags as ``(QuantConfig, CalibConfig, QATConfig or None)``."""
    from .config import CalibConfig, QuantConfig

    quant = QuantConfig(method=a.method, bits=a.bits, group_size=a.group_size, sym=a.sym, act_order=a.act_order,
                        static_groups=not a.no_static_groups, damp=a.damp, block_size=a.block_size, mse=a.mse,
                        beta=a.beta, pullback=a.pullback, outlier_frac=a.outlier_frac, saliency=a.saliency,
                        outlier_select=a.outlier_select, gwq_solver=a.gwq_solver, binary_frac=a.binary_frac,
                        high_bits=a.high_bits, squeeze_score=a.squeeze_score, squeeze_staged=not a.one_shot,
                        binary_residual=a.binary_residual,
                        codebook=a.codebook, rht=a.rht, scale_search=a.scale_search, finetune=a.finetune,
                        ft_steps=a.ft_steps, ft_lr=a.ft_lr, head_bits=a.head_bits,
                        gguf_type=getattr(a, "gguf_type", None))
    calib = CalibConfig(source=a.calib, nsamples=a.nsamples, seqlen=a.seqlen, seed=a.seed,
                        batch_size=a.batch_size, dtype=a.calib_dtype, true_sequential=not a.no_true_sequential,
                        grad_samples=a.grad_samples, grad_checkpointing=a.grad_checkpointing, fp_targets=a.fp_targets,
                        offload=a.offload)
    return quant, calib, _qat_config(a, quant.method.value)


def cmd_quantize(a: argparse.Namespace) -> int:
    from . import api

    quant, calib, qat = quantize_configs(a)
    if quant.method.value == "rtn" and a.calib != "default":  # data-free: a given --calib would be ignored
        raise LowbitError(f"--calib {a.calib!r} is unused by --method rtn (data-free); drop it or choose a "
                          "calibrated method")
    _check_json(a)
    res = api.quantize(a.model, out=a.out, quant=quant, calib=calib, device=a.device, progress=not a.quiet,
                       trust_remote_code=a.trust_remote_code, qat=qat, resume=bool(a.resume), force=a.force)
    from .calib.distributed import world

    if world()[0] != 0:  # under torchrun only rank 0 reports
        return 0
    _write_json(a.json, res.report, force=a.force)
    if not a.quiet:
        r = res.report
        grid = quant.gguf_type or f"w{quant.bits}g{quant.group_size}"
        print(f"quantized {a.model} with {quant.method.value} {grid}: "
              f"{r['bits_per_weight']:.3f} bits/weight, {r['seconds']:.1f} s, peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB"
              + (f" -> {res.out}" if res.out else ""))
        falls = [(n, l["gguf_fallback"]) for n, l in res.meta["layers"].items() if l.get("gguf_fallback")]
        if falls:  # the same rule llama-quantize applies (lowbit.gguf.types.resolve)
            print(f"  {len(falls)} of {len(res.meta['layers'])} layers fell back as llama.cpp does, e.g. "
                  f"{falls[0][0]}: {falls[0][1]}")
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    import time

    from . import api
    from .eval.harness import EVALS_FILE, check_available, parse_tasks, record_eval, run_tasks, text_key
    from .jsonio import finite
    from .outputs import probe
    from .eval.memory import bits_per_weight, model_bytes

    tasks = parse_tasks(a.tasks)
    if a.no_ppl and not tasks and not a.kld:
        raise LowbitError("--no-ppl: nothing left to evaluate (add --tasks or --kld)")
    check_available(tasks)
    _check_json(a)
    if (Path(a.model) / "lowbit.json").is_file():  # a lowbit folder's history is appended at the end
        probe(Path(a.model) / EVALS_FILE)
    model, tok, meta = api.load_any(a.model, device=a.device)
    t0 = time.perf_counter()
    result = {"ppl": None, "tokens_scored": 0, "seqlen": a.seqlen}
    if a.kld:  # A/B: the same windows scored by both models; gives A's ppl too
        from .eval.kld import evaluate_kld

        kld = evaluate_kld(model, tok, a.kld, text=a.text, seqlen=a.seqlen, max_tokens=a.max_tokens or None,
                           bos=a.bos, batch_size=a.batch_size, device=a.device, progress=not a.quiet)
        result.update({k: v for k, v in kld.items() if not (a.no_ppl and k in ("ppl", "tokens_scored"))})
    elif not a.no_ppl:
        result = api.evaluate_ppl(model, tok, text=a.text, seqlen=a.seqlen, max_tokens=a.max_tokens or None,
                                  bos=a.bos, batch_size=a.batch_size, progress=not a.quiet)
    if tasks:
        result.update(run_tasks(model, tok, tasks, text=a.text, limit=a.limit, num_fewshot=a.num_fewshot,
                                batch_size=a.batch_size, cloze_passages=a.cloze_passages,
                                cloze_context=a.cloze_context, seed=a.seed, progress=not a.quiet))
    result.update(bits_per_weight=bits_per_weight(model), model_bytes=model_bytes(model),
                  seconds=time.perf_counter() - t0)
    for k, v in result.items():  # a NaN perplexity (or NLL, KLD…) is a broken model, not a result to record
        if isinstance(v, float):
            finite(v, f"'{a.model}': {k}")
    new_json = bool(a.json) and not Path(a.json).exists()
    _write_json(a.json, result, force=a.force)
    try:  # the history: a lowbit folder's in DIR/evals.json, a float model's in lowbit's cache (the report's baseline)
        record_eval(a.model, meta, {"text": a.text, "text_key": text_key(a.text), "seqlen": a.seqlen,
                                    "max_tokens": a.max_tokens, "bos": a.bos, "tasks": tasks, "limit": a.limit,
                                    "num_fewshot": a.num_fewshot, "kld_reference": a.kld,
                                    "cloze": {"passages": a.cloze_passages, "context": a.cloze_context,
                                              "seed": a.seed},
                                    "metrics": result})
    except BaseException:
        if new_json:  # nothing new left behind: the --json of a run whose history could not be written goes too
            Path(a.json).unlink(missing_ok=True)
        raise
    ppl = "" if result["ppl"] is None else f"ppl {result['ppl']:.4f} over {result['tokens_scored']} tokens (seqlen {a.seqlen}), "
    if a.kld:
        ppl += (f"KLD {result['kld']:.5f} ± {result['kld_stderr']:.5f} nats vs {a.kld}, top-1 agreement "
                f"{result['top1_agreement']:.4f}, ppl ratio {result['ppl_ratio']:.4f}, ")
    print(f"{ppl}{result['bits_per_weight']:.3f} bits/weight, {result['model_bytes'] / 2**20:.1f} MiB of weights, "
          f"{result['seconds']:.1f} s")
    for name, r in result.get("tasks", {}).items():
        print(f"  {name}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                        for k, v in r.items() if k != "seconds"))
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    from .packed.checkpoint import check_weights, read_meta

    meta = read_meta(a.model)
    check_weights(a.model)  # a truncated model.safetensors is not a checkpoint to describe
    size = sum(f.stat().st_size for f in Path(a.model).iterdir() if f.is_file())
    if a.json:
        print(dumps({k: v for k, v in meta.items() if a.layers or k != "layers"}, indent=1))
        return 0
    cfg = meta.get("config") or {}
    print(f"{a.model}: lowbit format v{meta['format_version']}, method {meta.get('method')}")
    print(f"  source       {(meta.get('source') or {}).get('source')}")
    print(f"  config       " + ", ".join(f"{k}={v}" for k, v in cfg.items()))
    if meta.get("calibration"):
        c = meta["calibration"]
        print(f"  calibration  {c.get('source')}: {c.get('nsamples')} x {c.get('seqlen')} tokens, seed {c.get('seed')}, "
              f"fingerprint {c.get('fingerprint')}")
    print(f"  layers       {len(meta['layers'])} quantized, {meta.get('bits_per_weight', float('nan')):.3f} bits/weight")
    print(f"  size on disk {size / 2**20:.1f} MiB")
    if a.layers:
        for name, l in meta["layers"].items():
            loss = l.get("loss")
            grid = l["gguf_type"] if "gguf_type" in l else f"b{l.get('bits')} g{l.get('group_size')}"
            print(f"  {name:45s} {l.get('kind')} {grid} "
                  f"{l.get('bits_per_weight', 0):.3f} bpw  loss {loss if loss is None else f'{loss:.4g}'}")
    return 0


# Modules that add subcommands: each has ``register(subparsers)`` and sets ``func`` on its parsers.
_EXTENSIONS: tuple[str, ...] = ("lowbit.export.cli", "lowbit.report.cli", "lowbit.deploy.cli")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lowbit", description="Quantize LLM weights, evaluate and inspect the result.")
    p.add_argument("--version", action="version", version=f"lowbit {__import__('lowbit').__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model and save it packed")
    q.add_argument("model", help="model folder, .gguf file, hub id, or 'smollm2-135m' (the demo model)")
    q.add_argument("--method", default="gptq", help="rtn, gptq, foem, gwq, squeeze, dlqat or quip (default gptq)")
    q.add_argument("--bits", type=int, default=4)
    q.add_argument("--group-size", type=int, default=128, help="columns per scale; -1 = per row (default 128)")
    q.add_argument("--sym", action="store_true", help="symmetric grid (default asymmetric)")
    q.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True,
                   help="GPTQ: columns by decreasing Hessian diagonal (default on; static groups keep it free)")
    q.add_argument("--no-static-groups", action="store_true", help="with --act-order: groups in permuted order (stores g_idx)")
    q.add_argument("--damp", type=finite_float, default=0.01)
    q.add_argument("--beta", type=finite_float, default=0.1, help="FOEM: first-order coefficient (default 0.1)")
    q.add_argument("--pullback", default="next", help="FOEM: pull back the 'next' column or 'all' remaining")
    q.add_argument("--outlier-frac", type=finite_float, default=0.01, help="GWQ: fraction of weights kept in fp16 (default 0.01)")
    q.add_argument("--saliency", default="grad", help="GWQ: outlier score grad | hessian | magnitude (default grad)")
    q.add_argument("--outlier-select", default="matrix", help="GWQ: top fraction per matrix | row | group")
    q.add_argument("--gwq-solver", default="gptq", help="GWQ: dense part by gptq (default) or rtn")
    q.add_argument("--grad-samples", type=int, default=16, help="GWQ: calibration windows back-propagated (default 16)")
    q.add_argument("--grad-checkpointing", action="store_true", help="GWQ: recompute blocks in the backward (less memory)")
    q.add_argument("--binary-frac", type=finite_float, default=0.8, help="Squeeze10: fraction of cells binarized (default 0.8)")
    q.add_argument("--high-bits", type=int, default=4, help="Squeeze10: bits of the other cells (default 4)")
    q.add_argument("--squeeze-score", default="pbar", help="Squeeze10: pbar (default) or magnitude cell selection")
    q.add_argument("--one-shot", action="store_true", help="Squeeze10: score cells against FP, no 4-bit stage")
    q.add_argument("--binary-residual", action="store_true",
                   help="Squeeze10: residual binarization μ + α₁b₁ + α₂b₂ in binary cells (+1 bit/weight, +fp16/cell)")
    q.add_argument("--codebook", default="e8p", help="QuIP#: e8p (E8P lattice + residual stages) or scalar (ablation)")
    q.add_argument("--rht", action=argparse.BooleanOptionalAction, default=True,
                   help="QuIP#: randomized Hadamard transform on both sides (default on; --no-rht: ablation)")
    q.add_argument("--scale-search", action=argparse.BooleanOptionalAction, default=True,
                   help="QuIP#: try 3 per-matrix scales, keep the lowest proxy loss (default on)")
    q.add_argument("--finetune", action="store_true", help="QuIP#: per-block Adam on signs/scales vs FP outputs; Squeeze10: on the cells' scales/offsets (FIAS)")
    q.add_argument("--ft-steps", type=int, default=50, help="--finetune: Adam steps per block (default 50)")
    q.add_argument("--ft-lr", type=finite_float, default=None,
                   help="--finetune: learning rate (default 1e-3 for quip, 5e-3 for squeeze)")
    q.add_argument("--head-bits", type=int, default=0,
                   help="also quantize the output head (lm_head) with RTN at this width, symmetric, groups of 32 "
                        "(default 0: keep it float, as GPTQ tools do; llama.cpp quantizes it)")
    q.add_argument("--gguf-type", default=None, metavar="TYPE",
                   help="rtn/gptq/foem on this GGUF type's grid (Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 IQ4_NL Q2_K Q3_K Q4_K Q5_K "
                        "Q6_K), stored as its blocks; rows it cannot hold fall back as llama.cpp does")
    q.add_argument("--fp-targets", action=argparse.BooleanOptionalAction, default=None,
                   help="FIAS: each layer reproduces the FP model's outputs from its quantized inputs (default: on for squeeze only)")
    q.add_argument("--train-text", default=None, help="DL-QAT: training text (default: --calib, i.e. the calibration plays)")
    q.add_argument("--steps", type=int, default=None, help="DL-QAT: optimizer steps (default 200)")
    q.add_argument("--lora-rank", type=int, default=None, help="DL-QAT: LoRA rank r (default 8)")
    q.add_argument("--lr", type=finite_float, default=None, help="DL-QAT: AdamW peak learning rate (default 1e-3)")
    q.add_argument("--distill", action="store_true", default=None, help="DL-QAT: KL to the FP model's logits, not CE")
    q.add_argument("--grad-accum", type=int, default=None,
                   help="DL-QAT: micro-batches of --batch-size windows (default 4) per step (default 1)")
    q.add_argument("--warmup", type=int, default=None, help="DL-QAT: linear warm-up steps (default 5%% of --steps)")
    q.add_argument("--save-every", type=int, default=None, help="DL-QAT: checkpoint every K steps into OUT.work/")
    q.add_argument("--resume", action="store_true", default=None, help="continue a killed run from OUT.work/ (finished blocks; DL-QAT: latest training checkpoint)")
    q.add_argument("--init", default=None, help="DL-QAT: initial grid and W0 from rtn (default) or gptq")
    q.add_argument("--block-size", type=int, default=128)
    q.add_argument("--mse", action=argparse.BooleanOptionalAction, default=True,
                   help="MSE search of each group's range (default on)")
    q.add_argument("--calib", default="default", help="calibration text: default | FILE | DIR | HF dataset")
    q.add_argument("--nsamples", type=int, default=64)
    q.add_argument("--seqlen", type=int, default=512)
    q.add_argument("--seed", type=SEED, default=0)
    q.add_argument("--batch-size", type=int, default=0, help="calibration windows per forward pass (0 = auto)")
    q.add_argument("--calib-dtype", default="auto", help="auto | float32 | bfloat16 | float16 (runner activations)")
    q.add_argument("--no-true-sequential", action="store_true", help="one forward per block for all Hessians")
    q.add_argument("--offload", default="none", help="none | disk: keep each block's weights in the safetensors "
                   "files until it is quantized (memory bounded by one block)")
    q.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    q.add_argument("--out", default=None, help="output folder (written atomically)")
    q.add_argument("--json", default=None, help="write seconds, bits_per_weight, peak_rss_bytes, per-layer losses")
    q.add_argument("--trust-remote-code", action="store_true")
    q.add_argument("--force", action="store_true", help="replace an existing --json file, or an --out that is not "
                   "a lowbit checkpoint")
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity and tasks of a lowbit checkpoint or a float model")
    e.add_argument("model", help="lowbit folder, model folder, .gguf, hub id or 'smollm2-135m'")
    e.add_argument("--text", default="default", help="default (evaluation plays) | FILE | DIR | HF dataset")
    e.add_argument("--seqlen", type=int_at_least(2), default=512)
    e.add_argument("--max-tokens", type=int_at_least(0), default=20480, help="score the first max_tokens//seqlen windows (0 = all)")
    e.add_argument("--bos", action="store_true", help="prepend BOS to every window")
    e.add_argument("--batch-size", type=int_at_least(1), default=4)
    e.add_argument("--device", default=None)
    e.add_argument("--json", default=None, help="write ppl, tokens_scored, seqlen, bits_per_weight, model_bytes, seconds")
    e.add_argument("--tasks", default=None, help="comma-separated: cloze (on --text), cloze:FILE, lm-eval tasks "
                   "(hellaswag, arc_easy…; needs lowbit[eval]) or task YAML files")
    e.add_argument("--no-ppl", action="store_true", help="skip perplexity (only --tasks)")
    e.add_argument("--kld", default=None, metavar="REF",
                   help="also KL(REF ‖ MODEL) of the next-token distributions, top-1 agreement and ppl ratio "
                        "on the same windows; REF: lowbit folder, model folder, .gguf or 'smollm2-135m'")
    e.add_argument("--limit", type=int_at_least(1), default=None, help="at most N examples per task (cloze included)")
    e.add_argument("--num-fewshot", type=int_at_least(0), default=None, help="lm-eval tasks: few-shot examples (default 0)")
    e.add_argument("--cloze-passages", type=int_at_least(1), default=300, help="cloze: passages scored (default 300)")
    e.add_argument("--cloze-context", type=int_at_least(1), default=128, help="cloze: context tokens per passage (default 128)")
    e.add_argument("--seed", type=SEED, default=0, help="cloze: which passages are drawn (default 0)")
    e.add_argument("--force", action="store_true", help="replace an existing --json file")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_eval)

    i = sub.add_parser("info", help="describe a lowbit checkpoint")
    i.add_argument("model")
    i.add_argument("--layers", action="store_true", help="list every quantized layer")
    i.add_argument("--json", action="store_true", help="print lowbit.json")
    i.set_defaults(func=cmd_info)

    for module in _EXTENSIONS:  # further subcommands, each module owning its own parser and handler
        __import__(module, fromlist=["register"]).register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import logging

    for name in ("torchao", "torch.utils._pytree"):  # import-time notices of optional libraries (torchao's
        logging.getLogger(name).setLevel(logging.ERROR)  # missing CUDA extensions), not lowbit's problems
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # lowbit reports problems itself, in one line
    if getattr(args, "quiet", False):
        hf_logging.disable_progress_bar()
    try:
        if hasattr(args, "device"):  # every subcommand with --device: checked once, before any work
            from .devices import check_device

            args.device = check_device(args.device)
        return args.func(args)
    except LowbitError as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return 130
