"""The bad-input contract, case by case, through the real CLI (``python -m lowbit …`` in a subprocess).

Every row of ``CASES`` is one bad input (issue 14's probe cases and every error the README promises).
Each must end with exit status 2 and exactly one stderr line ``lowbit: error: …`` that names the culprit
(``needle``), never a traceback, and leave the case's folder exactly as it was (no new file or folder, no
file changed: compared by sha256), the shared models unchanged too.  Adding a case is one row:

    C("id", "argv with {fp} {ck} {text} {tmp}", "needle", setup=..., forbid=("text that must not appear",))

``{fp}`` is a tiny float LLaMA folder, ``{ck}`` its RTN w4g32 lowbit checkpoint, ``{text}`` a text file (all
shared, read-only), ``{tmp}`` the case's own folder, where ``setup(tmp, shared)`` puts its broken inputs.
The cases run concurrently (each one is a fresh Python that imports torch and transformers).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest

from helpers import build_tiny_model, make_text, private_lowbit_cache

pytestmark = pytest.mark.e2e  # every case runs the real CLI in a subprocess

WORKERS = 3
TIMEOUT_S = 90
PROGRESS = re.compile(r"^\s*(Loading|Writing|Converting)\b.*(\d+%|it/s)")  # tqdm bars of transformers/gguf


@dataclass(frozen=True)
class C:
    id: str
    argv: str
    needle: str
    setup: Callable[[Path, dict], None] | None = None
    forbid: tuple[str, ...] = field(default=())


# ---- setup helpers: each builds a broken input inside the case folder -----------------------------------------

def write(name: str, content: str | bytes):
    def setup(tmp: Path, shared: dict) -> None:
        p = tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return setup


def both(*setups):
    def setup(tmp: Path, shared: dict) -> None:
        for s in setups:
            s(tmp, shared)
    return setup


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ck(meta=None, tensors=None, remove=(), reseal: bool = True):
    """A copy of the checkpoint at ``{tmp}/ck``: ``meta(m)`` edits lowbit.json (a dict), ``tensors(t)`` edits the
    safetensors dict (then ``weights_sha256`` is recomputed when ``reseal``, so the structural checks are reached),
    ``remove`` deletes files."""
    def setup(tmp: Path, shared: dict) -> None:
        from safetensors.torch import load_file, save_file

        dst = tmp / "ck"
        shutil.copytree(shared["ck"], dst)
        m = json.loads((dst / "lowbit.json").read_text())
        if tensors is not None:
            t = load_file(str(dst / "model.safetensors"))
            tensors(t)
            save_file(t, str(dst / "model.safetensors"))
            if reseal:
                m["weights_sha256"] = _sha256(dst / "model.safetensors")
        if meta is not None:
            meta(m)
        (dst / "lowbit.json").write_text(json.dumps(m))
        for f in remove:
            (dst / f).unlink()
    return setup


def ck_raw(name: str, transform: Callable[[bytes], bytes]):
    """A copy of the checkpoint at ``{tmp}/ck`` with the bytes of file ``name`` replaced by ``transform(bytes)``."""
    def setup(tmp: Path, shared: dict) -> None:
        dst = tmp / "ck"
        shutil.copytree(shared["ck"], dst)
        (dst / name).write_bytes(transform((dst / name).read_bytes()))
    return setup


def fp(tensors=None, config=None, remove=()):
    """A copy of the float model at ``{tmp}/fp``: ``tensors(t)`` edits its safetensors, ``config(c)`` its config.json."""
    def setup(tmp: Path, shared: dict) -> None:
        from safetensors.torch import load_file, save_file

        dst = tmp / "fp"
        shutil.copytree(shared["fp"], dst)
        if tensors is not None:
            t = load_file(str(dst / "model.safetensors"))
            tensors(t)
            save_file(t, str(dst / "model.safetensors"), metadata={"format": "pt"})
        if config is not None:
            c = json.loads((dst / "config.json").read_text())
            config(c)
            (dst / "config.json").write_text(json.dumps(c))
        for f in remove:
            (dst / f).unlink()
    return setup


def _set(key, value):
    def edit(d):
        d[key] = value
    return edit


def _layer(name, key, value):
    def edit(m):
        m["layers"][name][key] = value
    return edit


def _nan_scales(t):
    import torch

    t["model.layers.0.mlp.down_proj.scales"] = torch.full_like(t["model.layers.0.mlp.down_proj.scales"], float("nan"))


def _pickle_weights(tmp: Path, shared: dict) -> None:
    """A float model whose weights are a pickle that runs code when unpickled (``os.system``)."""
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp}/pwned",))

    dst = tmp / "fp"
    shutil.copytree(shared["fp"], dst)
    (dst / "model.safetensors").unlink()
    (dst / "pytorch_model.bin").write_bytes(pickle.dumps({"x": Evil()}))


def _flip_data(b: bytes) -> bytes:
    data = bytearray(b)
    data[8 + int.from_bytes(b[:8], "little") + 100] ^= 0x10
    return bytes(data)


Q = "--quiet"
RTN = "--method rtn --quiet"
UP = "model.layers.0.mlp.up_proj"
NESTED = '{"format": "lowbit", "format_version": 1, "layers": ' + "[" * 200_000 + "]" * 200_000 + "}"

CASES = [
    # --- 1. never run on weights that were not in the files ------------------------------------------------------
    C("eval-lowbit-json-removed", "eval {tmp}/ck --text {text} --seqlen 32 --max-tokens 64 " + Q, "lowbit.json",
      ck(remove=("lowbit.json",))),
    C("generate-lowbit-json-removed", "generate {tmp}/ck --prompt hi --max-new-tokens 2", "lowbit.json",
      ck(remove=("lowbit.json",))),
    C("quantize-fp-tensor-deleted", "quantize {tmp}/fp " + RTN, f"{UP}.weight", fp(tensors=lambda t: t.pop(f"{UP}.weight"))),
    C("eval-fp-tensor-deleted", "eval {tmp}/fp --text {text} --seqlen 32 --max-tokens 64 " + Q, "model.norm.weight",
      fp(tensors=lambda t: t.pop("model.norm.weight"))),
    C("generate-fp-tensor-deleted", "generate {tmp}/fp --prompt hi --max-new-tokens 2", f"{UP}.weight",
      fp(tensors=lambda t: t.pop(f"{UP}.weight"))),
    C("quantize-offload-fp-tensor-deleted", "quantize {tmp}/fp --offload disk --nsamples 2 --seqlen 32 --calib {text} "
      + Q, f"{UP}.weight", fp(tensors=lambda t: t.pop(f"{UP}.weight"))),
    # --- 2. no tracebacks --------------------------------------------------------------------------------------------
    C("quantize-device-tpu", "quantize {fp} --device tpu --calib {text} --nsamples 2 --seqlen 32 " + Q, "--device"),
    C("quantize-rtn-device-tpu", "quantize {fp} --device tpu " + RTN + " --out {tmp}/q", "--device"),
    C("quantize-device-cuda-absent", "quantize {fp} --device cuda " + RTN, "--device"),
    C("eval-device-tpu", "eval {ck} --device tpu --text {text} " + Q, "--device"),
    C("eval-batch-size-negative", "eval {ck} --batch-size -1 --text {text} --seqlen 32 " + Q, "--batch-size"),
    C("info-nested-json", "info {tmp}/ck", "lowbit.json", ck_raw("lowbit.json", lambda b: NESTED.encode())),
    C("generate-nested-json", "generate {tmp}/ck --prompt hi --max-new-tokens 2", "lowbit.json",
      ck_raw("lowbit.json", lambda b: NESTED.encode())),
    C("info-layers-entry-not-object", "info {tmp}/ck --layers", UP, ck(meta=lambda m: m["layers"].update({UP: 3}))),
    # --- 3. strict JSON: no non-finite float flags, no NaN metric ----------------------------------------------------
    C("generate-temperature-nan", "generate {ck} --prompt hi --temperature nan", "--temperature"),
    C("report-tolerance-nan", "report {ck} --out {tmp}/r --tolerance nan", "--tolerance"),
    C("quantize-damp-inf", "quantize {fp} --damp inf " + Q, "--damp"),
    C("quantize-beta-nan", "quantize {fp} --method foem --beta nan " + Q, "--beta"),
    C("quantize-outlier-frac-inf", "quantize {fp} --method gwq --outlier-frac -inf " + Q, "--outlier-frac"),
    C("quantize-binary-frac-nan", "quantize {fp} --method squeeze --binary-frac NaN " + Q, "--binary-frac"),
    C("quantize-ft-lr-nan", "quantize {fp} --method quip --finetune --ft-lr nan " + Q, "--ft-lr"),
    C("quantize-lr-inf", "quantize {fp} --method dlqat --lr infinity " + Q, "--lr"),
    C("quantize-damp-not-a-number", "quantize {fp} --damp lots " + Q, "--damp"),
    C("quantize-option-of-another-method", "quantize {fp} --method gptq --beta 0.3 " + Q, "--beta applies only"),
    C("quantize-gguf-type-unknown", "quantize {fp} --gguf-type Q7_K_M " + RTN, "--gguf-type Q7_K_M"),
    C("quantize-gguf-refit-negative", "quantize {fp} --gguf-type Q4_0 --gguf-refit -1 " + Q, "--gguf-refit -1"),
    C("quantize-gguf-refit-with-rtn", "quantize {fp} --gguf-type Q4_0 --gguf-refit 1 " + RTN, "--gguf-refit re-fits"),
    C("eval-nan-ppl", "eval {tmp}/ck --text {text} --seqlen 32 --max-tokens 64 --json {tmp}/e.json " + Q, "{tmp}/ck",
      ck(tensors=_nan_scales)),
    # --- 4. outputs checked before the work, nothing left behind -----------------------------------------------------
    C("quantize-json-under-a-file", "quantize {fp} " + RTN + " --out {tmp}/q --json {tmp}/f.txt/q.json", "--json",
      write("f.txt", "a file")),
    C("quantize-json-is-a-folder", "quantize {fp} " + RTN + " --out {tmp}/q --json {tmp}/d", "--json", write("d/x", "x")),
    C("quantize-out-under-a-file", "quantize {fp} " + RTN + " --out {tmp}/f.txt/q", "--out", write("f.txt", "a file")),
    C("quantize-out-deep-new-model-missing", "quantize {tmp}/nope " + RTN + " --out {tmp}/a/b/q --json {tmp}/c/q.json",
      "nope"),
    C("eval-json-is-the-checkpoint", "eval {tmp}/ck --text {text} --seqlen 32 --max-tokens 64 --json {tmp}/ck " + Q,
      "--json", ck()),
    C("eval-json-under-a-file", "eval {ck} --text {text} --seqlen 32 --max-tokens 64 --json {tmp}/f.txt/e.json " + Q,
      "--json", write("f.txt", "a file")),
    C("bench-json-under-a-file", "bench {ck} --json {tmp}/f.txt/b.json --no-fp " + Q, "--json", write("f.txt", "x")),
    C("report-out-under-a-file", "report {ck} --out {tmp}/f.txt/r", "--out", write("f.txt", "a file")),
    C("export-out-under-a-file", "export {ck} --format gguf --out {tmp}/f.txt/m.gguf " + Q, "--out", write("f.txt", "x")),
    C("export-gptq-out-under-a-file", "export {ck} --format gptq --out {tmp}/f.txt/g " + Q, "--out", write("f.txt", "x")),
    # --- 5. never overwrite what is not ours ------------------------------------------------------------------------
    C("export-gguf-over-a-file", "export {ck} --format gguf --out {tmp}/notes.txt " + Q, "notes.txt",
      write("notes.txt", "my notes")),
    C("export-gptq-over-a-folder", "export {ck} --format gptq --out {tmp}/mine " + Q, "mine", write("mine/a.txt", "x")),
    C("quantize-json-over-a-file", "quantize {fp} " + RTN + " --out {tmp}/q --json {tmp}/notes.txt", "notes.txt",
      write("notes.txt", "my notes")),
    C("eval-json-over-a-file", "eval {ck} --text {text} --seqlen 32 --max-tokens 64 --json {tmp}/notes.txt " + Q,
      "notes.txt", write("notes.txt", "my notes")),
    C("bench-json-over-a-file", "bench {ck} --json {tmp}/notes.txt --no-fp " + Q, "notes.txt", write("notes.txt", "x")),
    C("quantize-out-foreign-folder", "quantize {fp} " + RTN + " --out {tmp}/precious", "precious",
      write("precious/data.txt", "keep me")),
    C("quantize-out-over-a-file", "quantize {fp} " + RTN + " --out {tmp}/notes.txt", "notes.txt", write("notes.txt", "x")),
    C("report-out-foreign-folder", "report {ck} --out {tmp}/precious", "precious", write("precious/data.txt", "x")),
    C("report-out-over-a-file", "report {ck} --out {tmp}/notes.txt", "notes.txt", write("notes.txt", "x")),
    # --- 6. the smaller ones ----------------------------------------------------------------------------------------
    C("eval-format-version-true", "eval {tmp}/ck --text {text} " + Q, "format version", ck(meta=_set("format_version", True))),
    C("info-format-version-true", "info {tmp}/ck", "format version", ck(meta=_set("format_version", True))),
    C("info-truncated-weights", "info {tmp}/ck", "model.safetensors", ck_raw("model.safetensors", lambda b: b[:len(b) // 2])),
    C("quantize-rtn-with-calib", "quantize {fp} --method rtn --calib {text} " + Q, "--calib"),
    C("quantize-nsamples-beyond-text", "quantize {fp} --calib {text} --nsamples 100000 --seqlen 64 " + Q, "--nsamples"),
    C("quantize-pickle-weights", "quantize {tmp}/fp " + RTN, "pytorch_model.bin", _pickle_weights,
      forbid=("weights_only=False", "pwned")),
    C("quantize-missing-tokenizer", "quantize {tmp}/fp " + RTN, "tokenizer",
      fp(remove=("tokenizer.json", "tokenizer_config.json")), forbid=("one of: \n", "one of: ,", "one of: ;")),
    C("eval-limit-negative", "eval {ck} --tasks cloze --no-ppl --limit -1 --text {text} " + Q, "--limit",
      forbid=("--cloze-passages",)),
    C("quantize-auto-map-without-trust", "quantize {tmp}/fp " + RTN, "--trust-remote-code",
      fp(config=lambda c: c.update(model_type="lowbit-custom", auto_map={"AutoConfig": "conf.MyConfig",
                                                                        "AutoModelForCausalLM": "mod.MyModel"}))),
    # --- what the README promises -------------------------------------------------------------------------------
    C("quantize-missing-model", "quantize {tmp}/nope --out {tmp}/o " + Q, "nope"),
    C("eval-missing-model", "eval {tmp}/nope " + Q, "nope"),
    C("info-missing-folder", "info {tmp}/nope", "nope"),
    C("quantize-folder-without-config", "quantize {tmp}/m " + RTN, "config.json", write("m/readme.txt", "x")),
    C("quantize-not-a-gguf", "quantize {tmp}/model.bin " + RTN, "model.bin", write("model.bin", b"\0" * 10)),
    C("quantize-truncated-gguf", "quantize {tmp}/bad.gguf " + RTN, "bad.gguf", write("bad.gguf", b"GGUF\3\0\0\0" + b"\0" * 5)),
    C("quantize-bits-1", "quantize {fp} --bits 1 " + RTN, "--bits"),
    C("quantize-bits-not-int", "quantize {fp} --bits four " + RTN, "--bits"),
    C("quantize-group-size-0", "quantize {fp} --group-size 0 " + RTN, "--group-size"),
    C("quantize-unknown-method", "quantize {fp} --method magic " + Q, "--method"),
    C("quantize-unknown-flag", "quantize {fp} --frobnicate " + Q, "--frobnicate"),
    C("no-subcommand", "", "command"),
    C("unknown-subcommand", "transmogrify {fp}", "transmogrify"),
    C("quantize-calib-shorter-than-window", "quantize {fp} --calib {tmp}/short.txt --seqlen 64 --nsamples 2 " + Q,
      "--seqlen 64", write("short.txt", "the king")),
    C("quantize-calib-empty", "quantize {fp} --calib {tmp}/empty.txt --nsamples 2 --seqlen 32 " + Q, "empty.txt",
      write("empty.txt", "  \n")),
    C("quantize-calib-missing", "quantize {fp} --calib {tmp}/none.txt --nsamples 2 --seqlen 32 " + Q, "none.txt"),
    C("quantize-nsamples-0", "quantize {fp} --nsamples 0 --calib {text} " + Q, "--nsamples"),
    C("quantize-offload-bogus", "quantize {fp} --offload tape " + RTN, "--offload"),
    C("quantize-calib-dtype-bogus", "quantize {fp} --calib-dtype float7 --calib {text} --nsamples 2 --seqlen 32 " + Q,
      "--calib-dtype"),
    C("quantize-offload-dlqat", "quantize {fp} --method dlqat --offload disk " + Q, "--offload"),
    C("quantize-resume-without-out", "quantize {fp} --resume --calib {text} --nsamples 2 --seqlen 32 " + Q, "--resume"),
    C("quantize-resume-rtn", "quantize {fp} --resume " + RTN + " --out {tmp}/q", "--resume"),
    C("quantize-dlqat-flag-with-gptq", "quantize {fp} --steps 5 --calib {text} " + Q, "--steps"),
    C("quantize-nan-weights", "quantize {tmp}/fp " + RTN, "NaN/Inf",
      fp(tensors=lambda t: t[f"{UP}.weight"].__setitem__((0, 0), float("nan")))),
    C("quantize-unknown-architecture", "quantize {tmp}/m " + RTN, "not-a-model",
      write("m/config.json", '{"model_type": "not-a-model"}')),
    C("eval-text-shorter-than-window", "eval {ck} --text {tmp}/short.txt --seqlen 64 " + Q, "fewer than one window",
      write("short.txt", "the king and the queen")),
    C("eval-text-missing", "eval {ck} --text {tmp}/none.txt --seqlen 32 " + Q, "none.txt"),
    C("eval-no-ppl-nothing-left", "eval {ck} --no-ppl " + Q, "--no-ppl"),
    C("info-missing-lowbit-json", "info {tmp}/ck", "lowbit.json", ck(remove=("lowbit.json",))),
    C("eval-wrong-format-version", "eval {tmp}/ck " + Q, "99", ck(meta=_set("format_version", 99))),
    C("eval-format-version-string", "eval {tmp}/ck " + Q, "'1'", ck(meta=_set("format_version", "1"))),
    C("info-bad-json", "info {tmp}/ck", "not valid JSON", ck_raw("lowbit.json", lambda b: b"{not json")),
    C("eval-truncated-weights", "eval {tmp}/ck " + Q, "model.safetensors",
      ck_raw("model.safetensors", lambda b: b[:len(b) // 2])),
    C("eval-weights-missing", "eval {tmp}/ck " + Q, "model.safetensors", ck(remove=("model.safetensors",))),
    C("eval-bit-flipped-weights", "eval {tmp}/ck " + Q, "corrupt", ck_raw("model.safetensors", _flip_data)),
    C("eval-missing-packed-tensor", "eval {tmp}/ck " + Q, "scales",
      ck(tensors=lambda t: t.pop("model.layers.0.self_attn.q_proj.scales"))),
    C("eval-wrong-packed-shape", "eval {tmp}/ck " + Q, "qweight",
      ck(tensors=lambda t: t.update({f"{UP}.qweight": t[f"{UP}.qweight"][:, :-1].contiguous()}))),
    C("eval-missing-norm", "eval {tmp}/ck " + Q, "model.norm.weight", ck(tensors=lambda t: t.pop("model.norm.weight"))),
    C("eval-unknown-packed-kind", "eval {tmp}/ck " + Q, "unknown packed format", ck(meta=_layer(UP, "kind", "float8"))),
    C("eval-layer-not-in-model", "eval {tmp}/ck " + Q, "nope",
      ck(meta=lambda m: m["layers"].update({"model.layers.0.nope": m["layers"][UP]}))),
    C("eval-layers-missing", "eval {tmp}/ck " + Q, "layers", ck(meta=lambda m: m.pop("layers"))),
    C("export-gguf-checkpoint-format", "export {ck} --format gguf --checkpoint-format gptq --out {tmp}/m.gguf " + Q,
      "--checkpoint-format"),
    C("export-gptq-requantize", "export {ck} --format gptq --requantize Q4_0 --out {tmp}/g " + Q, "--requantize"),
    C("export-not-a-checkpoint", "export {fp} --format gguf --out {tmp}/m.gguf " + Q, "lowbit.json"),
    C("report-eval-fp-without-fp", "report {ck} --eval-fp --out {tmp}/r", "--eval-fp"),
    C("report-bench-unknown-dir", "report {ck} --bench {tmp}/x=b.json --bench {tmp}/y=c.json --out {tmp}/r", "--bench"),
    C("report-not-a-checkpoint", "report {fp} --out {tmp}/r", "lowbit.json"),
    C("generate-max-new-tokens-not-int", "generate {ck} --prompt hi --max-new-tokens many", "--max-new-tokens"),
    C("bench-not-a-checkpoint", "bench {tmp}/nope --no-fp " + Q, "nope"),
]


# ---- running ------------------------------------------------------------------------------------------------------

def snapshot(root: Path) -> dict[str, str]:
    """``{relative path: sha256 | 'dir' | 'link'}`` of everything under ``root``."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "link" if p.is_symlink() else "dir" if p.is_dir() else _sha256(p)
    return out


def fill(template: str, shared: dict, tmp: Path) -> str:
    return template.format(fp=shared["fp"], ck=shared["ck"], text=shared["text"], tmp=tmp)


def prepare(case: C, shared: dict) -> Path:
    """The case's folder with its inputs (all cases are prepared before any runs: a running case may briefly
    probe a shared folder, which a concurrent copy must not see)."""
    tmp = shared["root"] / "cases" / case.id
    tmp.mkdir(parents=True)
    if case.setup is not None:
        case.setup(tmp, shared)
    return tmp


def run_case(case: C, shared: dict) -> dict:
    tmp = shared["root"] / "cases" / case.id
    before = snapshot(tmp)
    argv = fill(case.argv, shared, tmp).split()
    t0 = time.perf_counter()
    try:
        r = subprocess.run([sys.executable, "-m", "lowbit", *argv], capture_output=True, text=True, timeout=TIMEOUT_S,
                           cwd=tmp, env=shared["env"])
        rc, err = r.returncode, r.stderr
    except subprocess.TimeoutExpired as e:  # a case that runs on instead of refusing
        rc, err = None, f"still running after {TIMEOUT_S} s\n{e.stderr or ''}"
    return {"rc": rc, "stderr": err, "before": before, "after": snapshot(tmp), "tmp": tmp,
            "seconds": time.perf_counter() - t0}


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The tiny float model, its RTN checkpoint and a text, built once; the subprocesses' environment."""
    import lowbit

    root = tmp_path_factory.mktemp("contract")
    text = root / "shared" / "text.txt"
    text.parent.mkdir()
    text.write_text(make_text(3000))
    fp_dir = build_tiny_model("llama", root / "shared" / "fp", text.read_text())
    ck_dir = root / "shared" / "ck"
    lowbit.quantize(str(fp_dir), method="rtn", bits=4, group_size=32, out=ck_dir, progress=False)
    env = {**os.environ, "LOWBIT_CACHE": str(private_lowbit_cache(root / "cache")), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    shared = {"root": root, "fp": fp_dir, "ck": ck_dir, "text": text, "env": env}
    shared["sources"] = {k: snapshot(shared[k]) for k in ("fp", "ck")} | {"text": _sha256(text)}
    return shared


@pytest.fixture(scope="module")
def results(request, shared):
    """Every selected case, run concurrently once -> ``{id: result}``."""
    wanted = {item.callspec.params["case"].id for item in request.session.items
              if item.module is request.module and hasattr(item, "callspec") and "case" in item.callspec.params}
    cases = [c for c in CASES if c.id in wanted]
    for c in cases:
        prepare(c, shared)
    with ThreadPoolExecutor(WORKERS) as pool:
        done = dict(zip((c.id for c in cases), pool.map(lambda c: run_case(c, shared), cases)))
    return done


def test_case_ids_are_unique_and_enough():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 60


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_contract(case, results, shared):
    r = results[case.id]
    err = r["stderr"]
    lines = [l for l in err.replace("\r", "\n").splitlines() if l.strip() and not PROGRESS.match(l)]
    assert r["rc"] == 2, f"exit status {r['rc']} after {r['seconds']:.0f} s:\n{err}"
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("lowbit: error: "), err
    needle = fill(case.needle, shared, r["tmp"])
    assert needle in lines[0], (needle, lines[0])
    for bad in case.forbid:
        assert bad not in err + "\n", (bad, err)
    new = sorted(set(r["after"]) - set(r["before"]))
    gone = sorted(set(r["before"]) - set(r["after"]))
    changed = sorted(k for k in set(r["before"]) & set(r["after"]) if r["before"][k] != r["after"][k])
    assert not new and not gone and not changed, f"left behind {new}, removed {gone}, changed {changed}"


def test_shared_sources_unchanged(results, shared):
    """No case wrote into (or next to) the shared model, checkpoint or text."""
    assert {k: snapshot(shared[k]) for k in ("fp", "ck")} | {"text": _sha256(shared["text"])} == shared["sources"]
    assert sorted(p.name for p in shared["root"].joinpath("shared").iterdir()) == ["ck", "fp", "text.txt"]


def test_parser_and_argument_errors_do_not_import_torch():
    """``lowbit --help`` and a bad flag answer before torch is imported (the contract cases start fast)."""
    code = ("import sys\nfrom lowbit.cli import build_parser\np = build_parser()\n"
            "try:\n    p.parse_args(['generate', 'x', '--prompt', 'p', '--temperature', 'nan'])\n"
            "except SystemExit as e:\n    assert e.code == 2\nprint('torch' in sys.modules, 'transformers' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "False"]


# ---- the other side of the contract: what lowbit writes is strict JSON, and --force does replace -------------------

def _strict_json(path: Path):
    def refuse(name):
        raise AssertionError(f"{path}: non-standard JSON constant {name}")
    return json.loads(path.read_text(), parse_constant=refuse)


def _cli(shared: dict, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lowbit", *map(str, args)], capture_output=True, text=True,
                          timeout=TIMEOUT_S, cwd=cwd, env=shared["env"])


def test_every_json_written_is_strict(shared, tmp_path, capsys):
    """RTN has no proxy loss: ``null`` in quantize --json and lowbit.json (it was ``NaN``); eval --json, evals.json
    and info --json parse strictly too."""
    from lowbit.cli import main

    q, qj, ej = tmp_path / "q", tmp_path / "q.json", tmp_path / "e.json"
    r = _cli(shared, tmp_path, "quantize", shared["fp"], "--method", "rtn", "--group-size", "32", "--out", q,
             "--json", qj, "--quiet")
    assert r.returncode == 0, r.stderr
    report, meta = _strict_json(qj), _strict_json(q / "lowbit.json")
    assert all(v["loss"] is None for v in report["layers"].values()) and report["layers"]
    assert all(v["loss"] is None for v in meta["layers"].values())
    r = _cli(shared, tmp_path, "eval", q, "--text", shared["text"], "--seqlen", "32", "--max-tokens", "64",
             "--json", ej, "--quiet")
    assert r.returncode == 0, r.stderr
    assert _strict_json(ej)["ppl"] > 1 and _strict_json(q / "evals.json")[-1]["metrics"]["ppl"] > 1
    assert main(["info", str(q), "--json", "--layers"]) == 0
    assert json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(c))["method"] == "rtn"


def test_force_replaces_an_existing_output(shared, tmp_path):
    """With --force the refused cases go through: the file is replaced whole, no temporary is left."""
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    r = _cli(shared, tmp_path, "export", shared["ck"], "--format", "gguf", "--out", notes, "--force", "--quiet")
    assert r.returncode == 0, r.stderr
    assert notes.read_bytes()[:4] == b"GGUF" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
