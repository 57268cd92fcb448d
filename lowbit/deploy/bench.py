"""Speed and memory of a quantized model against its float source, measured in one process.

For a model and a prompt of ``P`` tokens (batch 1):

* prefill tokens/s  = ``P / t_prefill``, ``t_prefill`` = one forward over the ``P`` tokens;
* decode tokens/s   = ``(N − 1) / (t_gen(N) − t_gen(1))``, ``t_gen(k)`` = greedy ``model.generate``
  of exactly ``k`` new tokens (``min_new_tokens = max_new_tokens``, KV cache on), so the prefill
  and the first token cancel and only cached one-token steps are timed;
* every time is the median of ``repeats`` runs after one warm-up; ``decode_tokens_per_cpu_s`` is the
  same rate per CPU-second of this process (``time.process_time``), which stays meaningful when other
  processes share the cores (with one thread it is the decode rate on an idle core).

The float baseline is the source recorded in ``lowbit.json`` (``meta["source"]``), timed in float32
and bfloat16; the faster is the baseline (``fp_dtype``).  The quantized model's unquantized tensors
(embeddings, norms, head) are tried in the same two dtypes and the faster is reported (``dtype``).
``weight_memory_ratio`` = bytes held by the quantized linears' packed tensors / (2 · their weights).
"""
from __future__ import annotations

import gc
import statistics
import time

import torch

from ..errors import LowbitError
from ..eval.memory import model_bytes, peak_rss_bytes
from ..packed.qlinear import QuantLinear

PROMPT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and "
          "arrows of outrageous fortune, or to take arms against a sea of troubles and by opposing end them. ")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def prompt_ids(tokenizer, n_tokens: int) -> torch.Tensor:
    """A fixed English prompt tokenized and tiled to exactly ``n_tokens`` -> ``(1, n_tokens)`` int64."""
    ids = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    if not ids:
        raise LowbitError("the tokenizer turns the benchmark prompt into no tokens")
    return torch.tensor((ids * (n_tokens // len(ids) + 1))[:n_tokens]).view(1, n_tokens)


def _median_time(fn, repeats: int) -> tuple[float, float]:
    """Median wall-clock and median process CPU seconds of ``fn()`` (after one warm-up run)."""
    fn()  # warm-up (kernel build, allocator, caches)
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


@torch.inference_mode()
def time_model(model, tokenizer, prompt_tokens: int, new_tokens: int, repeats: int) -> dict:
    """``{"prefill_tokens_per_s", "decode_tokens_per_s"}`` of ``model`` at batch 1 (see module doc)."""
    ids = prompt_ids(tokenizer, prompt_tokens)
    mask = torch.ones_like(ids)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def gen(k: int):
        return lambda: model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=k, min_new_tokens=k,
                                      do_sample=False, use_cache=True, pad_token_id=pad)

    (t_pre, c_pre), (t1, c1), (tn, cn) = (_median_time(f, repeats) for f in (
        lambda: model(input_ids=ids, attention_mask=mask, use_cache=False), gen(1), gen(new_tokens)))
    return {"prefill_tokens_per_s": prompt_tokens / t_pre,
            "decode_tokens_per_s": (new_tokens - 1) / max(tn - t1, 1e-9),
            # per CPU-second of this process: robust to other processes sharing the cores
            "decode_tokens_per_cpu_s": (new_tokens - 1) / max(cn - c1, 1e-9)}


def quantized_weight_bytes(model) -> tuple[int, int]:
    """(bytes of the packed tensors of all :class:`QuantLinear` layers, FP16 bytes of the same weights)."""
    q = fp16 = 0
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            q += sum(t.numel() * t.element_size() for t in mod.packed.tensors().values())
            fp16 += 2 * mod.in_features * mod.out_features
    return q, fp16


def _best(load, dtypes, time_it) -> tuple[dict, str, object]:
    """Load and time the model in each dtype; keep the one with the higher decode rate."""
    best = None
    for name in dtypes:
        model, tok = load(DTYPES[name])
        r = time_it(model, tok)
        if best is None or r["decode_tokens_per_s"] > best[0]["decode_tokens_per_s"]:
            best = (r, name, (model, tok))
        else:
            del model
        gc.collect()
    return best


def bench(model_dir: str, *, prompt_tokens: int = 128, new_tokens: int = 64, repeats: int = 3,
          threads: int | None = None, dtypes: tuple[str, ...] = ("float32", "bfloat16"), fp: bool = True,
          progress=print) -> dict:
    """Benchmark the lowbit checkpoint ``model_dir`` against its float source -> the result dict."""
    from .. import api, kernels
    from ..models.sources import load_model
    from ..packed.checkpoint import read_meta

    if prompt_tokens < 1 or new_tokens < 2 or repeats < 1:
        raise LowbitError("--prompt-tokens and --repeats must be >= 1 and --new-tokens >= 2")
    if threads is not None:
        if threads < 1:
            raise LowbitError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    bad = [d for d in dtypes if d not in DTYPES]
    if bad or not dtypes:
        raise LowbitError(f"--dtypes: use float32 and/or bfloat16, got {','.join(dtypes) or 'nothing'}")
    meta = read_meta(model_dir)
    kernels.warm_up()

    def time_it(model, tok):
        r = time_model(model, tok, prompt_tokens, new_tokens, repeats)
        progress(f"  {r['decode_tokens_per_s']:.1f} decode tok/s ({r['decode_tokens_per_cpu_s']:.1f} per CPU-s), "
                 f"{r['prefill_tokens_per_s']:.0f} prefill tok/s "
                 f"({next(model.parameters()).dtype})")
        return r

    progress(f"quantized model {model_dir}")
    q, dtype, (qmodel, _tok) = _best(lambda d: api.load(model_dir, device="cpu", dtype=d)[:2], dtypes, time_it)
    qbytes, fp16_bytes = quantized_weight_bytes(qmodel)
    kernel = sorted({kernels.kernel_name(m._packed if "_packed" in m.__dict__ else m.packed,
                                         torch.empty(1, m.in_features, dtype=DTYPES[dtype]))
                     for m in qmodel.modules() if isinstance(m, QuantLinear)})
    result = {"decode_tokens_per_s": q["decode_tokens_per_s"], "prefill_tokens_per_s": q["prefill_tokens_per_s"],
              "decode_tokens_per_cpu_s": q["decode_tokens_per_cpu_s"],
              "dtype": dtype, "kernels": kernel, "weight_bytes": model_bytes(qmodel),
              "quantized_linear_bytes": qbytes, "weight_memory_ratio": qbytes / fp16_bytes if fp16_bytes else 1.0,
              "bits_per_weight": meta.get("bits_per_weight"), "peak_rss_bytes": peak_rss_bytes(),
              "threads": torch.get_num_threads(), "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
              "repeats": repeats}
    del qmodel
    gc.collect()
    if fp:
        source = (meta.get("source") or {}).get("source")
        if not source:
            raise LowbitError(f"{model_dir}/lowbit.json records no source model; use --no-fp")
        progress(f"float model {source}")
        f, fp_dtype, (fmodel, _) = _best(lambda d: load_model(source, dtype=d)[:2], dtypes, time_it)
        result.update(fp_decode_tokens_per_s=f["decode_tokens_per_s"], fp_prefill_tokens_per_s=f["prefill_tokens_per_s"],
                      fp_decode_tokens_per_cpu_s=f["decode_tokens_per_cpu_s"],
                      fp_dtype=fp_dtype, fp_weight_bytes=model_bytes(fmodel),
                      decode_speedup=q["decode_tokens_per_s"] / f["decode_tokens_per_s"],
                      prefill_speedup=q["prefill_tokens_per_s"] / f["prefill_tokens_per_s"],
                      fp_peak_rss_bytes=peak_rss_bytes())
    return result
