"""Speed and memory of a quantized model against its float source, measured in one process.

For a model and a prompt of ``P`` tokens (batch 1):

* prefill tokens/s  = ``P / t_prefill``, ``t_prefill`` = one forward over the ``P`` tokens;
* decode tokens/s   = ``(N − 1) / (t_gen(N) − t_gen(1))``, ``t_gen(k)`` = greedy ``model.generate``
  of exactly ``k`` new tokens (``min_new_tokens = max_new_tokens``, KV cache on), so the prefill
  and the first token cancel and only cached one-token steps are timed;
* every time is the median of ``repeats`` runs after one warm-up (the decode times are taken again, with
  twice the repeats, up to 3 times, while ``t_gen(N) <= t_gen(1)``, which only noise can cause; then it
  fails rather than report garbage); ``decode_tokens_per_cpu_s`` is the same rate per CPU-second of this process (``time.process_time``), which stays meaningful when other
  processes share the cores (with one thread it is the decode rate on an idle core).

The float baseline is the source recorded in ``lowbit.json`` (``meta["source"]``), timed in float32
and bfloat16; the quantized model's unquantized tensors (embeddings, norms, head) are tried in the same
two dtypes.  Each phase keeps its faster dtype: ``decode_tokens_per_s`` in ``dtype`` (``fp_dtype``),
``prefill_tokens_per_s`` in ``prefill_dtype`` (``fp_prefill_dtype``) — on an AVX2 CPU bfloat16 may decode
faster and prefill 5× slower — and ``by_dtype`` (``fp_by_dtype``) holds every dtype's numbers.
``weight_memory_ratio`` = bytes held by the quantized linears' packed tensors / (2 · their weights).

With ``llama-bench`` on ``PATH`` (llama.cpp), the folder's lossless GGUF export (or ``gguf=``) is timed
by llama.cpp too (``llama_cpp``: its prefill and decode tokens/s for the same prompt and new tokens);
without it, or when the folder has no lossless GGUF form, ``llama_cpp`` says why it was skipped.
Every run is appended to ``DIR/benches.json`` (date, settings, machine, results), as ``lowbit eval``
does with ``DIR/evals.json``.
"""
from __future__ import annotations

import gc
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from ..errors import LowbitError
from ..eval.memory import model_bytes, peak_rss_bytes
from ..packed.qlinear import QuantLinear

PROMPT = ("To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and "
          "arrows of outrageous fortune, or to take arms against a sea of troubles and by opposing end them. ")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BENCHES_FILE = "benches.json"
LLAMA_BENCH = "llama-bench"


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

    t_pre, _ = _median_time(lambda: model(input_ids=ids, attention_mask=mask, use_cache=False), repeats)
    for attempt in range(3):  # noise larger than the cached steps (a busy machine) gives tn <= t1: time again
        (t1, c1), (tn, cn) = (_median_time(f, repeats * 2**attempt) for f in (gen(1), gen(new_tokens)))
        if tn > t1:
            break
    else:  # a rate from these times would be garbage
        raise LowbitError(f"decode timing failed: {new_tokens} new tokens took no longer than 1 ({tn:.4f} s vs "
                          f"{t1:.4f} s, 3 tries); the machine is too busy for --new-tokens {new_tokens}: raise it")
    return {"prefill_tokens_per_s": prompt_tokens / t_pre,
            "decode_tokens_per_s": (new_tokens - 1) / (tn - t1),
            # per CPU-second of this process: robust to other processes sharing the cores (None: not resolvable)
            "decode_tokens_per_cpu_s": (new_tokens - 1) / (cn - c1) if cn > c1 else None}


def quantized_weight_bytes(model) -> tuple[int, int]:
    """(bytes of the packed tensors of all :class:`QuantLinear` layers, FP16 bytes of the same weights)."""
    q = fp16 = 0
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            q += sum(t.numel() * t.element_size() for t in mod.packed.tensors().values())
            fp16 += 2 * mod.in_features * mod.out_features
    return q, fp16


def _per_dtype(load, dtypes, time_it) -> tuple[dict, object]:
    """Load and time the model in each dtype -> ``({dtype: timings}, model loaded in the best decode dtype)``."""
    by, best, kept = {}, None, None
    for name in dtypes:
        model, tok = load(DTYPES[name])
        by[name] = time_it(model, tok)
        if best is None or by[name]["decode_tokens_per_s"] > by[best]["decode_tokens_per_s"]:
            best, kept = name, model
        del model
        gc.collect()
    return by, kept


def fastest(by: dict, key: str) -> str:
    """The dtype of ``by`` (``{dtype: timings}``) with the highest ``key``."""
    return max(by, key=lambda d: by[d][key])


def llama_bench(gguf: str | os.PathLike, prompt_tokens: int, new_tokens: int, repeats: int,
                threads: int | None) -> dict:
    """llama.cpp's ``llama-bench -o json`` on ``gguf`` -> ``{"prefill_tokens_per_s", "decode_tokens_per_s",
    "binary", "gguf"}`` (``avg_ts`` of its ``pp`` and ``tg`` tests) or ``{"skipped": why}``."""
    exe = shutil.which(LLAMA_BENCH)
    if exe is None:
        return {"skipped": f"{LLAMA_BENCH} is not on PATH"}
    cmd = [exe, "-m", str(gguf), "-p", str(prompt_tokens), "-n", str(new_tokens), "-r", str(repeats), "-o", "json"]
    cmd += ["-t", str(threads)] if threads else []
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        rows = json.loads(proc.stdout) if proc.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError) as e:
        return {"skipped": f"{LLAMA_BENCH} failed ({type(e).__name__})"}
    if not isinstance(rows, list):
        lines = proc.stderr.strip().splitlines() or [""]
        why = next((line for line in lines if "error" in line.lower()), lines[-1])  # the cause, not the epilogue
        return {"skipped": f"{LLAMA_BENCH} exited with status {proc.returncode}: {why.strip()[:200]}"}
    out = {"binary": exe, "gguf": str(gguf)}
    for r in rows:
        if r.get("n_prompt") and not r.get("n_gen"):
            out["prefill_tokens_per_s"] = float(r["avg_ts"])
        elif r.get("n_gen") and not r.get("n_prompt"):
            out["decode_tokens_per_s"] = float(r["avg_ts"])
    return out


def _llama_cpp(model_dir: str, gguf: str | None, prompt_tokens: int, new_tokens: int, repeats: int,
               threads: int | None) -> dict:
    """:func:`llama_bench` on ``gguf``, or on a lossless GGUF export of ``model_dir`` written for the purpose."""
    if shutil.which(LLAMA_BENCH) is None:
        return {"skipped": f"{LLAMA_BENCH} is not on PATH"}
    if gguf:
        return llama_bench(gguf, prompt_tokens, new_tokens, repeats, threads)
    from ..export import export_gguf

    with tempfile.TemporaryDirectory(prefix="lowbit-bench-") as tmp:
        try:
            export_gguf(model_dir, Path(tmp) / "model.gguf")
        except LowbitError as e:
            return {"skipped": f"no lossless GGUF export ({str(e)[:200]})"}
        r = llama_bench(Path(tmp) / "model.gguf", prompt_tokens, new_tokens, repeats, threads)
    r.pop("gguf", None)  # a temporary file
    return {**r, "gguf": "lossless export of the folder"} if "skipped" not in r else r


def append_bench(model_dir: str | os.PathLike, record: dict) -> Path:
    """Append a bench result (stamped with ``date``) to ``DIR/benches.json``, atomically."""
    from ..eval.harness import append_record

    return append_record(Path(model_dir) / BENCHES_FILE, record)


def bench(model_dir: str, *, prompt_tokens: int = 128, new_tokens: int = 64, repeats: int = 3,
          threads: int | None = None, dtypes: tuple[str, ...] = ("float32", "bfloat16"), fp: bool = True,
          llama_cpp: bool = True, gguf: str | None = None, record: bool = True, progress=print) -> dict:
    """Benchmark the lowbit checkpoint ``model_dir`` against its float source -> the result dict
    (also appended to ``DIR/benches.json`` unless ``record=False``)."""
    from ..eval.machine import machine

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
        cpu = r["decode_tokens_per_cpu_s"]
        progress(f"  {r['decode_tokens_per_s']:.1f} decode tok/s ({'–' if cpu is None else f'{cpu:.1f}'} per CPU-s), "
                 f"{r['prefill_tokens_per_s']:.0f} prefill tok/s "
                 f"({next(model.parameters()).dtype})")
        return r

    progress(f"quantized model {model_dir}")
    q_by, qmodel = _per_dtype(lambda d: api.load(model_dir, device="cpu", dtype=d)[:2], dtypes, time_it)
    dtype, prefill_dtype = fastest(q_by, "decode_tokens_per_s"), fastest(q_by, "prefill_tokens_per_s")
    q = {**q_by[dtype], "prefill_tokens_per_s": q_by[prefill_dtype]["prefill_tokens_per_s"]}
    qbytes, fp16_bytes = quantized_weight_bytes(qmodel)
    kernel = sorted({kernels.kernel_name(m.packed, torch.empty(1, m.in_features, dtype=DTYPES[dtype]))
                     for m in qmodel.modules() if isinstance(m, QuantLinear)})
    result = {"decode_tokens_per_s": q["decode_tokens_per_s"], "prefill_tokens_per_s": q["prefill_tokens_per_s"],
              "decode_tokens_per_cpu_s": q["decode_tokens_per_cpu_s"],
              "dtype": dtype, "prefill_dtype": prefill_dtype, "by_dtype": q_by, "kernels": kernel,
              "weight_bytes": model_bytes(qmodel),
              "quantized_linear_bytes": qbytes, "weight_memory_ratio": qbytes / fp16_bytes if fp16_bytes else 1.0,
              "bits_per_weight": meta.get("bits_per_weight"), "peak_rss_bytes": peak_rss_bytes(),
              "threads": torch.get_num_threads(), "prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
              "repeats": repeats, "machine": machine("cpu")}
    del qmodel
    gc.collect()
    if fp:
        source = (meta.get("source") or {}).get("source")
        if not source:
            raise LowbitError(f"{model_dir}/lowbit.json records no source model; use --no-fp")
        progress(f"float model {source}")
        f_by, fmodel = _per_dtype(lambda d: load_model(source, dtype=d)[:2], dtypes, time_it)
        fp_dtype, fp_prefill_dtype = fastest(f_by, "decode_tokens_per_s"), fastest(f_by, "prefill_tokens_per_s")
        f = {**f_by[fp_dtype], "prefill_tokens_per_s": f_by[fp_prefill_dtype]["prefill_tokens_per_s"]}
        result.update(fp_decode_tokens_per_s=f["decode_tokens_per_s"], fp_prefill_tokens_per_s=f["prefill_tokens_per_s"],
                      fp_decode_tokens_per_cpu_s=f["decode_tokens_per_cpu_s"],
                      fp_dtype=fp_dtype, fp_prefill_dtype=fp_prefill_dtype, fp_by_dtype=f_by,
                      fp_weight_bytes=model_bytes(fmodel),
                      decode_speedup=q["decode_tokens_per_s"] / f["decode_tokens_per_s"],
                      prefill_speedup=q["prefill_tokens_per_s"] / f["prefill_tokens_per_s"],
                      fp_peak_rss_bytes=peak_rss_bytes())
        del fmodel
    if llama_cpp:
        result["llama_cpp"] = _llama_cpp(model_dir, gguf, prompt_tokens, new_tokens, repeats, threads)
        if "skipped" in result["llama_cpp"]:
            progress(f"llama.cpp: skipped ({result['llama_cpp']['skipped']})")
    if record:
        append_bench(model_dir, {"settings": {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens,
                                              "repeats": repeats, "threads": threads, "dtypes": list(dtypes),
                                              "fp": fp, "gguf": gguf}, "result": result})
    return result
