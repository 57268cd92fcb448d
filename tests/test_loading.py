"""Nothing runs on weights that were not read from the files, and loading never ends in a traceback (issue 14,
items 1, 2 and 6): missing tensors in every load path (float folder, GGUF, lowbit folder, ``--offload disk``),
a lowbit folder without ``lowbit.json``, pickles, ``--device``, integer flags, hostile ``lowbit.json`` files,
``--trust-remote-code`` with a model folder that brings its own code."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lowbit
from lowbit import api
from lowbit.devices import check_device
from lowbit.errors import LowbitError
from lowbit.models import offload as offload_mod
from lowbit.models.arch import resolve_spec
from lowbit.models.sources import check_loaded, load_model, stored_names
from lowbit.packed.checkpoint import packed_leftover

REPO = Path(__file__).resolve().parents[1]
PROGRESS = ("Loading", "Writing", "Converting")  # tqdm bars of transformers / gguf
TORCH_LOG = re.compile(r"^[WI]\d{4} \d")  # torch's own log lines (a deprecation note some imports print)


def lowbit_cli(*args, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``python -m lowbit ARGS`` in a fresh process, as a user runs it."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "lowbit", *map(str, args)], capture_output=True, text=True,
                          env=full_env, cwd=cwd, timeout=300)


def lowbit_cli_all(argvs: list[list], workers: int = 2) -> list[subprocess.CompletedProcess]:
    """:func:`lowbit_cli` for each argv, a few at a time (each is a fresh Python importing torch)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda argv: lowbit_cli(*argv), argvs))


def error_line(r: subprocess.CompletedProcess, *needles: str, forbid: tuple[str, ...] = ()) -> str:
    """The contract: exit 2, exactly one stderr line ``lowbit: error: …`` holding every needle, no traceback."""
    lines = [l for l in r.stderr.replace("\r", "\n").splitlines()
             if l.strip() and not l.lstrip().startswith(PROGRESS) and not TORCH_LOG.match(l)]
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and lines[0].startswith("lowbit: error: "), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    for n in forbid:
        assert n not in lines[0], (n, lines[0])
    return lines[0]


def copy_model(src: Path, dst: Path, drop: str | None = None) -> Path:
    """A copy of a float model folder, optionally with tensor ``drop`` removed from its safetensors."""
    shutil.copytree(src, dst)
    if drop is not None:
        tensors = load_file(dst / "model.safetensors")
        del tensors[drop]
        save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def ckpt(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("load") / "q"
    lowbit.quantize(str(tiny_models["llama"]), method="rtn", bits=4, group_size=32, out=out, progress=False)
    return out


# ---- 1. every load path checks that every tensor came from the files -----------------------------------------

@pytest.mark.e2e
def test_missing_tensor_in_a_float_folder_is_refused_in_every_path(tiny_models, tmp_path):
    name = "model.layers.1.mlp.down_proj.weight"
    src = copy_model(tiny_models["llama"], tmp_path / "m", drop=name)
    weights = str(src / "model.safetensors")
    with pytest.raises(LowbitError) as e:
        load_model(str(src))
    assert name in str(e.value) and weights in str(e.value) and "\n" not in str(e.value)
    materialized = []
    orig = offload_mod.DiskOffload.materialize
    try:  # offloaded: found before the first block is read, not when the runner reaches block 1
        offload_mod.DiskOffload.materialize = lambda self, i: (materialized.append(i), orig(self, i))
        with pytest.raises(LowbitError) as e:
            offload_mod.load_offloaded(str(src), lambda m: resolve_spec(m).blocks)
    finally:
        offload_mod.DiskOffload.materialize = orig
    assert name in str(e.value) and weights in str(e.value) and not materialized
    for off in ("none", "disk"):  # and through the CLI, with nothing written
        r = lowbit_cli("quantize", src, "--method", "rtn", "--offload", off, "--out", tmp_path / "q", "--quiet")
        error_line(r, name, weights, "missing")
        assert not (tmp_path / "q").exists()


def test_complete_models_load_with_tied_heads_and_computed_buffers(tiny_models):
    """The check refuses nothing legitimate: a tied head is stored once, rotary ``inv_freq`` is computed."""
    model, _, _ = load_model(str(tiny_models["llama"]))
    names = stored_names(model)
    assert model.config.tie_word_embeddings and "lm_head.weight" not in names
    assert "model.embed_tokens.weight" in names
    assert not any("inv_freq" in n for n in names)
    assert set(names) == set(load_file(tiny_models["llama"] / "model.safetensors"))
    untied, _, _ = load_model(str(tiny_models["qwen2"]))
    assert set(stored_names(untied)) == set(load_file(tiny_models["qwen2"] / "model.safetensors"))


def test_check_loaded_names_the_first_missing_tensor_in_model_order(tiny_models):
    model, _, _ = load_model(str(tiny_models["llama"]))
    check_loaded(model, {"missing_keys": set(), "mismatched_keys": set()}, "f.safetensors")  # nothing missing
    with pytest.raises(LowbitError, match=r"^f\.safetensors: tensor 'model\.layers\.0\.mlp\.up_proj\.weight' is "
                                          r"missing \(2 of"):
        check_loaded(model, {"missing_keys": {"model.norm.weight", "model.layers.0.mlp.up_proj.weight"}}, "f.safetensors")
    with pytest.raises(LowbitError, match=r"tensor 'model\.norm\.weight' has shape \(3,\), the model expects \(64,\)"):
        check_loaded(model, {"mismatched_keys": {("model.norm.weight", torch.Size([3]), torch.Size([64]))}}, "f")


@pytest.mark.e2e
def test_gguf_with_a_missing_tensor_is_refused_and_not_cached(ckpt, tmp_path):
    gguf_file = tmp_path / "m.gguf"
    assert lowbit_cli("export", ckpt, "--format", "gguf", "--out", gguf_file, "--quiet").returncode == 0
    data = bytearray(gguf_file.read_bytes())  # rename one tensor (same length): the model's down_proj is absent
    i = data.index(b"blk.1.ffn_down.weight")
    data[i:i + len(b"blk.1.ffn_down.weight")] = b"blk.1.ffn_dowX.weight"
    bad = tmp_path / "miss.gguf"
    bad.write_bytes(bytes(data))
    cache = tmp_path / "cache"
    r = lowbit_cli("quantize", bad, "--method", "rtn", "--out", tmp_path / "q", "--quiet", env={"LOWBIT_CACHE": str(cache)})
    error_line(r, "model.layers.1.mlp.down_proj.weight", str(bad), "missing")
    assert not (tmp_path / "q").exists() and not list(cache.rglob("config.json"))


@pytest.mark.e2e
def test_lowbit_folder_without_lowbit_json_is_a_broken_checkpoint(ckpt, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    (broken / "lowbit.json").unlink()
    assert packed_leftover(load_file(broken / "model.safetensors")) is not None
    for r in lowbit_cli_all([["eval", broken, "--seqlen", "32", "--max-tokens", "64", "--quiet"],
                             ["generate", broken, "--prompt", "the king", "--max-new-tokens", "2"],
                             ["quantize", broken, "--method", "rtn", "--out", tmp_path / "q", "--quiet"]]):
        error_line(r, str(broken), "broken lowbit checkpoint", "lowbit.json")
        assert "ppl" not in r.stdout and not (tmp_path / "q").exists()
    assert not (broken / "evals.json").exists()


def test_packed_leftover_needs_packed_tensors_in_place_of_a_weight():
    assert packed_leftover(["a.weight", "a.scales", "b.mask"]) is None  # float names that happen to match
    assert packed_leftover(["l.qweight", "l.scales", "l.bias", "norm.weight"]) == "l.qweight"
    assert packed_leftover(["x.p1", "x.qsign"]) == "x.p1"


@pytest.mark.parametrize("drop", ["model.norm.weight", "model.layers.0.self_attn.q_proj.bias"])
def test_lowbit_checkpoint_with_a_missing_tensor_is_refused(drop, tiny_models, tmp_path):
    """Also a float tensor outside the packed layers, and a packed layer's bias (Qwen2 has q/k/v biases)."""
    out = tmp_path / "q"
    lowbit.quantize(str(tiny_models["qwen2"]), method="rtn", bits=4, group_size=32, out=out, progress=False)
    tensors = load_file(out / "model.safetensors")
    del tensors[drop]
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LowbitError, match=f"model.safetensors: missing tensor '{drop}'"):
        lowbit.load(out, device="cpu")


# ---- pickles and tokenizers ------------------------------------------------------------------------------------

class _Payload:
    """Unpickling this runs ``open(marker, 'w')``: proof that a pickle was loaded."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.e2e
def test_pickle_weights_are_never_loaded(tiny_models, tmp_path):
    folder = tmp_path / "pk"
    folder.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_models["llama"] / f, folder / f)
    marker = tmp_path / "pwned"
    torch.save({"x": _Payload(str(marker))}, folder / "pytorch_model.bin")
    for r in lowbit_cli_all([["quantize", folder, "--method", "rtn", "--offload", "disk", "--out", tmp_path / "q"],
                             ["eval", folder, "--quiet"]]):
        error_line(r, str(folder), "pytorch_model.bin", "pickle", forbid=("weights_only",))
    assert not marker.exists() and not (tmp_path / "q").exists()


@pytest.mark.e2e
def test_missing_tokenizer_names_what_is_missing(tiny_models, tmp_path):
    folder = tmp_path / "notok"
    folder.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_models["llama"] / f, folder / f)
    line = error_line(lowbit_cli("quantize", folder, "--method", "rtn", "--quiet"), str(folder), "tokenizer.json")
    assert "from one of: " not in line and not line.rstrip().endswith(":")


# ---- --trust-remote-code ---------------------------------------------------------------------------------------

CUSTOM_CONFIG = """from transformers import LlamaConfig


class XConfig(LlamaConfig):
    model_type = "x_llama"
"""
CUSTOM_MODEL = """from transformers import LlamaForCausalLM

from .configuration_x import XConfig


class XForCausalLM(LlamaForCausalLM):
    config_class = XConfig
"""


@pytest.mark.e2e
def test_trust_remote_code_loads_the_folders_own_code(tiny_models, tmp_path):
    src = copy_model(tiny_models["llama"], tmp_path / "custom")
    (src / "configuration_x.py").write_text(CUSTOM_CONFIG)
    (src / "modeling_x.py").write_text(CUSTOM_MODEL)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(model_type="x_llama", architectures=["XForCausalLM"],
               auto_map={"AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"})
    (src / "config.json").write_text(json.dumps(cfg))
    env = {"HF_MODULES_CACHE": str(tmp_path / "modules")}  # where transformers copies the folder's code
    r = lowbit_cli("quantize", src, "--method", "rtn", "--group-size", "32", "--out", tmp_path / "no", "--quiet", env=env)
    error_line(r, "config.json", "x_llama", "--trust-remote-code")
    assert not (tmp_path / "no").exists() and not (tmp_path / "modules").exists()  # and no code was run
    for off in ("none", "disk"):
        out = tmp_path / f"q-{off}"
        r = lowbit_cli("quantize", src, "--method", "rtn", "--group-size", "32", "--out", out, "--offload", off,
                       "--quiet", "--trust-remote-code", env=env)
        assert r.returncode == 0, r.stderr
        assert json.loads((out / "lowbit.json").read_text())["source"]["model_type"] == "x_llama"
    assert list((tmp_path / "modules").rglob("modeling_x.py"))  # the folder's own class was imported
    ref = lowbit.quantize(str(tiny_models["llama"]), method="rtn", bits=4, group_size=32, progress=False,
                          out=tmp_path / "ref")
    want = load_file(ref.out / "model.safetensors")
    for off in ("none", "disk"):  # the subclass computes what LLaMA does: the same weights, the same codes
        got = load_file(tmp_path / f"q-{off}" / "model.safetensors")
        assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


# ---- 2. no tracebacks ------------------------------------------------------------------------------------------

def test_check_device():
    assert check_device(None) == ("cuda" if torch.cuda.is_available() else "cpu")
    assert check_device("cpu") == "cpu"
    for bad in ("tpu", "cuda:banana", ""):
        with pytest.raises(LowbitError, match="--device .*unknown device"):
            check_device(bad)
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(LowbitError, match="--device cuda:99"):
        check_device("cuda:99")
    if count == 0:
        with pytest.raises(LowbitError, match="no CUDA device"):
            check_device("cuda")
    with pytest.raises(LowbitError, match="--device"):  # the API checks it too
        api.load_any("whatever", device="tpu")


@pytest.mark.e2e
def test_bad_devices_and_int_flags_through_the_cli(tiny_models, ckpt, tmp_path):
    fp = tiny_models["llama"]
    cases = [(["quantize", fp, "--method", "rtn", "--device", "tpu", "--out", tmp_path / "q"], ("--device", "tpu")),
             (["eval", ckpt, "--device", "tpu"], ("--device", "tpu")),
             (["eval", ckpt, "--batch-size", "-1"], ("--batch-size", "-1")),
             (["eval", ckpt, "--limit", "-1", "--tasks", "cloze"], ("--limit",)),
             (["eval", ckpt, "--cloze-context", "0", "--tasks", "cloze"], ("--cloze-context",)),
             (["generate", ckpt, "--prompt", "x", "--seed", str(2**64)], ("--seed",))]
    if not torch.cuda.is_available():
        cases.append((["quantize", fp, "--method", "rtn", "--device", "cuda"], ("--device cuda", "no CUDA device")))
    for r, (argv, needles) in zip(lowbit_cli_all([argv for argv, _ in cases]), cases):
        line = error_line(r, *needles)
        assert "--cloze-passages" not in line
    assert not (tmp_path / "q").exists()


def test_limit_is_named_by_the_api_too(tiny_models):
    from lowbit.eval.harness import run_tasks

    with pytest.raises(LowbitError, match=r"^--limit -1 must be >= 1$"):
        run_tasks(None, None, ["cloze"], limit=-1)


def _edit_meta(ckpt: Path, dst: Path, edit) -> Path:
    shutil.copytree(ckpt, dst)
    path = dst / "lowbit.json"
    if callable(edit):
        meta = json.loads(path.read_text())
        edit(meta)
        path.write_text(json.dumps(meta))
    else:
        path.write_text(edit)
    return dst


@pytest.mark.e2e
def test_hostile_lowbit_json(ckpt, tmp_path):
    def layer_not_object(m):
        m["layers"][next(iter(m["layers"]))] = ["not", "an", "object"]

    def version_true(m):
        m["format_version"] = True

    deep = ("lowbit.json", "nested too deeply")
    cases = [("info", "deep", "[" * 200_000, deep), ("generate", "deep", "[" * 200_000, deep),
             ("info", "layer", layer_not_object, ("lowbit.json", "model.layers.0", "not an object")),
             ("info", "version", version_true, ("lowbit.json", "format version True"))]
    argvs = []
    for command, name, edit, _ in cases:
        d = tmp_path / name
        if not d.exists():
            _edit_meta(ckpt, d, edit)
        argvs.append(["info", d, "--layers"] if command == "info" else ["generate", d, "--prompt", "hi"])
    for r, (*_, needles) in zip(lowbit_cli_all(argvs), cases):
        error_line(r, *needles)


@pytest.mark.e2e
def test_info_checks_the_weights_file(ckpt, tmp_path):
    d = tmp_path / "t"
    shutil.copytree(ckpt, d)
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])  # a copy cut short
    error_line(lowbit_cli("info", d), "model.safetensors", "truncated")
    r = lowbit_cli("info", ckpt)
    assert r.returncode == 0 and "lowbit format v1" in r.stdout


# ---- 6. calibration flags --------------------------------------------------------------------------------------

@pytest.mark.e2e
def test_calib_is_refused_with_rtn_and_nsamples_beyond_the_text(tiny_models, tiny_text, tmp_path):
    from lowbit.data import check_window_count

    fp = tiny_models["llama"]
    error_line(lowbit_cli("quantize", fp, "--method", "rtn", "--calib", tiny_text, "--out", tmp_path / "q"),
               "--calib", str(tiny_text), "--method rtn")
    from transformers import AutoTokenizer

    n = len(AutoTokenizer.from_pretrained(fp)(tiny_text.read_text(), add_special_tokens=False)["input_ids"])
    r = lowbit_cli("quantize", fp, "--calib", tiny_text, "--nsamples", "100000", "--seqlen", "64", "--out",
                   tmp_path / "q", "--quiet")
    error_line(r, "--nsamples 100000", f"holds {n // 64} window(s) of --seqlen 64", f"({n} tokens)")
    assert not (tmp_path / "q").exists()
    ids = torch.arange(100)
    check_window_count(ids, 10, 10)  # exactly the text
    with pytest.raises(LowbitError, match=r"--grad-samples 11: the calibration text holds 10 window"):
        check_window_count(ids, 11, 10, "--grad-samples")
