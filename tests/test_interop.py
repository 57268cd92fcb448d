"""Exports read by the real clients: GPTQ checkpoints by GPTQModel, compressed-tensors checkpoints by
transformers' compressed-tensors integration (and the library's own dequantizer), GGUF by
transformers and llama.cpp.  Each test is skipped only when its client is not installed
(``pip install 'lowbit[interop]'``; llama.cpp: ``llama-perplexity`` on PATH or ``$LOWBIT_LLAMA_CPP_BIN``).

Tolerances (logits of the same 48 tokens; ``M`` = max |lowbit logit|):

* GPTQModel with its defaults computes in bf16 (8 significant bits): ``|Δ| ≤ 0.05·M``; with
  ``dtype=float16, backend=TORCH`` (11 bits): ``|Δ| ≤ 0.01·M``.  Misreading the zero points by one
  (v1 vs v2) moves every weight by a whole grid step and gives ``|Δ|`` of the order of ``M``.
* transformers + compressed-tensors in float32 dequantizes ``s·(q − z)`` exactly as lowbit does:
  ``|Δ| ≤ 1e-4``.  Asymmetric checkpoints load with the defaults only once compressed-tensors' meta-device
  zero-point shape is fixed (an upstream bug, see ``lowbit/export/check.py``; shown here by applying that
  fix in-process); ``CompressedTensorsConfig(dequantize=True)`` computes ``s·(q − z)`` in the fp16 scale's
  precision (relative error ≤ 2^-11 per weight): ``|Δ| ≤ 0.002·M``.
* GGUF: :func:`gguf_as_f32` holds the file's own weights, so transformers' GGUF reader gives the same
  logits from it as from the quantized file (``|Δ| ≤ 1e-5·M``).
* Perplexity (``lowbit export --check``): within 0.5 % on the tiny random models (bf16 client), and
  within 0.2 % on the demo model (slow tier).  llama.cpp on a quantized GGUF: 0.5 %, because its CPU kernels
  round the activations to 8-bit blocks for quantized dot products (measured on the demo model: +0.27 % on
  lowbit's Q4_1 file, +0.62 % on llama.cpp's own Q4_0 file against transformers reading that file); on the
  same file's weights in F32 (``llama.cpp-f32``) it is held to 0.2 % (measured +0.036 % and +0.003 %).
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import lowbit
from lowbit.errors import LowbitError
from lowbit.export import check_export, export_compressed_tensors, export_gguf, export_gptq
from lowbit.export.check import gguf_as_f32, llama_perplexity_bin

GPTQMODEL_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "opt")


@pytest.fixture(scope="module")
def ckpts(tiny_models, tmp_path_factory):
    """Lazily quantized tiny checkpoints, keyed by (family, method, bits, group_size, sym, extra)."""
    root, cache = tmp_path_factory.mktemp("interop"), {}

    def get(family="llama", bits=4, group_size=32, sym=True, method="rtn", **kw):
        key = (family, method, bits, group_size, sym, tuple(sorted(kw.items())))
        if key not in cache:
            out = root / f"ck{len(cache)}"
            lowbit.quantize(str(tiny_models[family]), method=method, bits=bits, group_size=group_size, sym=sym,
                            out=out, progress=False, **kw)
            cache[key] = out
        return cache[key]

    return get


def lowbit_logits(src, ids):
    model, _, _ = lowbit.load(src, device="cpu")
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


IDS = torch.randint(3, 150, (1, 48), generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- GPTQModel

@pytest.mark.parametrize("family,sym,bits", [(f, True, 4) for f in GPTQMODEL_FAMILIES]
                         + [("llama", False, 4), ("llama", False, 2), ("llama", True, 8)])
def test_gptqmodel_loads_the_default_gptq_export(family, sym, bits, ckpts, tmp_path):
    pytest.importorskip("gptqmodel")
    from gptqmodel import GPTQModel

    src = ckpts(family=family, sym=sym, bits=bits)
    report = export_gptq(src, tmp_path / "g")
    assert report["checkpoint_format"] == ("gptq" if sym else "gptq_v2")
    ref = lowbit_logits(src, IDS)
    m = GPTQModel.load(str(tmp_path / "g"), device="cpu")  # the client's defaults
    assert next(m.model.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        got = m.model(input_ids=IDS).logits.float()
    err, scale = float((got - ref).abs().max()), float(ref.abs().max())
    assert err <= 0.05 * scale, (family, sym, bits, err, scale)


def test_gptqmodel_fp16_torch_kernel_is_close(ckpts, tmp_path):
    pytest.importorskip("gptqmodel")
    from gptqmodel import BACKEND, GPTQModel

    src = ckpts(sym=False)
    export_gptq(src, tmp_path / "g")
    ref = lowbit_logits(src, IDS)
    m = GPTQModel.load(str(tmp_path / "g"), device="cpu", dtype=torch.float16, backend=BACKEND.TORCH)
    with torch.no_grad():
        got = m.model(input_ids=IDS).logits.float()
    assert float((got - ref).abs().max()) <= 0.01 * float(ref.abs().max())
    # the same tensors with v1 zero points are read one grid step off: a wrong format is visible
    export_gptq(src, tmp_path / "v1", checkpoint_format="gptq")
    qc_path = tmp_path / "v1" / "config.json"
    qc = json.loads(qc_path.read_text())
    qc["quantization_config"]["checkpoint_format"] = "gptq_v2"  # v1 tensors declared as v2
    qc_path.write_text(json.dumps(qc))
    bad = GPTQModel.load(str(tmp_path / "v1"), device="cpu", dtype=torch.float16, backend=BACKEND.TORCH)
    with torch.no_grad():
        wrong = bad.model(input_ids=IDS).logits.float()
    assert float((wrong - ref).abs().max()) > 0.05 * float(ref.abs().max())


def test_gptqmodel_refuses_asymmetric_v1_from_other_tools(ckpts, tmp_path):
    """Why asymmetric grids default to gptq_v2: GPTQModel refuses sym=False v1 not made by itself."""
    pytest.importorskip("gptqmodel")
    from gptqmodel import GPTQModel

    export_gptq(ckpts(sym=False), tmp_path / "v1", checkpoint_format="gptq")
    with pytest.raises(ValueError, match="sym=False"):
        GPTQModel.load(str(tmp_path / "v1"), device="cpu")


def test_gptq_refuses_group_sizes_gptqmodel_lacks(ckpts, tmp_path):
    with pytest.raises(LowbitError, match="group sizes 16, 32, 64.*GPTQModel's kernels"):
        export_gptq(ckpts(group_size=8), tmp_path / "g")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- compressed-tensors

@pytest.mark.parametrize("family", ["llama", "qwen2", "opt"])
def test_transformers_loads_the_compressed_tensors_export(family, ckpts, tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    src = ckpts(family=family)
    report = export_compressed_tensors(src, tmp_path / "c")
    assert report["groups"] == [{"bits": 4, "sym": True, "group_size": 32, "layers": 12 if family == "opt" else 14}]
    qc = json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed" and "lm_head" in qc["ignore"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "c", dtype=torch.float32).eval()
    assert type(model).__name__.endswith("ForCausalLM")
    with torch.no_grad():
        got = model(input_ids=IDS).logits.float()
    assert torch.allclose(got, lowbit_logits(src, IDS), atol=1e-4, rtol=0)


@pytest.mark.parametrize("bits", [4, 8])
def test_compressed_tensors_asymmetric_reads_back_through_the_library(bits, ckpts, tmp_path):
    """Asymmetric grids: the packed tensors decompress, by the library's own model-free reader, to
    lowbit's weights ``s·(q − z)`` up to the fp16 rounding of that product (the reader multiplies in the
    scale's dtype, fp16: relative error ≤ 2^-11); transformers' defaults cannot load asymmetric pack-quantized
    checkpoints (see check.py)."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.entrypoints.convert import CompressedTensorsDequantizer, convert_checkpoint
    from safetensors.torch import load_file

    src = ckpts(sym=False, bits=bits)
    export_compressed_tensors(src, tmp_path / "c")
    stored = load_file(str(tmp_path / "c" / "model.safetensors"))
    assert stored["model.layers.0.mlp.down_proj.weight_zero_point"].shape == (64 * bits // 32, 3)  # packed (m·b/32, G)
    convert_checkpoint(str(tmp_path / "c"), str(tmp_path / "d"),
                       CompressedTensorsDequantizer(str(tmp_path / "c"), dtype=torch.float32), max_workers=1,
                       device="cpu")
    dense = load_file(str(tmp_path / "d" / "model.safetensors"))
    model, _, _ = lowbit.load(src, device="cpu")
    from lowbit.packed.qlinear import QuantLinear

    n = 0
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            ref = mod.packed.dequantize().float()
            assert torch.equal(dense[f"{name}.weight"], ref.half().float()), name  # = fp16(s·(q − z))
            assert ((dense[f"{name}.weight"] - ref).abs() <= ref.abs() * 2.0 ** -11).all(), name
            n += 1
    assert n == 14


def _fix_meta_zero_point(monkeypatch):
    """Apply, in-process, the fix of the upstream bug (compressed-tensors 0.20.1, ``pack_quantized/base.py:83-91``):
    on the meta device give ``weight_zero_point`` the packed shape ``(⌈m·b/32⌉, G)`` int32 that its real branch
    writes."""
    import math

    from compressed_tensors.compressors import PackedQuantizationCompressor as P

    compress = P.compress.__func__

    def fixed(cls, state_dict, scheme):
        out = compress(cls, state_dict, scheme)
        zp = out.get("weight_zero_point")
        if zp is not None and zp.device.type == "meta":
            out["weight_zero_point"] = torch.empty(math.ceil(zp.shape[0] * scheme.weights.num_bits / 32), zp.shape[1],
                                                   dtype=torch.int32, device="meta")
        return out

    monkeypatch.setattr(P, "compress", classmethod(fixed))


@pytest.mark.parametrize("bits", [4, 8])
def test_asymmetric_export_loads_with_transformers_defaults_once_the_upstream_bug_is_fixed(bits, ckpts, tmp_path,
                                                                                          monkeypatch):
    """The asymmetric file is what transformers reads: with compressed-tensors' meta-device zero-point shape
    fixed (nothing else changed) its default load gives lowbit's logits."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    src = ckpts(sym=False, bits=bits)
    export_compressed_tensors(src, tmp_path / "c")
    _fix_meta_zero_point(monkeypatch)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "c", dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(input_ids=IDS).logits.float()
    assert torch.allclose(got, lowbit_logits(src, IDS), atol=1e-4, rtol=0)


@pytest.mark.xfail(strict=True, raises=RuntimeError,
                   reason="upstream: compressed-tensors 0.20.1 leaves weight_zero_point unpacked on the meta device "
                          "(pack_quantized/base.py:83-91), so transformers 5.24 stops at a size mismatch; when this "
                          "passes, lowbit export --check can load asymmetric exports with the defaults")
def test_transformers_defaults_load_the_asymmetric_export(ckpts, tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    src = ckpts(sym=False)
    export_compressed_tensors(src, tmp_path / "c")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "c", dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(input_ids=IDS).logits.float()
    assert torch.allclose(got, lowbit_logits(src, IDS), atol=1e-4, rtol=0)


@pytest.mark.parametrize("bits", [4, 8])
def test_transformers_dequantize_reads_the_asymmetric_export(bits, ckpts, tmp_path):
    """What ``--check`` uses for asymmetric grids: every weight is fp16(s·(q − z)) of lowbit's grid."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from lowbit.packed.qlinear import QuantLinear

    src = ckpts(sym=False, bits=bits)
    export_compressed_tensors(src, tmp_path / "c")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "c", dtype=torch.float32,
                                                 quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    ours, _, _ = lowbit.load(src, device="cpu")
    qlinears = {name: mod for name, mod in ours.named_modules() if isinstance(mod, QuantLinear)}
    assert len(qlinears) == 14
    for name, mod in qlinears.items():
        assert torch.equal(model.get_submodule(name).weight, mod.packed.dequantize().float().half().float()), name
    with torch.no_grad():
        got = model(input_ids=IDS).logits.float()
    ref = lowbit_logits(src, IDS)
    assert float((got - ref).abs().max()) <= 0.002 * float(ref.abs().max())


def test_compressed_tensors_refusals(ckpts, tmp_path, tiny_text):
    pytest.importorskip("compressed_tensors")
    with pytest.raises(LowbitError, match="supports 4/8 bits .*vLLM.*has 3"):
        export_compressed_tensors(ckpts(bits=3), tmp_path / "a")
    with pytest.raises(LowbitError, match="partial last group"):
        export_compressed_tensors(ckpts(group_size=64), tmp_path / "b")
    src = ckpts(method="gptq", act_order=True, static_groups=False, source=str(tiny_text), nsamples=8, seqlen=64)
    with pytest.raises(LowbitError, match="permuted order.*quantize with static groups"):
        export_compressed_tensors(src, tmp_path / "c")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- GGUF: the F32 copy --check also scores

@pytest.mark.parametrize("sym", [True, False])
def test_gguf_as_f32_holds_the_files_weights(sym, ckpts, tmp_path):
    """Every tensor F32, the metadata kept, and transformers' GGUF reader (its own dequantizer) gives the same
    logits from the copy as from the quantized file; for the bit-exact Q4_0 those are lowbit's own."""
    import gguf
    from transformers import AutoModelForCausalLM

    src = ckpts(sym=sym)
    export_gguf(src, tmp_path / "q.gguf")
    gguf_as_f32(tmp_path / "q.gguf", tmp_path / "f.gguf")
    q, f = gguf.GGUFReader(str(tmp_path / "q.gguf")), gguf.GGUFReader(str(tmp_path / "f.gguf"))
    assert ("Q4_0" if sym else "Q4_1") in {t.tensor_type.name for t in q.tensors}
    assert {t.tensor_type.name for t in f.tensors} == {"F32"}
    assert [(t.name, list(t.shape)) for t in f.tensors] == [(t.name, list(t.shape)) for t in q.tensors]
    assert f.fields["general.file_type"].contents() == gguf.LlamaFileType.ALL_F32

    def meta(r):
        return {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.") and k != "general.file_type"}

    assert meta(f) == meta(q)

    def logits(name):
        m = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=name, dtype=torch.float32).eval()
        with torch.no_grad():
            return m(input_ids=IDS).logits.float()

    quantized, copy = logits("q.gguf"), logits("f.gguf")
    assert float((copy - quantized).abs().max()) <= 1e-5 * float(quantized.abs().max())
    if sym:
        assert torch.allclose(copy, lowbit_logits(src, IDS), atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def wide_q41(tmp_path_factory):
    """A 2-block model llama.cpp can tokenize (byte-level BPE with merges), RTN w4g32 asymmetric -> Q4_1."""
    from helpers import build_wide

    root = tmp_path_factory.mktemp("wide")
    m = build_wide(root / "m", "llama")
    lowbit.quantize(str(m), method="rtn", bits=4, group_size=32, sym=False, out=root / "q", progress=False)
    export_gguf(root / "q", root / "q.gguf")
    return root


@pytest.mark.skipif(llama_perplexity_bin() is None, reason="llama.cpp's llama-perplexity is not on PATH")
@pytest.mark.e2e
def test_check_scores_the_gguf_and_its_f32_copy_in_llama_cpp(wide_q41):
    """llama.cpp on the F32 copy (float32 arithmetic) agrees with lowbit to within 0.05 %; on the Q4_1 file
    itself (activations rounded to Q8_1 blocks) the difference is llama.cpp's, reported as ``vs_f32_pct``."""
    rep = check_export(wide_q41 / "q", wide_q41 / "q.gguf", "gguf", text=str(wide_q41 / "m" / "calib.txt"),
                       windows=4, seqlen=128)
    rows = {c["client"]: c for c in rep["clients"]}
    assert list(rows) == ["transformers-gguf", "llama.cpp", "llama.cpp-f32"], rep
    q, f = rows["llama.cpp"], rows["llama.cpp-f32"]
    assert q["windows"] == f["windows"] == 4 and q["lowbit_ppl"] == f["lowbit_ppl"]
    assert abs(f["diff_pct"]) <= 0.05, f
    assert q["vs_f32_pct"] == pytest.approx(100 * (q["ppl"] - f["ppl"]) / f["ppl"])
    assert abs(q["diff_pct"]) <= q["tolerance_pct"] == 0.5 and f["tolerance_pct"] == 0.2 and rep["ok"]


@pytest.mark.skipif(shutil.which("llama-quantize") is None, reason="llama.cpp's llama-quantize is not on PATH")
@pytest.mark.e2e
def test_gguf_as_f32_equals_llama_cpps_own_dequantization(wide_q41, tmp_path):
    """ggml's own dequantizer (``llama-quantize --allow-requantize … F32``) writes the same F32 tensors."""
    import gguf
    import numpy as np

    gguf_as_f32(wide_q41 / "q.gguf", tmp_path / "ours.gguf")
    r = subprocess.run(["llama-quantize", "--allow-requantize", str(wide_q41 / "q.gguf"), str(tmp_path / "ggml.gguf"),
                        "F32"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    ours, ggml = gguf.GGUFReader(str(tmp_path / "ours.gguf")), gguf.GGUFReader(str(tmp_path / "ggml.gguf"))
    theirs = {t.name: t for t in ggml.tensors}
    assert sorted(theirs) == sorted(t.name for t in ours.tensors)
    for t in ours.tensors:
        assert theirs[t.name].tensor_type.name == "F32" and np.array_equal(t.data, theirs[t.name].data), t.name


# ---------------------------------------------------------------- lowbit export --check

def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "lowbit", "export", *args], capture_output=True, text=True,
                          timeout=900, env=env)


@pytest.mark.parametrize("fmt,sym", [("gptq", False), ("compressed-tensors", True), ("compressed-tensors", False),
                                     ("gguf", True)])
@pytest.mark.e2e
def test_cli_check_prints_each_clients_perplexity(fmt, sym, ckpts, tmp_path, tiny_text):
    pytest.importorskip({"gptq": "gptqmodel", "compressed-tensors": "compressed_tensors", "gguf": "gguf"}[fmt])
    out = tmp_path / ("m.gguf" if fmt == "gguf" else "x")
    env = {k: v for k, v in os.environ.items() if k != "LOWBIT_LLAMA_CPP_BIN"}
    # no llama-perplexity here: llama.cpp cannot read the tiny BPE tokenizer's GGUF (no merges); the slow test runs it
    env["PATH"] = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep)
                                  if not os.path.exists(os.path.join(d, "llama-perplexity")))
    r = _cli(str(ckpts(sym=sym)), "--format", fmt, "--out", str(out), "--check", "--text", str(tiny_text),
             "--check-windows", "2", "--json", str(tmp_path / "r.json"), env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["format"] == fmt and rep["out"] == str(out) and rep["check"]["windows"] == 2
    ran = [c for c in rep["check"]["clients"] if "ppl" in c]
    assert ran and all(abs(c["diff_pct"]) <= 0.5 for c in ran), rep["check"]
    assert rep["check"]["ok"] is True
    for c in ran:
        assert c["lowbit_ppl"] == pytest.approx(rep["check"]["lowbit_ppl"])
        assert f"check {c['client']}: ppl {c['ppl']:.4f}" in r.stdout
    if fmt == "gguf":
        assert [c["client"] for c in rep["check"]["clients"]] == ["transformers-gguf", "llama.cpp", "llama.cpp-f32"]
        assert all("skipped" in c for c in rep["check"]["clients"][1:]) and "llama.cpp: skipped" in r.stdout


@pytest.mark.e2e
def test_cli_check_bad_input(ckpts, tmp_path):
    src = str(ckpts())
    for args, msg in [(["--format", "compressed-tensors", "--checkpoint-format", "gptq"], "gptq only"),
                      (["--format", "gptq", "--check", "--check-windows", "0"], "--check-windows must be >= 1")]:
        r = _cli(src, "--out", str(tmp_path / "o"), *args)
        assert r.returncode == 2 and r.stderr.startswith("lowbit: error:") and msg in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- the demo model (slow tier)

@pytest.fixture(scope="module")
def demo_rtn(tmp_path_factory):
    """The demo model, RTN w4g64 asymmetric (data-free; not the lossless w4g32 asym grid)."""
    out = tmp_path_factory.mktemp("demo") / "rtn-w4g64"
    lowbit.quantize("smollm2-135m", method="rtn", bits=4, group_size=64, sym=False, out=out, progress=False)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors", "gguf"])
def test_demo_exports_agree_with_lowbit_within_0_2_percent(fmt, demo_rtn, tmp_path):
    pytest.importorskip({"gptq": "gptqmodel", "compressed-tensors": "compressed_tensors", "gguf": "gguf"}[fmt])
    out = tmp_path / ("m.gguf" if fmt == "gguf" else "x")
    {"gptq": export_gptq, "compressed-tensors": export_compressed_tensors, "gguf": export_gguf}[fmt](demo_rtn, out)
    rep = check_export(demo_rtn, out, fmt, windows=4)
    print(json.dumps(rep, indent=1))  # the numbers, for the record (pytest -rA shows them)
    ran = [c for c in rep["clients"] if "ppl" in c]
    assert ran, rep
    for c in ran:  # 0.2 %; llama.cpp on the quantized file 0.5 % (its 8-bit activation blocks: the same file's
        # weights in F32, client llama.cpp-f32, are held to 0.2 %; see check.py and BENCHMARKS.md)
        assert abs(c["diff_pct"]) <= (0.5 if c["client"] == "llama.cpp" else 0.2), c
    assert rep["ok"] and 10 < rep["lowbit_ppl"] < 100
