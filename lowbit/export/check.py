"""``lowbit export --check``: load what was written with the client it is for and compare perplexities.

On ``W`` consecutive windows of ``T`` tokens of the evaluation text (lowbit's protocol,
:mod:`lowbit.eval.ppl`: tokens 1…T−1 of every window scored) lowbit's own model gives ``ppl₀`` and
each client's model ``ppl``; the report is ``Δ = 100·(ppl − ppl₀)/ppl₀`` %.  Clients, each used with
its defaults and run only when installed (otherwise the entry says ``skipped`` and why):

* ``gptq``: ``GPTQModel.load(D, device=…)`` (bf16 on CPU, its kernel auto-selection).
* ``compressed-tensors``: ``transformers.AutoModelForCausalLM.from_pretrained(D)`` through its
  compressed-tensors integration.  Asymmetric ``pack-quantized`` checkpoints do not load there
  (transformers builds the module on the meta device, where compressed-tensors leaves
  ``weight_zero_point`` unpacked, and the stored packed one is then refused as a size mismatch;
  llm-compressor's own asymmetric checkpoints fail the same way): those are read by
  compressed-tensors' model-free dequantizer (``convert_checkpoint`` with
  ``CompressedTensorsDequantizer``) and the dense copy loaded by transformers.
* ``gguf``: transformers' GGUF reader (``from_pretrained(dir, gguf_file=…)``), and llama.cpp's
  ``llama-perplexity`` when found (``$LOWBIT_LLAMA_CPP_BIN``, a folder or the binary, else ``PATH``).
  llama.cpp scores only the second half of each window (positions T/2+1…T−1, with BOS in front when
  the GGUF asks for it) on its own tokenization, so for that row ``ppl₀`` is lowbit's on the same protocol.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import LowbitError

TOLERANCE_PCT = 0.2  # the target: every client within 0.2 % of lowbit's own perplexity
# llama.cpp's CPU dot products round the activations to 8-bit blocks (Q8_0/Q8_1) and it tokenizes the
# text itself: measured +0.27 % on the demo model (RTN w4g64 asym as Q4_1), so its row gets 0.5 %
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
    from transformers import AutoModelForCausalLM

    groups = json.loads((exported / "config.json").read_text())["quantization_config"]["config_groups"]
    if all(g["weights"]["symmetric"] for g in groups.values()):
        model = AutoModelForCausalLM.from_pretrained(exported).to(device).eval()
        return _row("transformers+compressed-tensors", _ppl(model, windows), ref, dtype=str(model.dtype))
    from compressed_tensors.entrypoints.convert import CompressedTensorsDequantizer, convert_checkpoint

    with tempfile.TemporaryDirectory(prefix="lowbit-check-") as tmp:
        convert_checkpoint(str(exported), tmp, CompressedTensorsDequantizer(str(exported), dtype=torch.float32),
                           max_workers=1, device="cpu")
        for f in exported.iterdir():  # tokenizer files, generation config
            if f.is_file() and not (Path(tmp) / f.name).exists():
                shutil.copy2(f, Path(tmp) / f.name)
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).to(device).eval()
        return _row("compressed-tensors dequantizer + transformers", _ppl(model, windows), ref,
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


def _llama_cpp(exported: Path, model, tokenizer, text: str, n_windows: int, seqlen: int) -> dict:
    import gguf

    exe = llama_perplexity_bin()
    if exe is None:
        return _skip("llama.cpp", "llama-perplexity not on PATH (or $LOWBIT_LLAMA_CPP_BIN)")
    from ..data import read_text, tokenize

    field = gguf.GGUFReader(str(exported)).fields.get("tokenizer.ggml.add_bos_token")
    add_bos = bool(field.contents()) if field is not None else False
    body = read_text(text, split="eval")
    ids = tokenize(tokenizer, body)
    n = min(n_windows, ids.numel() // seqlen)
    if n < 1:
        raise LowbitError(f"--text: fewer than {seqlen} tokens for llama-perplexity")
    windows = ids[: n * seqlen].reshape(n, seqlen).clone()
    if add_bos:
        windows[:, 0] = tokenizer.bos_token_id
    ref = _ppl(model, windows, first=seqlen // 2)
    # llama.cpp needs 2 windows' worth of text; give it what it scores and a little more
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(tokenizer.decode(ids[: (n + 1) * seqlen].tolist()))
    try:
        r = subprocess.run([exe, "-m", str(exported), "-f", f.name, "-c", str(seqlen), "--chunks", str(n),
                            "-b", str(seqlen), "-t", str(max(1, torch.get_num_threads()))],
                           capture_output=True, text=True, timeout=3600)
    finally:
        os.unlink(f.name)
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", r.stdout + r.stderr)
    if r.returncode != 0 or not found:
        lines = [ln.strip() for ln in (r.stderr + r.stdout).splitlines() if ln.strip()]
        why = next((ln for ln in lines if "error" in ln.lower()), lines[-1] if lines else "no output")
        raise LowbitError(f"llama-perplexity failed on '{exported}' (exit {r.returncode}): {why[:200]}")
    return _row("llama.cpp", float(found.group(1)), ref, LLAMA_CPP_TOLERANCE_PCT,
                protocol="second half of each window", windows=n)


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
                _llama_cpp(exported, model, tokenizer, text, windows, seqlen)]
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
