"""``--embedding-type``: the token embedding (and the output head) on a GGUF type, as llama-quantize stores them.

On the 256-wide tiny models (tests/helpers.build_wide, tied; an untied copy is made here): the table is the
type's RTN (byte-identical to ``gguf.quants.quantize`` where that exists), lowbit's own runtime looks rows up
from the packed blocks and runs the tied head on the same tensor, the checkpoint round-trips with identical
logits, ``bits_per_weight`` counts the table once at its real bits, the GGUF export holds the very bytes (the
``gguf`` package's dequantizer reads back lowbit's table), transformers' GGUF loader reproduces lowbit's logits,
and — when the binaries exist — ``auto`` is the type llama-quantize gives and llama-perplexity runs the file."""
import json
import math
import subprocess

import numpy as np
import pytest
import torch
from safetensors import safe_open

import lowbit
from lowbit.config import QuantConfig
from lowbit.errors import LowbitError
from lowbit.export import export_gguf
from lowbit.gguf import TYPES
from lowbit.gguf.embedding import tensor_type
from lowbit.packed.qembedding import QuantEmbedding
from lowbit.packed.qlinear import QuantLinear

from helpers import build_wide, llama_cpp_bin, llama_perplexity, make_text


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """``{"tied": folder, "untied": folder}``: the 256-wide llama, and the same config with its own head."""
    root = tmp_path_factory.mktemp("wide")
    return {"tied": build_wide(root / "tied", "llama"),
            "untied": build_wide(root / "untied", "llama", tie_word_embeddings=False)}


@pytest.fixture(scope="module")
def built(wide, tmp_path_factory):
    """``get(kind, gguf_type, embedding_type)`` -> ``(saved folder, the in-memory quantized model)``, built once.
    (The fast tier uses 32-block types: lowbit's K-quant RTN takes seconds on these shapes.)"""
    root = tmp_path_factory.mktemp("q")
    made = {}

    def get(kind="tied", gtype="Q4_0", etype="Q8_0"):
        key = (kind, gtype, etype)
        if key not in made:
            out = root / "-".join(key)
            res = lowbit.quantize(str(wide[kind]), method="rtn", gguf_type=gtype, embedding_type=etype, out=out,
                                  progress=False)
            made[key] = (out, res.model)
        return made[key]
    return get


@pytest.fixture(scope="module")
def quantized(built):
    """``get(kind, gguf_type, embedding_type)`` -> a saved lowbit checkpoint folder."""
    return lambda *key: built(*key)[0]


def _float_table(folder, name="model.embed_tokens.weight") -> torch.Tensor:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return f.get_tensor(name).float()


def _ids(tok, n=256):
    return torch.tensor(tok(make_text(400, seed=3), add_special_tokens=False)["input_ids"][:n])[None]


# -- which type ------------------------------------------------------------------------------------------

def test_option_values_and_refusals():
    assert QuantConfig(method="rtn", gguf_type="Q4_0").embedding_type is None           # a plain type: float
    assert "embedding_type" not in QuantConfig(method="gptq").to_json()                   # absent unless used
    assert QuantConfig(method="rtn", gguf_type="Q4_K_M").embedding_type == "auto"        # a preset: llama.cpp's
    assert QuantConfig(method="rtn", gguf_type="Q4_K_M", head_bits=8).embedding_type is None
    assert QuantConfig(method="rtn", gguf_type="q4_0", embedding_type="q8_0").embedding_type == "Q8_0"
    assert QuantConfig(method="gptq", embedding_type="Q6_K").embedding_type == "Q6_K"  # int linears, GGUF table
    with pytest.raises(LowbitError, match="--embedding-type auto .* --gguf-type"):
        QuantConfig(method="gptq", embedding_type="auto")
    with pytest.raises(LowbitError, match="--head-bits"):
        QuantConfig(method="rtn", gguf_type="Q4_0", embedding_type="Q8_0", head_bits=8)
    with pytest.raises(LowbitError, match="--embedding-type Q7_0: choose auto, F16 or one of"):
        QuantConfig(method="rtn", gguf_type="Q4_0", embedding_type="Q7_0")


@pytest.mark.parametrize("gtype,tied,width,want", [
    # llama-quantize without --pure: a tied table is the output head (Q6_K, Q8_0 when the file's type block does
    # not divide the row — SmolLM2's 576 with Q4_K — or the file is Q8_0; Q5_K for the IQ2/IQ3_XXS files), then
    # the row-length fallback (Q6_K at 576 -> Q8_0); an untied table keeps the file's type
    ("Q4_0", True, 576, {"token_embd": "Q8_0"}), ("Q4_0", True, 1024, {"token_embd": "Q6_K"}),
    ("Q4_K", True, 576, {"token_embd": "Q8_0"}), ("Q8_0", True, 1024, {"token_embd": "Q8_0"}),
    ("MOSTLY_IQ2_XS", True, 1024, {"token_embd": "Q5_K"}),
    ("Q4_0", False, 1024, {"token_embd": "Q4_0", "output": "Q6_K"}),
    ("Q4_K_M", False, 576, {"token_embd": "Q5_0", "output": "Q8_0"}),
    ("MOSTLY_IQ2_XS", False, 1024, {"token_embd": "Q2_K", "output": "Q5_K"}),
])
def test_auto_is_llama_quantizes_choice(gtype, tied, width, want):
    cfg = QuantConfig(method="rtn", gguf_type=gtype, embedding_type="auto")
    got = {role: tensor_type(cfg, role, (49152, width), 30, tied=tied) for role in want}
    assert got == want
    if tied:  # one tensor: asking for the head gives the table's type
        assert tensor_type(cfg, "output", (49152, width), 30, tied=True) == want["token_embd"]
    assert tensor_type(QuantConfig(method="rtn", gguf_type=gtype, embedding_type="F16"), "token_embd",
                       (49152, width), 30, tied=tied) == "F16"


# -- lowbit's runtime and checkpoint ---------------------------------------------------------------------

def test_table_is_the_types_rtn_and_the_tied_head_shares_it(wide, quantized):
    import gguf

    src = quantized("tied", "Q4_0", "Q8_0")
    model, tok, meta = lowbit.load(src, device="cpu")
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(emb, QuantEmbedding) and isinstance(head, QuantLinear)
    assert head.blocks is emb.blocks and model.config.tie_word_embeddings
    W = _float_table(wide["tied"]).numpy()
    theirs = gguf.quants.quantize(W, gguf.GGMLQuantizationType.Q8_0)  # llama-quantize's reference, no imatrix
    assert np.array_equal(emb.blocks.numpy(), theirs)
    table = torch.from_numpy(gguf.quants.dequantize(theirs, gguf.GGMLQuantizationType.Q8_0).copy())
    ids = _ids(tok)
    assert torch.equal(emb(ids), table[ids])                                  # a lookup decodes only those rows
    h = torch.randn(3, W.shape[1], generator=torch.Generator().manual_seed(0))
    assert torch.allclose(head(h), h @ table.T, rtol=1e-5, atol=1e-5)         # the head is the same table
    rec = meta["layers"]["model.embed_tokens"]
    assert (rec["gguf_type"], rec["role"], rec["tied"]) == ("Q8_0", "token_embd", True)
    assert rec["bits_per_weight"] == 8.5 and "lm_head" not in meta["layers"]


@pytest.mark.parametrize("key,types", [
    (("tied", "Q4_0", "Q8_0"), {"Q4_0", "Q8_0"}),
    # 256-wide: auto gives the tied table Q6_K, as llama-quantize's Q4_K file does (K-quant RTN: slow here)
    pytest.param(("tied", "Q4_K", "auto"), {"Q4_K", "Q6_K"}, marks=pytest.mark.e2e)])
def test_checkpoint_round_trips_with_identical_logits(built, key, types):
    src, qmodel = built(*key)
    model, tok, meta = lowbit.load(src, device="cpu")
    ids = _ids(tok)
    with torch.no_grad():
        a, b = qmodel(input_ids=ids).logits, model(input_ids=ids).logits
    assert torch.equal(a, b)
    with safe_open(str(src / "model.safetensors"), framework="pt") as f:  # the table is stored once
        keys = set(f.keys())
    assert "model.embed_tokens.blocks" in keys and not any(k.startswith("lm_head") for k in keys)
    assert "model.embed_tokens.weight" not in keys
    # bits per weight: every quantized tensor once, the table at its type's real bits (Q8_0 8.5, Q6_K 6.5625)
    layers = meta["layers"].values()
    assert {l["gguf_type"] for l in layers} == types
    table = meta["layers"]["model.embed_tokens"]
    assert table["bits_per_weight"] == TYPES[table["gguf_type"]].bits_per_weight
    bits = sum(l["bits_per_weight"] * l["shape"][0] * l["shape"][1] for l in layers)
    n = sum(l["shape"][0] * l["shape"][1] for l in layers)
    assert meta["bits_per_weight"] == pytest.approx(bits / n, rel=1e-12)
    lo, hi = sorted(TYPES[t].bits_per_weight for t in types)
    assert lo < meta["bits_per_weight"] < hi
    # moving the model keeps the tie (buffers are copied module by module)
    model.to(torch.float64)
    assert model.lm_head.blocks is model.model.embed_tokens.blocks
    assert model.model.embed_tokens(ids).dtype == torch.float64


def test_untied_head_gets_the_type_too(wide, built):
    import gguf

    src, qmodel = built("untied", "Q4_0", "Q5_0")
    model, tok, meta = lowbit.load(src, device="cpu")
    layers = meta["layers"]
    assert layers["model.embed_tokens"]["gguf_type"] == "Q5_0" and "tied" not in layers["model.embed_tokens"]
    assert (layers["lm_head"]["gguf_type"], layers["lm_head"]["role"]) == ("Q5_0", "output")
    assert model.lm_head.blocks is not model.model.embed_tokens.blocks
    for name, mod in (("lm_head.weight", model.lm_head), ("model.embed_tokens.weight", model.model.embed_tokens)):
        W = _float_table(wide["untied"], name).numpy()
        assert np.array_equal(mod.blocks.numpy(), gguf.quants.quantize(W, gguf.GGMLQuantizationType.Q5_0)), name
    ids = _ids(tok)
    with torch.no_grad():
        assert torch.equal(qmodel(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.e2e
def test_untied_auto_is_llama_cpps_pair(built):
    """``auto`` with an untied head and a Q4_0 file: the table keeps Q4_0, the head gets Q6_K (256 | 256)."""
    src, _ = built("untied", "Q4_0", "auto")
    layers = json.loads((src / "lowbit.json").read_text())["layers"]
    assert (layers["model.embed_tokens"]["gguf_type"], layers["lm_head"]["gguf_type"]) == ("Q4_0", "Q6_K")


def test_info_shows_the_embedding(quantized, capsys):
    from lowbit.cli import main

    assert main(["info", str(quantized("tied", "Q4_0", "Q8_0")), "--layers"]) == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if "model.embed_tokens" in l)
    assert "gguf Q8_0 8.500 bpw" in line and "token_embd, tied head" in line


# -- the GGUF file ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,gtype,etype", [("tied", "Q4_0", "Q8_0"), ("untied", "Q4_0", "Q5_0"),
                                              pytest.param("tied", "Q4_K", "auto", marks=pytest.mark.e2e),
                                              pytest.param("untied", "Q4_0", "auto", marks=pytest.mark.e2e)])
def test_export_holds_lowbits_table(quantized, tmp_path, kind, gtype, etype):
    import gguf

    src = quantized(kind, gtype, etype)
    export_gguf(src, tmp_path / "m.gguf")
    model, _, meta = lowbit.load(src, device="cpu")
    tensors = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    want = {"token_embd.weight": model.model.embed_tokens.packed}
    if kind == "untied":
        want["output.weight"] = model.lm_head.packed
    else:
        assert "output.weight" not in tensors  # llama.cpp ties the head to token_embd
    for g, p in want.items():
        t = tensors[g]
        assert t.tensor_type.name == p.gguf_type
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(p.shape)
        assert np.array_equal(got, p.dequantize().numpy()), g


@pytest.mark.parametrize("key", [("tied", "Q4_0", "Q8_0"), ("untied", "Q4_0", "Q5_0"),
                                 pytest.param(("tied", "Q4_K", "auto"), marks=pytest.mark.e2e)])
def test_transformers_gguf_loader_reproduces_lowbits_logits(quantized, tmp_path, key):
    from transformers import AutoModelForCausalLM

    src = quantized(*key)
    export_gguf(src, tmp_path / "m.gguf")
    gmodel = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    model, tok, _ = lowbit.load(src, device="cpu")
    ids = _ids(tok)
    with torch.no_grad():
        a, b = gmodel(input_ids=ids).logits, model(input_ids=ids).logits
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), float((a - b).abs().max())


# -- llama.cpp -------------------------------------------------------------------------------------------

@pytest.mark.skipif(llama_cpp_bin("llama-quantize") is None, reason="llama.cpp's llama-quantize is not built")
@pytest.mark.parametrize("kind", ["tied", "untied"])
@pytest.mark.e2e
def test_auto_matches_llama_quantize(wide, quantized, tmp_path, kind):
    """llama-quantize (no --pure, no imatrix) of the float GGUF: token_embd / output get ``auto``'s types."""
    import gguf

    src = quantized(kind, "Q8_0", "F16")  # a GGUF with the float table (F16) to requantize
    export_gguf(src, tmp_path / "f.gguf")
    for gtype in ("Q4_0", "Q4_K", "IQ4_NL", "Q8_0"):
        r = subprocess.run([llama_cpp_bin("llama-quantize"), "--allow-requantize", str(tmp_path / "f.gguf"),
                            str(tmp_path / "o.gguf"), gtype], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        theirs = {t.name.removesuffix(".weight"): (t.tensor_type.name, tuple(int(x) for x in t.shape[::-1]))
                  for t in gguf.GGUFReader(str(tmp_path / "o.gguf")).tensors
                  if t.name in ("token_embd.weight", "output.weight")}
        assert set(theirs) == ({"token_embd"} if kind == "tied" else {"token_embd", "output"})
        cfg = QuantConfig(method="rtn", gguf_type=gtype, embedding_type="auto")
        for role, (t, shape) in theirs.items():
            assert tensor_type(cfg, role, shape, 2, tied=kind == "tied") == t, (gtype, role)


@pytest.mark.skipif(llama_cpp_bin("llama-perplexity") is None, reason="llama.cpp's llama-perplexity is not built")
@pytest.mark.parametrize("kind", ["tied", "untied"])
@pytest.mark.e2e
def test_llama_perplexity_runs_the_export(quantized, tmp_path, kind):
    """llama.cpp loads the file with the quantized table (and head) and its perplexity matches lowbit's, computed
    the same way (windows of 128, the second half scored; 8-bit activations in its K-quant dot products: 2 %)."""
    src = quantized(kind, "Q4_K" if kind == "tied" else "Q4_0", "auto")
    export_gguf(src, tmp_path / "m.gguf")
    text = make_text(3000, seed=5)
    (tmp_path / "t.txt").write_text(text)
    k, theirs = llama_perplexity(tmp_path / "m.gguf", tmp_path / "t.txt")
    model, tok, _ = lowbit.load(src, device="cpu")
    ids = tok(text, add_special_tokens=False)["input_ids"][:k * 128]
    nll, n = 0.0, 0
    with torch.no_grad():
        for i in range(k):
            x = torch.tensor(ids[i * 128:(i + 1) * 128])[None]
            lp = torch.log_softmax(model(input_ids=x).logits[0].double(), -1)
            nll -= float(lp[64:-1].gather(1, x[0, 65:, None]).sum())
            n += 128 - 1 - 64
    ours = math.exp(nll / n)
    assert abs(theirs - ours) / ours < 0.02, (theirs, ours, k)


@pytest.mark.e2e
def test_cli_quantize_says_the_tables_type(wide, tmp_path):
    r = subprocess.run(["lowbit", "quantize", str(wide["tied"]), "--method", "rtn", "--gguf-type", "Q4_0",
                        "--embedding-type", "Q6_K", "--out", str(tmp_path / "q")], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "token_embd (model.embed_tokens, also the tied head): Q6_K" in r.stdout
    meta = json.loads((tmp_path / "q" / "lowbit.json").read_text())
    assert meta["config"]["embedding_type"] == "Q6_K"
    bad = subprocess.run(["lowbit", "quantize", str(wide["tied"]), "--method", "rtn", "--embedding-type", "auto",
                          "--out", str(tmp_path / "bad")], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and bad.stderr.startswith("lowbit: error: --embedding-type auto")
    assert not (tmp_path / "bad").exists()
