"""``lowbit export``: GGUF (lossless re-encoding, read back by gguf and transformers) and GPTQ
checkpoints (read back by an independent AutoGPTQ-convention reader written here)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import lowbit
from lowbit.errors import LowbitError
from lowbit.export import export_gguf, export_gptq

GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


@pytest.fixture(scope="module")
def ckpts(tiny_models, tmp_path_factory):
    """Lazily quantized tiny checkpoints, keyed by (family, method, bits, group_size, sym, extra)."""
    root, cache = tmp_path_factory.mktemp("export"), {}

    def get(family="llama", bits=4, group_size=32, sym=True, method="rtn", **kw):
        key = (family, method, bits, group_size, sym, tuple(sorted(kw.items())))
        if key not in cache:
            out = root / "_".join(str(k) for k in key[:5]) / str(len(cache))
            res = lowbit.quantize(str(tiny_models[family]), method=method, bits=bits, group_size=group_size, sym=sym,
                                  out=out, progress=False, **kw)
            cache[key] = (out, res)
        return cache[key]

    return get


def packed_layers(model):
    from lowbit.packed.qlinear import QuantLinear

    return {n: m.packed for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def llama_cpp_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Row r = h·d + 2i + j of llama.cpp's Q/K is HF row h·d + j·d/2 + i (d = rows per head)."""
    d = w.shape[0] // n_head
    h, i, j = np.meshgrid(np.arange(n_head), np.arange(d // 2), np.arange(2), indexing="ij")
    return w[(h * d + j * (d // 2) + i).reshape(-1)]


# ---------------------------------------------------------------- GGUF

@pytest.mark.parametrize("bits,sym,qtype", [(4, True, "Q4_0"), (4, False, "Q4_1"), (8, True, "Q8_0"),
                                             (5, True, "Q5_0"), (5, False, "Q5_1"), (3, True, "Q4_0"),
                                             (6, False, "Q8_0")])
def test_gguf_blocks_dequantize_to_lowbit_weights(ckpts, tmp_path, bits, sym, qtype):
    import gguf

    src, res = ckpts(bits=bits, sym=sym)
    report = export_gguf(src, tmp_path / "m.gguf")
    assert report["types"] == {qtype: 14} and report["requantized"] == 0
    assert [f.name for f in tmp_path.iterdir()] == ["m.gguf"]  # no temporary file left behind
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    tensors = {t.name: t for t in reader.tensors}
    assert tensors["token_embd.weight"].tensor_type.name == "F16"
    assert tensors["output_norm.weight"].tensor_type.name == "F32" and "output.weight" not in tensors  # tied
    worst = 0.0
    for name, p in packed_layers(res.model).items():
        _, _, block, _, leaf = name.split(".")
        t = tensors[f"blk.{block}.{GGUF_NAMES[leaf]}.weight"]
        assert t.tensor_type.name == qtype
        got = gguf.quants.dequantize(t.data, t.tensor_type)
        ref = p.dequantize().numpy()
        if leaf in ("q_proj", "k_proj"):
            ref = llama_cpp_rows(ref, 4 if leaf == "q_proj" else 2)
        if qtype not in ("Q4_1", "Q5_1"):  # offset types (Q4_0, Q5_0, Q8_0): bit-exact
            assert np.array_equal(got, ref), name
        else:  # m = fp16(−s·z): off by at most half an fp16 ulp of s·z <= s·z·2^-11
            g = p.column_groups()
            s, z = p.scales.float()[:, g].numpy(), p.zeros()[:, g].numpy()
            if leaf in ("q_proj", "k_proj"):
                s, z = (llama_cpp_rows(a, 4 if leaf == "q_proj" else 2) for a in (s, z))
            err = np.abs(got - ref)
            assert (err <= s * z * 2.0 ** -11 + 2.0 ** -22 * np.abs(ref)).all(), name
            worst = max(worst, float((err / s).max()))
    if qtype in ("Q4_1", "Q5_1"):  # visible, but < 0.75 % (4 bits) of a grid step
        assert 0 < worst <= (2 ** bits - 1) * 2.0 ** -11


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_transformers_loads_the_gguf(family, ckpts, tmp_path, tiny_text):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for sym in ((True, False) if family == "llama" else (True,)):
        src, _ = ckpts(family=family, sym=sym)
        name = f"{family}-{sym}.gguf"
        export_gguf(src, tmp_path / name)
        gmodel = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=name, dtype=torch.float32).eval()
        gtok = AutoTokenizer.from_pretrained(tmp_path, gguf_file=name)
        model, tok, _ = lowbit.load(src, device="cpu")
        text = tiny_text.read_text()[:3000]
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert gtok(text, add_special_tokens=False)["input_ids"] == ids
        assert gmodel.config.num_key_value_heads == 2
        assert gmodel.config.tie_word_embeddings == model.config.tie_word_embeddings == (family == "llama")
        x = torch.tensor(ids[:96])[None]
        with torch.no_grad():
            a, b = gmodel(input_ids=x).logits, model(input_ids=x).logits
        # sym: identical weights; asym: Q4_1's fp16 block minimum moves weights by <= s·z·2^-11
        assert torch.allclose(a, b, atol=1e-4 if sym else 2e-2, rtol=0), (family, sym, (a - b).abs().max())


def test_qwen3_gguf_layout(ckpts, tmp_path):
    """Qwen3 (per-head q/k norms) writes llama.cpp's names; transformers' GGUF loader cannot read it
    back at this size (it ignores the head size for qwen3 and assumes 128), so only the layout is checked."""
    import gguf

    export_gguf(ckpts(family="qwen3")[0], tmp_path / "q3.gguf", dtype="f32")
    r = gguf.GGUFReader(str(tmp_path / "q3.gguf"))
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert r.fields["general.architecture"].contents() == "qwen3"
    assert types["blk.1.attn_q_norm.weight"] == types["blk.1.attn_k_norm.weight"] == "F32"
    assert types["blk.1.attn_q.weight"] == "Q4_0" and types["token_embd.weight"] == "F32"
    assert len(types) == 2 * 11 + 2 + 1  # 11 per block (7 linears, 2 norms, q/k norms), embd, norm, head


def test_gguf_refuses_grids_without_a_lossless_type(ckpts, tmp_path):
    import gguf

    for kw in (dict(bits=4, group_size=16), dict(bits=8, sym=False)):
        src, _ = ckpts(**kw)
        with pytest.raises(LowbitError, match=r"no lossless GGUF type; exportable: w2-4 sym -> Q4_0, w2-4 asym -> Q4_1"):
            export_gguf(src, tmp_path / "x.gguf")
        assert list(tmp_path.iterdir()) == []  # nothing half-written
    src, res = ckpts(bits=4, group_size=16)
    report = export_gguf(src, tmp_path / "r.gguf", requantize="Q8_0")
    assert report["requantized"] == 14 and report["types"] == {"Q8_0": 14}
    t = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "r.gguf")).tensors}["blk.0.ffn_down.weight"]
    ref = packed_layers(res.model)["model.layers.0.mlp.down_proj"].dequantize().numpy()
    got = gguf.quants.dequantize(t.data, t.tensor_type)
    assert np.abs(got - ref).max() <= np.abs(ref).max() / 127  # within one Q8_0 step of the lowbit weight


# ---------------------------------------------------------------- GPTQ (independent v1 reader)

def unpack_gptq(words: np.ndarray, bits: int, count: int) -> np.ndarray:
    """AutoGPTQ's convention, along axis 0: for 2/4/8 bits value i sits in word i // (32/b) at bit
    b·(i % (32/b)); for 3 bits every 3 words are one 96-bit little-endian stream of 32 values."""
    w = words.astype(np.int64) & 0xFFFFFFFF
    if bits in (2, 4, 8):
        per = 32 // bits
        i = np.arange(count)
        return (w[i // per] >> (bits * (i % per))[:, None]) & (2 ** bits - 1)
    out = np.zeros((count, w.shape[1]), dtype=np.int64)
    for c in range(count // 32):
        stream = [int(a) | int(b) << 32 | int(d) << 64 for a, b, d in zip(*w[3 * c:3 * c + 3])]
        for k in range(32):
            out[32 * c + k] = [(s >> (3 * k)) & 7 for s in stream]
    return out


def autogptq_pack(intweight: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ's ``QuantLinear.pack`` loop (rows = input axis), transcribed: (n, m) codes -> (n·b/32, m) int32."""
    intweight = intweight.astype(np.uint32)
    qweight = np.zeros((intweight.shape[0] // 32 * bits, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        if bits in (2, 4, 8):
            for j in range(i, i + 32 // bits):
                qweight[row] |= intweight[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        else:  # 3 bits: codes 10 and 21 of every 32 straddle two words
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i))
            i += 10
            qweight[row] |= intweight[i] << 30
            row += 1
            qweight[row] |= (intweight[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 1)
            i += 10
            qweight[row] |= intweight[i] << 31
            row += 1
            qweight[row] |= (intweight[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return qweight.astype(np.int32)


def read_gptq(folder, layer: str, bits: int, v1: bool = True) -> np.ndarray:
    """Dequantize one layer: W[j, i] = scales[g[i], j] · (q[i, j] − zero[g[i], j]), zero = stored + 1 in v1."""
    from safetensors.numpy import load_file

    t = load_file(str(folder / "model.safetensors"))
    qweight, qzeros = t[f"{layer}.qweight"], t[f"{layer}.qzeros"]
    scales, g = t[f"{layer}.scales"].astype(np.float32), t[f"{layer}.g_idx"].astype(np.int64)
    assert qweight.dtype == qzeros.dtype == np.int32 and t[f"{layer}.scales"].dtype == np.float16
    n, m = g.shape[0], scales.shape[1]
    assert qweight.shape == (n * bits // 32, m) and qzeros.shape == (scales.shape[0], m * bits // 32)
    q = unpack_gptq(qweight, bits, n)                                   # (n, m)
    zeros = unpack_gptq(qzeros.T, bits, m).T + (1 if v1 else 0)        # (G, m)
    return (scales[g] * (q - zeros[g]).astype(np.float32)).T


@pytest.mark.parametrize("bits,sym,fmt", [(4, True, "gptq"), (4, False, "gptq"), (2, False, "gptq"),
                                          (8, True, "gptq"), (3, True, "gptq"), (4, False, "gptq_v2")])
def test_gptq_checkpoint_reads_back_exactly(ckpts, tmp_path, bits, sym, fmt):
    from transformers import AutoConfig

    src, res = ckpts(bits=bits, sym=sym)
    report = export_gptq(src, tmp_path / "g", checkpoint_format=fmt)
    assert report["layers"] == 14 and not report["desc_act"]
    from safetensors.numpy import load_file

    t = load_file(str(tmp_path / "g" / "model.safetensors"))
    for name, p in packed_layers(res.model).items():
        assert np.array_equal(read_gptq(tmp_path / "g", name, bits, v1=fmt == "gptq"), p.dequantize().numpy()), name
        assert np.array_equal(t[f"{name}.qweight"], autogptq_pack(p.codes().t().numpy(), bits)), name
    qc = json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]
    assert qc | {"bits": bits, "group_size": 32, "sym": sym, "desc_act": False, "quant_method": "gptq",
                 "checkpoint_format": fmt} == qc
    assert AutoConfig.from_pretrained(tmp_path / "g").model_type == "llama"
    assert (tmp_path / "g" / "tokenizer.json").is_file() and not (tmp_path / "g" / "lowbit.json").exists()


@pytest.mark.parametrize("sym,fmt", [(True, "gptq"), (False, "gptq_v2")])
def test_gptq_default_format_is_what_the_loaders_accept(ckpts, tmp_path, sym, fmt):
    """Default: symmetric grids as classic v1, asymmetric as v2 (GPTQModel refuses asymmetric v1 from
    other tools; tests/test_interop.py loads both with GPTQModel)."""
    src, res = ckpts(sym=sym)
    report = export_gptq(src, tmp_path / "g")
    assert report["checkpoint_format"] == fmt
    qc = json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]
    assert qc["checkpoint_format"] == fmt and qc["meta"]["quantizer"] == [f"lowbit:{lowbit.__version__}"]
    for name, p in packed_layers(res.model).items():
        assert np.array_equal(read_gptq(tmp_path / "g", name, 4, v1=fmt == "gptq"), p.dequantize().numpy()), name


def test_act_order_g_idx_exports_to_gptq_not_gguf(ckpts, tmp_path, tiny_text):
    src, res = ckpts(method="gptq", act_order=True, static_groups=False, source=str(tiny_text), nsamples=8, seqlen=64)
    report = export_gptq(src, tmp_path / "g")
    assert report["desc_act"]
    for name, p in packed_layers(res.model).items():
        assert p.g_idx is not None
        assert np.array_equal(read_gptq(tmp_path / "g", name, 4), p.dequantize().numpy()), name
    with pytest.raises(LowbitError, match="with act-order g_idx.*no lossless GGUF type"):
        export_gguf(src, tmp_path / "x.gguf")


def test_gptq_refusals(ckpts, tmp_path):
    with pytest.raises(LowbitError, match="partial last group"):  # down_proj has 96 inputs
        export_gptq(ckpts(group_size=64)[0], tmp_path / "a")
    with pytest.raises(LowbitError, match="GPTQ export supports 2/3/4/8 bits"):
        export_gptq(ckpts(bits=5)[0], tmp_path / "b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x").write_text("keep me")
    with pytest.raises(LowbitError, match="not an empty folder"):
        export_gptq(ckpts()[0], tmp_path / "c")
    assert (tmp_path / "c" / "x").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


# ---------------------------------------------------------------- CLI

def _cli(*args):
    return subprocess.run([sys.executable, "-m", "lowbit", "export", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.e2e
def test_cli_export(ckpts, tiny_models, tmp_path):
    src, _ = ckpts()
    r = _cli(str(src), "--format", "gguf", "--out", str(tmp_path / "m.gguf"))
    assert r.returncode == 0 and "14 Q4_0 layers (14 lossless" in r.stdout, r.stderr
    r = _cli(str(src), "--format", "gptq", "--out", str(tmp_path / "g"))
    assert r.returncode == 0 and (tmp_path / "g" / "model.safetensors").is_file(), r.stderr
    bad = [([str(tmp_path / "missing"), "--format", "gguf", "--out", str(tmp_path / "x.gguf")], "not found"),
           ([str(tiny_models["llama"]), "--format", "gptq", "--out", str(tmp_path / "y")], "not a lowbit checkpoint"),
           ([str(ckpts(group_size=16)[0]), "--format", "gguf", "--out", str(tmp_path / "z.gguf")], "--requantize TYPE"),
           ([str(src), "--format", "gptq", "--out", str(tmp_path / "g")], "not an empty folder"),
           ([str(src), "--format", "gguf", "--out", str(tmp_path / "q.gguf"), "--requantize", "Q3_K"], "--requantize must"),
           ([str(src), "--format", "gptq", "--out", str(tmp_path / "w"), "--dtype", "f32"], "gguf only")]
    for args, msg in bad:
        r = _cli(*args)
        assert r.returncode == 2 and r.stderr.startswith("lowbit: error:") and msg in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
