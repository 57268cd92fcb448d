"""``lowbit export --check``: load what was written with the client it is for and compare perplexities.

On ``W`` consecutive windows of ``T`` tokens of the evaluation text (lowbit's protocol,
:mod:`lowbit.eval.ppl`: tokens 1…T−1 of every window scored) lowbit's own model gives ``ppl₀`` and
each client's model ``ppl``; the report is ``Δ = 100·(ppl − ppl₀)/ppl₀`` %.  Clients, each used with
its defaults and run only when installed (otherwise the entry says ``skipped`` and why):

* ``gptq``: ``GPTQModel.load(D, device=…)`` (bf16 on CPU, its kernel auto-selection).
* ``compressed-tensors``: ``transformers.AutoModelForCausalLM.from_pretrained(D)`` through its
  compressed-tensors integration.  Asymmetric ``pack-quantized`` checkpoints do not load there with the
  defaults (llm-compressor's own neither), an upstream bug: transformers builds the compressed module on the
  meta device (``quantizer_compressed_tensors.py:115-119`` in transformers 5.24), where
  compressed-tensors 0.20.1's ``PackedQuantizationCompressor.compress`` (``pack_quantized/base.py:83-91``)
  returns ``weight_zero_point`` unpacked, ``(m, G)`` int8, while its real branch (``:103-106``) and every
  checkpoint store it packed along the output axis, ``(m·b/32, G)`` int32 — the layout vLLM's
  ``CompressedTensorsWNA16`` loads and compressed-tensors' own ``decompress`` unpacks — so loading stops at
  a size mismatch.  Those are loaded with transformers' documented load-time dequantization,
  ``quantization_config=CompressedTensorsConfig(dequantize=True)`` (the library's ``decompress`` per
  layer, ``s·(q − z)`` computed in the stored fp16 scale's precision, then float32).
* ``gguf``: transformers' GGUF reader (``from_pretrained(dir, gguf_file=…)``), and llama.cpp's
  ``llama-perplexity`` when found (``$LOWBIT_LLAMA_CPP_BIN``, a folder or the binary, else ``PATH``).
  llama.cpp scores only the second half of each window (positions T/2+1…T−1, with BOS in front when
  the GGUF asks for it) on its own tokenization, so for its rows ``ppl₀`` is lowbit's on the same protocol.
  Two rows: ``llama.cpp`` runs the file as written, ``llama.cpp-f32`` the same file with every tensor
  dequantized to F32 (:func:`gguf_as_f32`).  On a quantized weight llama.cpp's CPU kernels round the
  activations to 8-bit blocks (``vec_dot_type`` in ``ggml-cpu.c``), which moves its perplexity by a few
  tenths of a percent whoever wrote the file (demo model: +0.27 % on lowbit's Q4_1, +0.62 % on llama.cpp's
  own Q4_0 against transformers reading that file; on their F32 copies +0.036 % and +0.003 %): the first
  row gets :data:`LLAMA_CPP_TOLERANCE_PCT` and ``vs_f32_pct`` (its difference from the second), the second,
  the file's content under float32 arithmetic, the target :data:`TOLERANCE_PCT`.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import LowbitError

TOLERANCE_PCT = 0.2  # the target: every client within 0.2 % of lowbit's own perplexity
# llama.cpp on a quantized GGUF: its CPU dot products round the activations to 8-bit blocks (Q8_0/Q8_1/Q8_K),
# measured +0.27 % on the demo model (RTN w4g64 asym as Q4_1; +0.036 % on the F32 copy), so that row gets 0.5 %
LLAMA_CPP_TOLERANCE_PCT = 0.5


def _windows(tokenizer, text: str, windows: int, seqlen: int) -> torch.Tensor:
    from ..data import eval_windows, read_text, tokenize

    return eval_windows(tokenize(tokenizer, read_text(text, split="eval")), seqlen, windows * seqlen)


@torch.no_grad()
def _ppl(model, windows: torch.Tensor, first: int = 0) -> float:
    """exp(mean NLL) of tokens first+1…T−1 of every window (first = 0: lowbit's protocol)."""
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for w in windows:
        ids = w[None].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[0, first:-1].float()
        nll += float(F.cross_entropy(logits, ids[0, first + 1:], reduction="sum"))
        count += ids.shape[1] - 1 - first
    return math.exp(nll / count)


def _row(client: str, ppl: float, ref: float, tolerance: float = TOLERANCE_PCT, **extra) -> dict:
    return {"client": client, "ppl": ppl, "lowbit_ppl": ref, "diff_pct": 100 * (ppl - ref) / ref,
            "tolerance_pct": tolerance, **extra}


def _skip(client: str, why: str) -> dict:
    return {"client": client, "skipped": why}


def _gptqmodel(exported: Path, windows, ref: float, device: str) -> dict:
    try:
        from gptqmodel import GPTQModel
    except ImportError:
        return _skip("gptqmodel", "GPTQModel is not installed (pip install 'lowbit[interop]')")
    m = GPTQModel.load(str(exported), device=device)
    return _row("gptqmodel", _ppl(m.model.eval(), windows), ref, dtype=str(next(m.model.parameters()).dtype))


def _compressed_tensors(exported: Path, windows, ref: float, device: str) -> dict:
    import json

    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        return _skip("transformers+compressed-tensors", "compressed-tensors is not installed")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    groups = json.loads((exported / "config.json").read_text())["quantization_config"]["config_groups"]
    if all(g["weights"]["symmetric"] for g in groups.values()):
        model = AutoModelForCausalLM.from_pretrained(exported).to(device).eval()
        return _row("transformers+compressed-tensors", _ppl(model, windows), ref, dtype=str(model.dtype))
    # asymmetric: transformers' documented load-time dequantization (see the module docstring for why)
    with warnings.catch_warnings():  # "... loading attributes (dequantize) will be overwritten": what we ask
        warnings.filterwarnings("ignore", message="You passed `quantization_config`")
        model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32,
                                                     quantization_config=CompressedTensorsConfig(dequantize=True))
    model = model.to(device).eval()
    return _row("transformers+compressed-tensors (dequantize=True)", _ppl(model, windows), ref,
                dtype=str(model.dtype))


def _gguf_transformers(exported: Path, windows, ref: float, device: str) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(exported.parent, gguf_file=exported.name,
                                                 dtype=torch.float32).to(device).eval()
    return _row("transformers-gguf", _ppl(model, windows), ref, dtype="float32")


def llama_perplexity_bin() -> str | None:
    """``llama-perplexity`` from ``$LOWBIT_LLAMA_CPP_BIN`` (the binary or its folder), else from PATH."""
    env = os.environ.get("LOWBIT_LLAMA_CPP_BIN")
    if env:
        p = Path(env)
        p = p / "llama-perplexity" if p.is_dir() else p
        return str(p) if p.is_file() and os.access(p, os.X_OK) else None
    return shutil.which("llama-perplexity")


def gguf_as_f32(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Write ``dst``: the GGUF ``src`` with every tensor dequantized to F32 by gguf-py's reference
    dequantizer (``gguf.quants.dequantize``: the values the file holds, e.g. ``d·u + m`` per Q4_1 block,
    exact in float32), the metadata copied (``general.file_type`` set to ``ALL_F32``).

    llama.cpp's CPU kernels multiply a quantized weight by activations rounded to its 8-bit partner type
    (``vec_dot_type``: Q8_0 for Q4_0/Q5_0/Q8_0/IQ4_NL, Q8_1 for Q4_1/Q5_1, Q8_K for the K- and I-quants),
    an F16 one by activations rounded to F16, and an F32 one by float32 activations: on this copy
    ``llama-perplexity`` scores the file's weights without that rounding."""
    import gguf
    import numpy as np

    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), r.fields["general.architecture"].contents())
    for f in r.fields.values():
        if f.name == "general.architecture" or f.name.startswith("GGUF."):
            continue  # written by GGUFWriter itself
        vtype = f.types[0]
        value = int(gguf.LlamaFileType.ALL_F32) if f.name == "general.file_type" else f.contents()
        w.add_key_value(f.name, value, vtype, sub_type=f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None)
    for t in r.tensors:
        w.add_tensor(t.name, np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _llama_perplexity(exe: str, path: Path, text_file: str, n: int, seqlen: int) -> float:
    """llama-perplexity's ppl of the first ``n`` windows of ``text_file``: its running estimate ``[n]``.

    It is run on ``n + 1`` windows so that ``[n]`` is printed one window's compute before the exit: llama.cpp
    logs through a queue that a worker thread drains, and what is still queued when the process ends is lost
    (on a busy machine its last lines, "Final estimate" included, often are)."""
    for _ in range(2):  # once more if even [n] was lost
        r = subprocess.run([exe, "-m", str(path), "-f", text_file, "-c", str(seqlen), "--chunks", str(n + 1),
                            "-b", str(seqlen), "-t", str(max(1, torch.get_num_threads()))],
                           capture_output=True, text=True, timeout=3600)
        running = dict(re.findall(r"\[(\d+)\]([0-9.]+),", r.stdout + r.stderr))
        if r.returncode != 0 or str(n) in running:
            break
    if r.returncode == 0 and str(n) in running:
        return float(running[str(n)])
    lines = [ln.strip() for ln in (r.stderr + r.stdout).splitlines() if ln.strip()]
    why = next((ln for ln in lines if "error" in ln.lower()), lines[-1] if lines else "no output")
    raise LowbitError(f"llama-perplexity failed on '{path}' (exit {r.returncode}): {why[:200]}")


def _llama_cpp(exported: Path, model, tokenizer, text: str, n_windows: int, seqlen: int) -> list[dict]:
    """Two rows: ``llama.cpp`` (the file as written) and ``llama.cpp-f32`` (:func:`gguf_as_f32` of it: the
    same weights, float32 arithmetic), both against lowbit on llama.cpp's protocol.  The first carries
    ``vs_f32_pct``, the part of its difference that is llama.cpp's activation rounding."""
    import gguf

    exe = llama_perplexity_bin()
    if exe is None:
        why = "llama-perplexity not on PATH (or $LOWBIT_LLAMA_CPP_BIN)"
        return [_skip("llama.cpp", why), _skip("llama.cpp-f32", why)]
    from ..data import read_text, tokenize

    field = gguf.GGUFReader(str(exported)).fields.get("tokenizer.ggml.add_bos_token")
    add_bos = bool(field.contents()) if field is not None else False
    body = read_text(text, split="eval")
    ids = tokenize(tokenizer, body)
    n = min(n_windows, ids.numel() // seqlen - 1)  # llama.cpp runs one window more (see _llama_perplexity)
    if n < 1:
        raise LowbitError(f"--text: fewer than {2 * seqlen} tokens for llama-perplexity")
    windows = ids[: n * seqlen].reshape(n, seqlen).clone()
    if add_bos:
        windows[:, 0] = tokenizer.bos_token_id
    ref = _ppl(model, windows, first=seqlen // 2)
    extra = {"protocol": "second half of each window", "windows": n}
    with tempfile.TemporaryDirectory(prefix="lowbit-check-") as tmp:
        # the n windows it scores, the one more it runs, and a little more (its tokens need not end where ours do)
        text_file = str(Path(tmp) / "text.txt")
        Path(text_file).write_text(tokenizer.decode(ids[: (n + 2) * seqlen].tolist()))
        ppl = _llama_perplexity(exe, exported, text_file, n, seqlen)
        f32 = Path(tmp) / "f32.gguf"
        gguf_as_f32(exported, f32)
        ppl32 = _llama_perplexity(exe, f32, text_file, n, seqlen)
    return [_row("llama.cpp", ppl, ref, LLAMA_CPP_TOLERANCE_PCT, vs_f32_pct=100 * (ppl - ppl32) / ppl32, **extra),
            _row("llama.cpp-f32", ppl32, ref, **extra)]


def check_export(model_dir: str | os.PathLike, exported: str | os.PathLike, fmt: str, *, text: str = "default",
                 windows: int = 4, seqlen: int = 512, device: str = "cpu") -> dict:
    """Perplexity of the export ``exported`` (format ``fmt``) under its clients vs lowbit's ``model_dir``.

    Returns ``{"lowbit_ppl", "windows", "seqlen", "tolerance_pct", "clients": [{"client", "ppl",
    "lowbit_ppl", "diff_pct", "tolerance_pct", …} or {"client", "skipped"}], "ok"}``; ``ok`` is false
    when a client that ran differs by more than its ``tolerance_pct``."""
    from .. import api

    exported = Path(exported)
    model, tokenizer, _ = api.load(model_dir, device=device)
    model.eval()
    win = _windows(tokenizer, text, windows, seqlen)
    ref = _ppl(model, win)
    if fmt == "gptq":
        rows = [_gptqmodel(exported, win, ref, device)]
    elif fmt == "compressed-tensors":
        rows = [_compressed_tensors(exported, win, ref, device)]
    elif fmt == "gguf":
        rows = [_gguf_transformers(exported, win, ref, device),
                *_llama_cpp(exported, model, tokenizer, text, windows, seqlen)]
    else:
        raise LowbitError(f"--check: unknown format {fmt!r}")
    ok = all(abs(r["diff_pct"]) <= r["tolerance_pct"] for r in rows if "ppl" in r)
    return {"lowbit_ppl": ref, "windows": int(win.shape[0]), "seqlen": seqlen, "tolerance_pct": TOLERANCE_PCT,
            "clients": rows, "ok": ok}


def describe(report: dict) -> list[str]:
    """One line per client for the terminal."""
    lines = []
    for r in report["clients"]:
        if "skipped" in r:
            lines.append(f"check {r['client']}: skipped ({r['skipped']})")
        else:
            lines.append(f"check {r['client']}: ppl {r['ppl']:.4f} vs lowbit {r['lowbit_ppl']:.4f} "
                         f"({r['diff_pct']:+.3f} %) on {report['windows']} windows of {report['seqlen']} tokens")
    return lines
