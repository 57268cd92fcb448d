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
from .options import int_range as int_at_least  # argparse type: an integer in [low, high)
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

    populate = None  # a callable that adds the rest of the arguments the first time this parser is used

    def ready(self) -> "_Parser":
        """Add the deferred arguments (``populate``) now, if not done yet; returns the parser."""
        if self.populate is not None:
            populate, self.populate = self.populate, None
            populate(self)
        return self

    def parse_known_args(self, args=None, namespace=None):
        return super(_Parser, self.ready()).parse_known_args(args, namespace)

    def format_help(self) -> str:
        return super(_Parser, self.ready()).format_help()

    def format_usage(self) -> str:
        return super(_Parser, self.ready()).format_usage()


SEED = int_at_least(-2**63, 2**63)  # what torch's generators accept


def quantize_configs(a: argparse.Namespace):
    """The parsed ``lowbit quantize`` flags as ``(QuantConfig, CalibConfig, the method's run options or None)``.
    A flag not given holds its default (or ``None``), so an option of another method left out is no error; one
    given a value other than its default is.  The run options are DL-QAT's ``QATConfig``
    (``MethodSpec.run_options``): only the flags given reach it."""
    from . import methods
    from .config import CalibConfig, QuantConfig
    from .options import change_flag, described, names

    given = {k: v for k, v in vars(a).items() if v is not None}  # None: not given (the method's default)
    method = methods.get(given.get("method", "gptq"))
    calib = CalibConfig(**{k: given[k] for k in names(CalibConfig) if k in given})
    quant = QuantConfig(method=method.name, **{k: given[k] for k in _quant_dests() if k in given})
    run = None
    for m in methods.REGISTRY.values():
        if m.run_options is None:
            continue
        flags = {f.name: f for f in described(m.run_options)}
        mine = {k: given[k] for k in flags if k in given}
        if m is method:
            if given.get("resume"):
                mine["resume"] = True
            run = m.run_options.from_flags(mine, calib)
        elif mine:
            k = next(iter(mine))
            raise LowbitError(f"{change_flag(flags[k], mine[k])} applies only to --method {m.name}")
    return quant, calib, run


def _quant_dests() -> list[str]:
    """The dests of the grid's and every method's option flags."""
    from . import methods
    from .config import GridConfig
    from .options import names

    out = list(names(GridConfig))
    for m in methods.REGISTRY.values():
        out += [n for n in names(m.options) if n not in out]
    return out


def _add_quantize_flags(q: argparse.ArgumentParser) -> None:
    """``lowbit quantize``'s settings flags, generated from the settings' dataclasses (:func:`lowbit.options.add_flags`):
    the shared grid, calibration, then one group per registered method (its options; DL-QAT's training
    settings).  A setting several methods share gets one flag, in the first method's group, with each method's
    default."""
    from dataclasses import fields

    from . import methods
    from .config import CalibConfig, GridConfig
    from .options import add_flags, default_of, names

    reg = methods.REGISTRY
    q.add_argument("--method", default="gptq", metavar="{" + ",".join(reg) + "}",
                   help="; ".join(f"{m.name}: {m.title}" for m in reg.values()) + " (default gptq)")
    add_flags(q.add_argument_group("grid (every method)"), GridConfig)
    add_flags(q.add_argument_group("calibration"), CalibConfig)
    seen = set(names(GridConfig)) | set(names(CalibConfig))

    def default_text(f):
        owners = {o.name: next(g for g in fields(o.options) if g.name == f.name)
                  for o in reg.values() if f.name in names(o.options)}
        values = {k: default_of(g) for k, g in owners.items()}
        if len(set(map(repr, values.values()))) > 1:
            return ", ".join(f"{v} for {k}" for k, v in values.items())
        return default_of(f)

    for m in reg.values():
        todo = [n for n in names(m.options) if n not in seen]
        if todo or m.run_options is not None:
            group = q.add_argument_group(f"--method {m.name}", m.title)
            add_flags(group, m.options, only=todo, default_text=default_text)
            if m.run_options is not None:  # not given: None, so only the flags given reach the run options
                add_flags(group, m.run_options, unset=True)
        seen |= set(todo)


def cmd_quantize(a: argparse.Namespace) -> int:
    from . import api

    from .methods import get

    quant, calib, qat = quantize_configs(a)
    method = get(quant.method)
    if not method.needs_of(quant) & {"calibration", "train_text"} and calib.source != "default":
        raise LowbitError(f"--calib {calib.source!r} is unused by --method {method.name} (data-free); drop it or "
                          "choose a calibrated method")  # a given --calib would be ignored
    _check_json(a)
    res = api.quantize(a.model, out=a.out, quant=quant, calib=calib, device=a.device, progress=not a.quiet,
                       trust_remote_code=a.trust_remote_code, qat=qat, resume=bool(a.resume), force=a.force)
    from .calib.distributed import world

    if world()[0] != 0:  # under torchrun only rank 0 reports
        return 0
    _write_json(a.json, res.report, force=a.force)
    if not a.quiet:
        r = res.report
        grid = quant.gguf_type or (f"GGUF types for {quant.target_bpw:g} bpw" if quant.target_bpw is not None
                                   else f"w{quant.bits}g{quant.group_size}")
        print(f"quantized {a.model} with {quant.method.value} {grid}: "
              f"{r['bits_per_weight']:.3f} bits/weight, {r['seconds']:.1f} s, peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB"
              + (f" -> {res.out}" if res.out else ""))
        if res.meta.get("gguf_budget"):  # the per-layer types --target-bpw chose (lowbit.gguf.budget)
            from .gguf.budget import summary

            print("  " + summary(res.meta["gguf_budget"]))
        falls = [(n, l["gguf_fallback"]) for n, l in res.meta["layers"].items() if l.get("gguf_fallback")]
        if falls:  # the same rule llama-quantize applies (lowbit.gguf.types.resolve)
            print(f"  {len(falls)} of {len(res.meta['layers'])} layers fell back as llama.cpp does, e.g. "
                  f"{falls[0][0]}: {falls[0][1]}")
        for n, l in res.meta["layers"].items():  # --embedding-type: the table's type, and why it fell back
            if l.get("role"):
                print(f"  {l['role']} ({n}{', also the tied head' if l.get('tied') else ''}): {l['gguf_type']}"
                      + (f" ({l['gguf_fallback']})" if l.get("gguf_fallback") else ""))
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
    from .config import applicable

    cfg = applicable(meta.get("config") or {}, meta.get("method"))  # an old lowbit.json lists every method's
    print(f"{a.model}: lowbit format v{meta['format_version']}, method {meta.get('method')}")
    print(f"  source       {(meta.get('source') or {}).get('source')}")
    print(f"  config       " + ", ".join(f"{k}={v}" for k, v in cfg.items()))
    if meta.get("calibration"):
        c = meta["calibration"]
        print(f"  calibration  {c.get('source')}: {c.get('nsamples')} x {c.get('seqlen')} tokens, seed {c.get('seed')}, "
              f"fingerprint {c.get('fingerprint')}")
    print(f"  layers       {len(meta['layers'])} quantized, {meta.get('bits_per_weight', float('nan')):.3f} bits/weight")
    print(f"  size on disk {size / 2**20:.1f} MiB")
    if meta.get("gguf_budget"):
        from .gguf.budget import summary

        print(f"  budget       {summary(meta['gguf_budget'])}")
    if a.layers:
        for name, l in meta["layers"].items():
            loss = l.get("loss")
            grid = l["gguf_type"] if "gguf_type" in l else f"b{l.get('bits')} g{l.get('group_size')}"
            role = f"  ({l['role']}{', tied head' if l.get('tied') else ''})" if l.get("role") else ""
            print(f"  {name:45s} {l.get('kind')} {grid} "
                  f"{l.get('bits_per_weight', 0):.3f} bpw  loss {loss if loss is None else f'{loss:.4g}'}{role}")
    return 0


# Modules that add subcommands: each has ``register(subparsers)`` and sets ``func`` on its parsers.
_EXTENSIONS: tuple[str, ...] = ("lowbit.export.cli", "lowbit.report.cli", "lowbit.deploy.cli", "lowbit.kernels.cli")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lowbit", description="Quantize LLM weights, evaluate and inspect the result.")
    p.add_argument("--version", action="version", version=f"lowbit {__import__('lowbit').__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model and save it packed")
    q.add_argument("model", help="model folder, .gguf file, hub id, or 'smollm2-135m' (the demo model)")
    q.populate = _add_quantize_flags  # on first use: the methods' flags import their files (and torch)
    q.add_argument("--resume", action="store_true", default=None, help="continue a killed run from OUT.work/ "
                   "(finished blocks; DL-QAT: latest training checkpoint)")
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
