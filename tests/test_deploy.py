"""`lowbit generate` and `lowbit bench` on a tiny quantized llama: tokens come out, the fast kernel
decodes exactly what the reference path decodes, the bench JSON keeps its contract, bad input is one line."""
import json

import pytest
import torch

import lowbit
from lowbit import kernels
from lowbit.cli import main
from lowbit.deploy.bench import bench
from lowbit.deploy.generate import build_inputs, generate, generate_ids, load_for_generation

BENCH_KEYS = ("decode_tokens_per_s", "fp_decode_tokens_per_s", "decode_speedup", "prefill_tokens_per_s",
              "weight_memory_ratio", "peak_rss_bytes")


@pytest.fixture(scope="module")
def ckpt(tiny_models, tmp_path_factory):
    out = tmp_path_factory.mktemp("deploy") / "w4"
    lowbit.quantize(str(tiny_models["llama"]), method="rtn", bits=4, group_size=32, out=out, progress=False)
    return out


@pytest.mark.e2e
def test_generate_greedy_fast_equals_reference(ckpt):
    model, tok, meta = load_for_generation(str(ckpt))
    assert meta is not None
    ids = build_inputs(tok, "the king and the queen", chat=True)  # no chat template: plain tokens
    with kernels.use_backend("exact"):
        fast = generate_ids(model, tok, ids, 12, min_new_tokens=12)
    with kernels.use_backend("reference"):
        ref = generate_ids(model, tok, ids, 12, min_new_tokens=12)
    assert fast.shape == (1, 12)
    assert torch.equal(fast, ref)


def test_decode_with_int8_activations_stays_close(ckpt):
    """The default backend rounds decode activations to int8 blocks: one decode step's logits stay
    within 5 % (relative norm) of the exact ones, but are not identical (the path really ran)."""
    model, tok, _ = load_for_generation(str(ckpt))
    ids = build_inputs(tok, "the king and the queen", chat=False)
    logits = {}
    with torch.no_grad():
        for name in ("auto", "exact"):
            with kernels.use_backend(name):  # prefill (many tokens: exact either way), then one decode step
                cache = model(ids[:, :-1], use_cache=True).past_key_values
                logits[name] = model(ids[:, -1:], past_key_values=cache, use_cache=True).logits[0, -1]
    a, e = logits["auto"], logits["exact"]
    rel = ((a - e).norm() / e.norm()).item()
    assert 0 < rel < 0.05, rel


def test_generate_streams_text_and_sampling_is_seeded(ckpt, capsys):
    text = generate(str(ckpt), "the king", 8, temperature=0.0)
    out = capsys.readouterr().out
    assert text and text.strip() in out
    a = generate(str(ckpt), "the king", 8, temperature=1.0, seed=3, stream=None)
    b = generate(str(ckpt), "the king", 8, temperature=1.0, seed=3, stream=None)
    assert a == b


def test_generate_fp_source_and_cli(ckpt, capsys):
    model, _tok, meta = load_for_generation(str(ckpt), fp=True)
    assert meta is None and not any(type(m).__name__ == "QuantLinear" for m in model.modules())
    assert main(["generate", str(ckpt), "--prompt", "the queen", "--max-new-tokens", "5", "--fp"]) == 0
    assert capsys.readouterr().out.strip()


def test_bench_json_contract(ckpt, tmp_path, capsys):
    path = tmp_path / "b.json"
    assert main(["bench", str(ckpt), "--json", str(path), "--prompt-tokens", "16", "--new-tokens", "4",
                 "--repeats", "1", "--threads", "1", "--quiet"]) == 0
    r = json.loads(path.read_text())
    for key in BENCH_KEYS:
        assert key in r and r[key] > 0, key
    assert 0 < r["weight_memory_ratio"] < 0.5  # 4 bits + scales/zeros per group of 32, against 16
    assert r["fp_dtype"] in ("float32", "bfloat16") and r["dtype"] in ("float32", "bfloat16")
    assert r["decode_speedup"] == pytest.approx(r["decode_tokens_per_s"] / r["fp_decode_tokens_per_s"])
    assert r["threads"] == 1 and r["fp_weight_bytes"] > r["weight_bytes"]
    assert "decode" in capsys.readouterr().out


def test_bench_without_fp(ckpt):
    r = bench(str(ckpt), prompt_tokens=8, new_tokens=3, repeats=1, dtypes=("float32",), fp=False,
              progress=lambda *_: None)
    assert r["decode_tokens_per_s"] > 0 and "fp_decode_tokens_per_s" not in r
    assert r["kernels"] and all(isinstance(k, str) for k in r["kernels"])


def test_bench_names_the_kernels_the_layers_use(ckpt):
    """``kernels`` lists what the packed layers of the loaded checkpoint run: only the reference path when it is
    forced, and the same names as the layers' own dispatch otherwise."""
    with kernels.use_backend("reference"):
        r = bench(str(ckpt), prompt_tokens=4, new_tokens=2, repeats=1, dtypes=("float32",), fp=False,
                  llama_cpp=False, record=False, progress=lambda *_: None)
    assert r["kernels"] == ["reference"]
    model, _tok, _meta = lowbit.load(ckpt, device="cpu")
    layers = [m for m in model.modules() if type(m).__name__ == "QuantLinear"]
    r = bench(str(ckpt), prompt_tokens=4, new_tokens=2, repeats=1, dtypes=("float32",), fp=False,
              llama_cpp=False, record=False, progress=lambda *_: None)
    assert r["kernels"] == sorted({kernels.kernel_name(m.packed, torch.empty(1, m.in_features)) for m in layers})


@pytest.mark.parametrize("args,needle", [
    (["generate", "{missing}", "--prompt", "hi"], "not found"),
    (["generate", "{ckpt}", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["generate", "{ckpt}", "--prompt", "hi", "--temperature", "-1"], "--temperature"),
    (["generate", "{ckpt}", "--prompt", ""], "--prompt"),
    (["bench", "{missing}"], "not found"),
    (["bench", "{fp}"], "not a lowbit checkpoint"),
    (["bench", "{ckpt}", "--new-tokens", "1"], "--new-tokens"),
    (["bench", "{ckpt}", "--threads", "0"], "--threads"),
])
def test_cli_errors_are_one_line(args, needle, ckpt, tiny_models, tmp_path, capsys):
    subst = {"missing": str(tmp_path / "nope"), "ckpt": str(ckpt), "fp": str(tiny_models["llama"])}
    code = main([a.format(**subst) for a in args])
    err = capsys.readouterr().err
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("lowbit: error: "), err
    assert needle in lines[0] and "Traceback" not in err
