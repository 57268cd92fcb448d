"""End to end on tiny random models of every family: quantize → save → load → eval, via the API
and the CLI (console script and ``python -m lowbit``)."""
import json
import subprocess
import sys

import pytest
import torch

import lowbit
from lowbit.models.arch import resolve_spec
from lowbit.packed.qlinear import QuantLinear

from helpers import FAMILIES, artifact_files

CALIB = dict(nsamples=8, seqlen=64, seed=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_round_trip(family, tiny_models, tiny_text, tmp_path):
    res = lowbit.quantize(str(tiny_models[family]), method="gptq", bits=4, group_size=32, source=str(tiny_text),
                          out=tmp_path / "q", progress=False, **CALIB)
    n_linears = len(res.meta["layers"])
    spec = resolve_spec(res.model)
    per_block = sum(len(g) for g in spec.groups)
    assert per_block == (6 if family == "opt" else 7)
    assert n_linears == per_block * len(lowbit.api.blocks_of(res.model, spec))
    assert all(l["loss"] > 0 for l in res.meta["layers"].values())
    model, tok, meta = lowbit.load(tmp_path / "q", device="cpu")
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == n_linears
    saved = {n: m for n, m in res.model.named_modules() if isinstance(m, QuantLinear)}
    for name, mod in model.named_modules():  # packed tensors survive save/load bit for bit
        if isinstance(mod, QuantLinear):
            for key, t in mod.packed.tensors().items():
                assert torch.equal(t, saved[name].packed.tensors()[key]), (name, key)
    # the loaded model computes exactly what the in-memory quantized model computes
    ids = torch.tensor(tok(tiny_text.read_text()[:2000], add_special_tokens=False)["input_ids"][:64])[None]
    with torch.no_grad():
        a = res.model(input_ids=ids).logits
        b = model(input_ids=ids).logits
    assert torch.allclose(a, b, atol=2e-2, rtol=1e-2)  # non-quantized tensors are stored in fp16
    ev = lowbit.evaluate_ppl(model, tok, text=str(tiny_text), seqlen=64, max_tokens=1024)
    assert ev["tokens_scored"] == 16 * 63 and 1 < ev["ppl"] < 10 * len(tok)


def test_quantized_close_to_fp_and_gptq_beats_rtn(tiny_models, tiny_text, tmp_path):
    from lowbit.models.sources import load_model

    fp, tok, _ = load_model(str(tiny_models["llama"]))
    ids = torch.tensor(tok(tiny_text.read_text(), add_special_tokens=False)["input_ids"][:1024]).view(16, 64)
    with torch.no_grad():
        ref = fp(input_ids=ids).logits
    errs = {}
    for method in ("rtn", "gptq"):
        res = lowbit.quantize(str(tiny_models["llama"]), method=method, bits=3, group_size=32, source=str(tiny_text),
                              progress=False, **CALIB)
        with torch.no_grad():
            errs[method] = (res.model(input_ids=ids).logits - ref).pow(2).mean().item()
    assert errs["gptq"] < errs["rtn"]


def test_true_sequential_modes_agree_roughly(tiny_models, tiny_text):
    """One micro-batch (solve inside the pass) and several micro-batches (stopped passes) are the
    same algorithm: per-layer losses agree to rounding."""
    a = lowbit.quantize(str(tiny_models["qwen2"]), bits=4, group_size=32, source=str(tiny_text), batch_size=8,
                        dtype="float32", progress=False, **CALIB)
    b = lowbit.quantize(str(tiny_models["qwen2"]), bits=4, group_size=32, source=str(tiny_text), batch_size=3,
                        dtype="float32", progress=False, **CALIB)
    for name, la in a.meta["layers"].items():
        assert la["loss"] == pytest.approx(b.meta["layers"][name]["loss"], rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("method,extra", [("gptq", {}), ("squeeze", {}), ("quip", {"finetune": True, "ft_steps": 2}),
                                          ("gwq", {"grad_samples": 2})])
def test_quantize_leaves_global_rng_alone(method, extra, tiny_models, tiny_text, tmp_path):
    """lowbit draws only from private ``torch.Generator`` objects: the caller's RNG states (torch, Python,
    NumPy) are the same before and after a run (randomness: window offsets, QuIP#'s RHT signs, fine-tuning order)."""
    import random

    import numpy as np

    torch.manual_seed(1234)
    state, py, npy = torch.random.get_rng_state(), random.getstate(), np.random.get_state()
    lowbit.quantize(str(tiny_models["llama"]), method=method, bits=4 if method != "quip" else 2, group_size=32,
                    source=str(tiny_text), out=tmp_path / "q", progress=False, **CALIB, **extra)
    assert torch.equal(state, torch.random.get_rng_state())
    assert random.getstate() == py
    after = np.random.get_state()
    assert after[0] == npy[0] and np.array_equal(after[1], npy[1]) and after[2:] == npy[2:]


def _cli(*args, module=False):
    exe = [sys.executable, "-m", "lowbit"] if module else [sys.executable, "-c",
                                                            "import sys; from lowbit.cli import main; sys.exit(main())"]
    return subprocess.run(exe + list(args), capture_output=True, text=True, timeout=600)


@pytest.mark.e2e
def test_cli_quantize_eval_info(tiny_models, tiny_text, tmp_path):
    out, qj, ej = tmp_path / "m", tmp_path / "q.json", tmp_path / "e.json"
    r = _cli("quantize", str(tiny_models["mistral"]), "--method", "gptq", "--bits", "4", "--group-size", "32",
             "--sym", "--act-order", "--calib", str(tiny_text), "--nsamples", "8", "--seqlen", "64", "--seed", "0",
             "--out", str(out), "--json", str(qj), "--quiet", module=True)
    assert r.returncode == 0, r.stderr
    q = json.loads(qj.read_text())
    assert {"seconds", "bits_per_weight", "peak_rss_bytes", "layers"} <= set(q)
    assert q["bits_per_weight"] == pytest.approx(4 + 16 / 32, abs=0.01)  # sym: codes + fp16 scales
    assert all(v["loss"] > 0 for v in q["layers"].values())
    r = _cli("eval", str(out), "--text", str(tiny_text), "--seqlen", "64", "--max-tokens", "640", "--bos",
             "--json", str(ej), "--quiet")
    assert r.returncode == 0, r.stderr
    e = json.loads(ej.read_text())
    assert {"ppl", "tokens_scored", "seqlen", "bits_per_weight", "model_bytes", "seconds"} <= set(e)
    assert e["tokens_scored"] == 10 * 63 and e["seqlen"] == 64
    r = _cli("info", str(out))
    assert r.returncode == 0 and "gptq" in r.stdout and "bits/weight" in r.stdout
    meta = json.loads((out / "lowbit.json").read_text())
    assert meta["config"]["act_order"] and meta["config"]["sym"]
    assert meta["calibration"]["fingerprint"] and meta["source"]["kind"] == "folder"


@pytest.mark.e2e
def test_console_script_installed():
    import shutil

    exe = shutil.which("lowbit")
    assert exe, "the 'lowbit' console script is not installed"
    r = subprocess.run([exe, "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and lowbit.__version__ in r.stdout


@pytest.mark.e2e
def test_fp_model_eval_reports_16_bits(tiny_models, tiny_text, tmp_path):
    ej = tmp_path / "e.json"
    r = _cli("eval", str(tiny_models["opt"]), "--text", str(tiny_text), "--seqlen", "64", "--max-tokens", "256",
             "--json", str(ej), "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads(ej.read_text())["bits_per_weight"] == 16.0


def test_discovery_fallback_matches_the_spec(tiny_models, tiny_text):
    """An unknown family: blocks found as the longest ModuleList, linears grouped by shared input in
    call order — the same groups the LLaMA spec lists by hand."""
    from lowbit.calib.runner import capture, discover_groups
    from lowbit.models.arch import SPECS, blocks_of
    from lowbit.models.sources import load_model

    model, tok, _ = load_model(str(tiny_models["llama"]))
    model.config.model_type = "my-new-family"
    spec = resolve_spec(model)
    assert spec.blocks == "model.layers" and spec.groups is None
    ids = torch.tensor(tok(tiny_text.read_text(), add_special_tokens=False)["input_ids"][:128]).view(2, 64)
    blocks = blocks_of(model, spec)
    inputs, calls = capture(model, blocks, ids, 2, "cpu", torch.float32)
    assert discover_groups(blocks[0], inputs[0], calls[0][0]) == SPECS["llama"].groups


@pytest.mark.parametrize("method", ["gptq", "gwq", "squeeze", "quip"])
def test_same_inputs_give_identical_files(method, tiny_models, tiny_text, tmp_path):
    """Determinism: two runs with the same model, data, config and seed write byte-identical files."""
    extra = {"finetune": True, "ft_steps": 2} if method == "quip" else {"grad_samples": 2}
    kw = dict(method=method, bits=3, group_size=32, source=str(tiny_text), progress=False, **extra, **CALIB)
    for run in ("a", "b"):
        lowbit.quantize(str(tiny_models["llama"]), out=tmp_path / run, **kw)
    fa, fb = artifact_files(tmp_path / "a"), artifact_files(tmp_path / "b")  # lowbit.json but for the run record
    assert sorted(fa) == sorted(fb)
    for name in fa:
        assert fa[name] == fb[name], name


@pytest.mark.parametrize("method,extra", [("gptq", {}), ("quip", {"bits": 2, "finetune": True, "ft_steps": 1})])
def test_quantize_record_says_where_the_seconds_went(method, extra, tiny_models, tiny_text):
    kw = {"bits": 4, "group_size": 32, **extra}
    res = lowbit.quantize(str(tiny_models["llama"]), method=method, source=str(tiny_text), progress=False,
                          **CALIB, **kw)
    rec = res.meta["quantize"]
    phases = rec["phases"]
    assert set(phases) == {"load", "calibration_text", "solve", "finetune", "forward_and_stats"}
    # each phase is rounded to 1 ms (up to 0.5 ms each): a 60 ms run's phases may sum past 1 % of it
    assert all(v >= 0 for v in phases.values()) and sum(phases.values()) <= rec["seconds"] * 1.01 + 5e-4 * len(phases)
    assert phases["solve"] > 0 and (phases["finetune"] > 0) == ("finetune" in extra)
    json.dumps(res.meta, allow_nan=False)  # strict JSON
