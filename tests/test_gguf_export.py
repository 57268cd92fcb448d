"""GGUF-native quantization end to end on tiny models whose widths K-quants can hold (hidden 256, MLP 512):
``lowbit quantize --gguf-type T`` -> ``lowbit export --format gguf`` is lossless for every type (read back by
the gguf package's dequantizer and, when the binaries exist, by llama.cpp's own), transformers' GGUF loader
reproduces lowbit's perplexity, gemma3's conventions, refusals, and llama-perplexity runs the file."""
import json
import math
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import lowbit
from lowbit.errors import LowbitError
from lowbit.export import export_gguf
from lowbit.export.gguf import permute_rows
from lowbit.gguf import QUANT_TYPES

from helpers import build_wide, llama_cpp_bin, llama_perplexity, make_text

GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    root = tmp_path_factory.mktemp("wide")
    return {f: build_wide(root / f, f) for f in ("llama", "gemma3")}


@pytest.fixture(scope="module")
def quantized(wide, tmp_path_factory):
    """``get(family, type, method)`` -> a lowbit checkpoint folder, built once."""
    root = tmp_path_factory.mktemp("q")
    made = {}

    def get(family="llama", gtype="Q4_K", method="rtn"):
        key = (family, gtype, method)
        if key not in made:
            out = root / "-".join(key)
            kw = {} if method == "rtn" else dict(source=str(wide[family] / "calib.txt"), nsamples=8, seqlen=64)
            lowbit.quantize(str(wide[family]), method=method, gguf_type=gtype, out=out, progress=False, **kw)
            made[key] = out
        return made[key]
    return get


def lowbit_weights(folder) -> dict[str, np.ndarray]:
    """{gguf tensor name: lowbit's dequantized weight in llama.cpp's row order}."""
    from lowbit.packed.qlinear import QuantLinear

    model, _, _ = lowbit.load(folder, device="cpu")
    cfg = model.config
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            blk, rest = re.match(r"model\.layers\.(\d+)\.(.+)", name).groups()
            g = f"blk.{blk}.{GGUF_NAMES[rest]}.weight"
            w = mod.packed.dequantize().numpy()
            if cfg.model_type == "llama" and rest == "self_attn.q_proj":
                w = permute_rows(w, cfg.num_attention_heads)
            if cfg.model_type == "llama" and rest == "self_attn.k_proj":
                w = permute_rows(w, cfg.num_key_value_heads)
            out[g] = w
    return out


@pytest.mark.parametrize("gtype", [pytest.param(t, marks=pytest.mark.e2e) if t.startswith(("IQ2", "IQ3")) else t
                                   for t in QUANT_TYPES])  # the lattice i-quants take tens of seconds each
def test_every_type_exports_losslessly(quantized, tmp_path, gtype):
    import gguf

    src = quantized("llama", gtype)
    r = export_gguf(src, tmp_path / "m.gguf")
    assert r["types"] == {gtype: 14} and r["lossless"] == 14
    ours = lowbit_weights(src)
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    seen = 0
    for t in reader.tensors:
        if t.name in ours:
            assert t.tensor_type.name == gtype
            np.testing.assert_array_equal(gguf.quants.dequantize(t.data, t.tensor_type), ours[t.name])
            seen += 1
    assert seen == len(ours) == 14


@pytest.mark.e2e
def test_gptq_k_quant_export_is_lossless_and_gemma3_too(quantized, tmp_path):
    import gguf

    for family in ("llama", "gemma3"):
        src = quantized(family, "Q4_K", "gptq")
        export_gguf(src, tmp_path / f"{family}.gguf")
        ours = lowbit_weights(src)
        reader = gguf.GGUFReader(str(tmp_path / f"{family}.gguf"))
        got = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors if t.name in ours}
        assert set(got) == set(ours)
        for k in ours:
            np.testing.assert_array_equal(got[k], ours[k])


def test_fallback_is_recorded_in_lowbit_json(wide, tmp_path):
    """A model with MLP 576: down_proj's rows (576 inputs) cannot hold Q4_K and fall back to Q5_0 as
    llama-quantize does; the 256-input layers keep Q4_K."""
    import transformers as tf

    path = tmp_path / "odd"
    shutil.copytree(wide["llama"], path)
    cfg = json.loads((path / "config.json").read_text())
    model = tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(**{**{k: v for k, v in cfg.items()
                                                                   if k not in ("architectures", "model_type")},
                                                                "intermediate_size": 576}))
    model.save_pretrained(path)
    lowbit.quantize(str(path), method="rtn", gguf_type="Q4_K", out=tmp_path / "q", progress=False)
    layers = json.loads((tmp_path / "q" / "lowbit.json").read_text())["layers"]
    down = layers["model.layers.0.mlp.down_proj"]
    assert down["gguf_type"] == "Q5_0" and "ncols 576 not divisible by 256" in down["gguf_fallback"]
    assert layers["model.layers.0.mlp.up_proj"]["gguf_type"] == "Q4_K" and "gguf_fallback" not in layers["model.layers.0.mlp.up_proj"]


def _ppl(model, ids, seqlen=64):
    """Perplexity over whole windows of ``seqlen`` tokens (every next token scored)."""
    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(len(ids) // seqlen):
            x = torch.tensor(ids[i * seqlen:(i + 1) * seqlen])[None]
            lp = torch.log_softmax(model(input_ids=x).logits[0].double(), -1)
            nll -= float(lp[:-1].gather(1, x[0, 1:, None]).sum())
            n += seqlen - 1
    return math.exp(nll / n)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_transformers_gguf_loader_reproduces_lowbit_ppl(quantized, tmp_path, family):
    from transformers import AutoModelForCausalLM

    src = quantized(family, "Q4_K", "gptq")
    export_gguf(src, tmp_path / "m.gguf")
    gmodel = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    model, tok, _ = lowbit.load(src, device="cpu")
    ids = tok(make_text(seed=1), add_special_tokens=False)["input_ids"][:1024]
    a, b = _ppl(gmodel, ids), _ppl(model, ids)
    assert abs(a - b) / b < 1e-4, (family, a, b)


def test_gemma3_norms_are_written_plus_one(quantized, tmp_path):
    import gguf
    from safetensors.torch import load_file

    src = quantized("gemma3", "Q4_K", "rtn")
    export_gguf(src, tmp_path / "g.gguf", dtype="f32")
    r = gguf.GGUFReader(str(tmp_path / "g.gguf"))
    t = {x.name: x for x in r.tensors}
    sd = load_file(src / "model.safetensors")
    for hf, g in (("model.layers.0.input_layernorm.weight", "blk.0.attn_norm.weight"),
                  ("model.layers.1.post_feedforward_layernorm.weight", "blk.1.post_ffw_norm.weight"),
                  ("model.layers.0.self_attn.q_norm.weight", "blk.0.attn_q_norm.weight"),
                  ("model.norm.weight", "output_norm.weight")):
        np.testing.assert_array_equal(np.asarray(t[g].data), sd[hf].float().numpy() + np.float32(1))
    np.testing.assert_array_equal(np.asarray(t["token_embd.weight"].data).reshape(-1, 256),
                                  sd["model.embed_tokens.weight"].float().numpy())  # √hidden applied by the runtimes
    assert r.fields["general.architecture"].contents() == "gemma3"
    assert r.fields["gemma3.attention.key_length"].contents() == 256
    assert r.fields["gemma3.attention.sliding_window"].contents() == 16


def test_refused_families_are_named(tiny_models, tmp_path):
    lowbit.quantize(str(tiny_models["opt"]), method="rtn", bits=4, group_size=32, sym=True, out=tmp_path / "o",
                    progress=False)
    with pytest.raises(LowbitError, match="'opt'.*llama.cpp has no OPT"):
        export_gguf(tmp_path / "o", tmp_path / "o.gguf")
    assert not (tmp_path / "o.gguf").exists()


@pytest.mark.e2e
def test_cli_gguf_type_and_fallback_message(wide, tmp_path):
    out = tmp_path / "c"
    r = subprocess.run([sys.executable, "-m", "lowbit", "quantize", str(wide["llama"]), "--method", "rtn",
                        "--gguf-type", "Q3_K", "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "rtn Q3_K: 3.438 bits/weight" in r.stdout and "fell back" not in r.stdout
    r = subprocess.run([sys.executable, "-m", "lowbit", "quantize", str(wide["llama"]), "--method", "quip",
                        "--bits", "2", "--gguf-type", "Q3_K", "--out", str(tmp_path / "d")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().startswith("lowbit: error: --method quip --gguf-type Q3_K: ")
    r = subprocess.run([sys.executable, "-m", "lowbit", "export", str(out), "--format", "gguf", "--out",
                        str(tmp_path / "c.gguf")], capture_output=True, text=True)
    assert r.returncode == 0 and "14 Q3_K layers (14 lossless" in r.stdout, r.stdout + r.stderr


# -- llama.cpp itself (skipped when its binaries are absent) -----------------------------------------------

@pytest.mark.skipif(llama_cpp_bin("llama-quantize") is None, reason="llama.cpp's llama-quantize is not built")
@pytest.mark.parametrize("gtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS", "IQ3_XXS", "IQ3_S",
                                   "IQ2_XXS", "IQ2_XS", "IQ2_S"])
@pytest.mark.e2e
def test_llama_cpp_dequantizes_to_lowbit_weights(quantized, tmp_path, gtype):
    """ggml's own C dequantizer (llama-quantize ... F32) reads our blocks as exactly lowbit's weights."""
    import gguf

    src = quantized("llama", gtype)
    export_gguf(src, tmp_path / "m.gguf")
    r = subprocess.run([llama_cpp_bin("llama-quantize"), "--allow-requantize", str(tmp_path / "m.gguf"),
                        str(tmp_path / "f32.gguf"), "F32"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ours = lowbit_weights(src)
    got = {t.name: np.asarray(t.data).reshape(t.shape[::-1]) for t in gguf.GGUFReader(str(tmp_path / "f32.gguf")).tensors
           if t.name in ours}
    assert set(got) == set(ours)
    for k in ours:
        np.testing.assert_array_equal(got[k], ours[k])


def _llama_cpp_protocol_ppl(model, ids, ctx):
    """llama-perplexity's number: windows of ``ctx`` tokens, only the second half of each scored."""
    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(len(ids) // ctx):
            x = torch.tensor(ids[i * ctx:(i + 1) * ctx])[None]
            lp = torch.log_softmax(model(input_ids=x).logits[0].double(), -1)
            nll -= float(lp[ctx // 2:-1].gather(1, x[0, ctx // 2 + 1:, None]).sum())
            n += ctx - 1 - ctx // 2
    return math.exp(nll / n)


@pytest.mark.skipif(llama_cpp_bin("llama-perplexity") is None, reason="llama.cpp's llama-perplexity is not built")
@pytest.mark.parametrize("family,gtype", [("llama", "Q4_K"), ("llama", "Q2_K"), ("gemma3", "Q4_K"), ("llama", "IQ4_XS"),
                                          ("llama", "IQ3_XXS"), ("llama", "IQ2_XS"), ("gemma3", "IQ2_S")])
@pytest.mark.e2e
def test_llama_perplexity_runs_the_export(quantized, tmp_path, family, gtype):
    """llama.cpp loads and runs lowbit's K- and I-quant GGUF, and its perplexity matches lowbit's own computed the
    same way (it rounds activations to 8 bits for K-/I-quant dot products: within 2 %)."""
    src = quantized(family, gtype, "gptq")
    export_gguf(src, tmp_path / "m.gguf")
    text = make_text(3000, seed=5)
    (tmp_path / "t.txt").write_text(text)
    k, theirs = llama_perplexity(tmp_path / "m.gguf", tmp_path / "t.txt")
    model, tok, _ = lowbit.load(src, device="cpu")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    ours = _llama_cpp_protocol_ppl(model, ids[:k * 128], 128)
    assert abs(theirs - ours) / ours < 0.02, (theirs, ours, k)
