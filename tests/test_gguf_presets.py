"""llama.cpp's presets (lowbit.gguf.presets): the per-tensor types lowbit picks are the ones llama-quantize itself
writes for the same model, with and without an importance matrix; names and solve() through a layer's name."""
import subprocess

import pytest
import torch
from helpers import build_wide, llama_cpp_bin

import lowbit
from lowbit.config import QuantConfig
from lowbit.errors import LowbitError
from lowbit.export import export_gguf
from lowbit.gguf import canonical, preset_type
from lowbit.gguf.presets import available, category, layer_index, more_bits
from lowbit.gguf.solve import solve

LAYERS = 8
NO_IMATRIX = ["MOSTLY_Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "MOSTLY_Q6_K",
              "MOSTLY_IQ4_XS", "MOSTLY_IQ4_NL", "MOSTLY_Q4_0", "MOSTLY_Q8_0", "IQ3_M", "MOSTLY_IQ3_S"]
WITH_IMATRIX = ["MOSTLY_IQ2_XXS", "MOSTLY_IQ2_XS", "MOSTLY_IQ2_S", "IQ2_M", "MOSTLY_IQ3_XXS", "IQ3_XS", "Q2_K_S", "MOSTLY_Q4_0",
                "MOSTLY_IQ4_XS"]


def test_names():
    assert canonical("q4_k_m") == "Q4_K_M" == canonical("MOSTLY_Q4_K_M")
    assert canonical("iq2_xs") == "IQ2_XS"                # the type: one type everywhere (llama-quantize --pure)
    assert canonical("mostly_iq2_xs") == "MOSTLY_IQ2_XS"  # the preset of the same name
    with pytest.raises(LowbitError, match=r"--gguf-type Q7_K_M: choose one of .*Q4_K_M"):
        canonical("Q7_K_M")
    assert set(NO_IMATRIX + WITH_IMATRIX) <= set(available())
    assert category("model.layers.3.mlp.down_proj") == "FFN_DOWN" == category("blk.3.ffn_down.weight")
    assert category("model.layers.0.self_attn.o_proj") == "ATTN_OUTPUT" == category("blk.0.attn_output.weight")
    assert category("lm_head") == "OUTPUT" and category("model.embed_tokens") == "TOKEN_EMBD"
    assert layer_index("model.layers.12.self_attn.v_proj") == 12 and layer_index("lm_head") is None
    # use_more_bits on 30 layers: the first and last eighth and every third between
    assert [i for i in range(30) if more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]


def test_solve_applies_the_preset_by_layer_name():
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(64, 512, generator=gen) * 0.02
    cfg = QuantConfig(method="rtn", gguf_type="Q4_K_M")
    got = {i: solve(W, None, cfg, name=f"model.layers.{i}.mlp.down_proj", n_layers=LAYERS)[0].gguf_type
           for i in range(LAYERS)}
    assert got == {0: "Q6_K", 1: "Q4_K", 2: "Q4_K", 3: "Q6_K", 4: "Q4_K", 5: "Q4_K", 6: "Q6_K", 7: "Q6_K"}
    assert solve(W, None, cfg, name="model.layers.1.mlp.up_proj", n_layers=LAYERS)[0].gguf_type == "Q4_K"
    with pytest.raises(LowbitError, match="number of layers"):  # a preset's layer rules need them
        solve(W, None, cfg, name="model.layers.1.mlp.up_proj")
    # the row-length fallback still applies after the preset (576 columns: Q6_K -> Q8_0)
    p, info = solve(W[:, :288].repeat(1, 2), None, cfg, name="model.layers.0.mlp.down_proj", n_layers=LAYERS)
    assert p.gguf_type == "Q8_0" and "-> Q8_0" in info["gguf_fallback"]


@pytest.fixture(scope="module")
def q8_gguf(tmp_path_factory):
    """An 8-block 256-wide llama, exported as Q8_0 (llama-quantize requantizes it to each preset)."""
    root = tmp_path_factory.mktemp("presets")
    path = build_wide(root / "m", "llama", num_hidden_layers=LAYERS)
    lowbit.quantize(str(path), method="rtn", gguf_type="Q8_0", out=root / "q8", progress=False)
    export_gguf(root / "q8", root / "q8.gguf")
    return root / "q8.gguf", path / "calib.txt"


def _llama_quantize_types(src, dst, preset, imatrix=None):
    import gguf

    cmd = [llama_cpp_bin("llama-quantize"), "--allow-requantize"] + (["--imatrix", str(imatrix)] if imatrix else [])
    r = subprocess.run(cmd + [str(src), str(dst), preset.removeprefix("MOSTLY_")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return {t.name: (t.tensor_type.name, tuple(int(x) for x in t.shape[::-1]))
            for t in gguf.GGUFReader(str(dst)).tensors if "norm" not in t.name}


def _check(types, preset, imatrix):
    for name, (theirs, shape) in types.items():
        ours = preset_type(preset, name, None, LAYERS, shape, imatrix=imatrix, tied=True)
        assert ours == theirs, (preset, name, ours, theirs)


@pytest.mark.skipif(llama_cpp_bin("llama-quantize") is None, reason="llama.cpp's llama-quantize is not built")
@pytest.mark.parametrize("preset", NO_IMATRIX)
@pytest.mark.e2e
def test_types_are_llama_quantizes_without_imatrix(q8_gguf, tmp_path, preset):
    _check(_llama_quantize_types(q8_gguf[0], tmp_path / "o.gguf", preset), preset, imatrix=False)


@pytest.mark.skipif(llama_cpp_bin("llama-imatrix") is None, reason="llama.cpp's llama-imatrix is not built")
@pytest.mark.e2e
def test_types_are_llama_quantizes_with_imatrix(q8_gguf, tmp_path):
    src, text = q8_gguf
    r = subprocess.run([llama_cpp_bin("llama-imatrix"), "-m", str(src), "-f", str(text), "-c", "64", "--chunks", "4",
                        "-t", "2", "-o", str(tmp_path / "imatrix.gguf")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    for preset in WITH_IMATRIX:
        _check(_llama_quantize_types(src, tmp_path / "o.gguf", preset, tmp_path / "imatrix.gguf"), preset, imatrix=True)


def test_quantize_with_a_preset_records_the_per_tensor_types(q8_gguf, tmp_path):
    """Through the API (the data-free walk passes each layer's name and the model's block count): the types in
    lowbit.json are the preset's, layer by layer, and the checkpoint exports to a GGUF holding those types."""
    import gguf

    model = q8_gguf[1].parent
    res = lowbit.quantize(str(model), method="rtn", gguf_type="Q4_K_M", out=tmp_path / "q", progress=False)
    layers = res.meta["layers"]
    for name, rec in layers.items():
        if rec.get("role"):  # the embedding (a preset's default --embedding-type auto: tests/test_gguf_embedding.py)
            continue
        i = int(name.split(".")[2])
        assert rec["gguf_type"] == preset_type("Q4_K_M", name, i, LAYERS, tuple(res.model.get_submodule(name).packed.shape),
                                               imatrix=False, tied=True), name
    assert {"Q4_K", "Q6_K"} <= {rec["gguf_type"] for rec in layers.values()}
    export_gguf(tmp_path / "q", tmp_path / "q.gguf")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "q.gguf").tensors}
    assert types["blk.0.ffn_down.weight"] == layers["model.layers.0.mlp.down_proj"]["gguf_type"]
