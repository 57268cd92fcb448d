"""The GGUF type table (lowbit.gguf): byte layouts against the gguf package's dequantizer, RTN against
gguf.quants.quantize, llama.cpp's fallback rule, and GPTQ/FOEM on the grids beating RTN on real activations."""
import numpy as np
import pytest
import torch
from helpers import down_proj_stats

from lowbit.config import QuantConfig
from lowbit.errors import LowbitError
from lowbit.gguf import QUANT_TYPES, TYPES, resolve
from lowbit.gguf.solve import solve
from lowbit.packed.ggufw import GGUFWeight
from lowbit.packed.qweight import FormatError, from_tensors
from lowbit.solvers.loss import proxy_loss

LEGACY = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
KQUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
IQUANTS = ("IQ4_XS", "IQ3_XXS", "IQ3_S", "IQ2_XXS", "IQ2_XS", "IQ2_S")  # tested in test_gguf_iquants.py
SCALAR = [n for n in TYPES if n not in IQUANTS or n == "IQ4_XS"]


def qtype(name):
    import gguf

    return gguf.GGMLQuantizationType[name]


def random_fields(t, m, n, gen):
    """Fields with every stored bit random (codes and integer scales over their whole ranges)."""
    c = t.codec
    f = {}
    for k, v in c.fields(m, n, "cpu").items():
        if k in ("id", "lo"):  # the solver's rounding state, never stored
            continue
        if k == "codes":
            hi = 2 ** 16 if t.name == "F16" else c.n_codes
            v = torch.randint(0, hi, v.shape, generator=gen)
            if t.name == "F16":  # fp16 bit patterns without inf/nan
                v = v.to(torch.int16)
                v = torch.where((v.view(torch.int16) & 0x7C00) == 0x7C00, torch.zeros_like(v), v).long()
        elif v.dtype == torch.int64:  # integer sub-block scales / mins
            lo = getattr(c, "smin", 0) if k == "sc" else 0
            v = torch.randint(lo, c.smax + 1, v.shape, generator=gen)
        else:  # fp16 super-block scales / minimums
            v = (torch.randn(v.shape, generator=gen) * 0.01).half().float()
        f[k] = v
    return f


def test_table_matches_ggml_sizes():
    import gguf

    for name, t in TYPES.items():
        assert gguf.GGML_QUANT_SIZES[qtype(name)] == (t.block, t.type_size), name
    assert TYPES["Q4_K"].bits_per_weight == 4.5 and TYPES["Q2_K"].bits_per_weight == 2.625
    assert TYPES["Q6_K"].bits_per_weight == 6.5625 and TYPES["IQ4_NL"].bits_per_weight == 4.5
    assert "F16" not in QUANT_TYPES and set(LEGACY + KQUANTS + IQUANTS + ("IQ4_NL",)) == set(QUANT_TYPES)


@pytest.mark.parametrize("name", SCALAR)
def test_pack_is_what_the_gguf_dequantizer_reads(name):
    """Random fields -> our bytes -> gguf's dequantizer = our decode, bit for bit; unpack inverts pack."""
    import gguf

    t = TYPES[name]
    gen = torch.Generator().manual_seed(1)
    n = 2 * 256
    f = random_fields(t, 6, n, gen)
    b = t.codec.pack(f)
    assert b.dtype == torch.uint8 and tuple(b.shape) == (6, n // t.block * t.type_size)
    theirs = gguf.quants.dequantize(b.numpy(), qtype(name))
    ours = t.codec.decode(f).numpy()
    np.testing.assert_array_equal(theirs, ours)
    back = t.codec.unpack(b)
    assert set(back) == set(f)
    for k in f:
        assert torch.equal(back[k], f[k]), (name, k)


@pytest.mark.parametrize("name", LEGACY)
def test_rtn_is_byte_identical_to_gguf_quantize(name):
    import gguf

    gen = torch.Generator().manual_seed(2)
    W = torch.randn(16, 256, generator=gen) * 0.03
    W[0] = 0.0                                     # an all-zero block row
    W[1, :32] = 0.01                               # a constant block
    W[2, :64] = torch.tensor([0.5, -0.5] * 32)     # ties of magnitude (Q4_0 takes the first)
    W[3] = torch.round(W[3] * 1000) / 1000         # values on a coarse lattice (rounding ties)
    packed, info = solve(W, None, QuantConfig(method="rtn", gguf_type=name))
    ref = gguf.quants.quantize(W.numpy(), qtype(name))
    np.testing.assert_array_equal(packed.blocks.numpy(), ref)
    assert np.isnan(info["loss"])


@pytest.mark.parametrize("name", [n for n in QUANT_TYPES if n in SCALAR])
def test_rtn_error_is_small_for_its_bits(name):
    """Relative MSE of RTN on Gaussian weights falls with the bits per weight (a sanity floor per type)."""
    gen = torch.Generator().manual_seed(3)
    W = torch.randn(32, 512, generator=gen)
    packed, _ = solve(W, None, QuantConfig(method="rtn", gguf_type=name))
    rel = float(((packed.dequantize() - W) ** 2).mean() / (W ** 2).mean())
    bound = {2.625: 0.12, 3.4375: 0.04}.get(TYPES[name].bits_per_weight, 0.012)
    assert rel < bound, (name, rel)


def test_fallback_follows_llama_cpp():
    assert resolve("Q4_K", 512) == (TYPES["Q4_K"], None)
    for asked, got in (("Q2_K", "Q4_0"), ("Q3_K", "Q4_0"), ("Q4_K", "Q5_0"), ("Q5_K", "Q5_1"), ("Q6_K", "Q8_0")):
        t, why = resolve(asked, 576)
        assert t.name == got and why == f"ncols 576 not divisible by 256 (required for {asked}) -> {got}"
    assert resolve("Q4_K", 40)[0].name == "F16" and resolve("Q4_0", 40)[0].name == "F16"
    assert resolve("IQ4_NL", 96) == (TYPES["IQ4_NL"], None)


def test_fallback_layer_reports_it_and_stores_the_fallback_type():
    W = torch.randn(8, 96) * 0.02
    packed, info = solve(W, None, QuantConfig(method="rtn", gguf_type="Q6_K"))
    assert packed.gguf_type == "Q8_0" and "-> Q8_0" in info["gguf_fallback"]
    W = torch.randn(8, 40) * 0.02
    packed, info = solve(W, None, QuantConfig(method="rtn", gguf_type="q4_k"))
    assert packed.gguf_type == "F16" and torch.equal(packed.dequantize(), W.half().float())


def test_config_refusals():
    with pytest.raises(LowbitError, match="gguf-type"):
        QuantConfig(method="gptq", gguf_type="Q7_K")
    with pytest.raises(LowbitError, match="I-quant vector grids"):  # quip takes only IQ2_*/IQ3_* (methods/quip.py)
        QuantConfig(method="quip", bits=2, gguf_type="Q4_K")
    with pytest.raises(LowbitError, match="static groups"):
        QuantConfig(method="gptq", gguf_type="Q4_K", static_groups=False)
    assert QuantConfig(gguf_type="q4_k").gguf_type == "Q4_K"
    assert "gguf_type" not in QuantConfig().to_json() and QuantConfig(gguf_type="Q4_K").to_json()["gguf_type"] == "Q4_K"


def test_packed_format_round_trip_and_validation():
    W = torch.randn(4, 256) * 0.02
    packed, _ = solve(W, None, QuantConfig(method="rtn", gguf_type="Q3_K"))
    again = from_tensors(packed.tensors(), packed.meta())
    assert isinstance(again, GGUFWeight) and torch.equal(again.dequantize(), packed.dequantize())
    assert packed.stored_bits() == 4 * 256 * TYPES["Q3_K"].bits_per_weight
    with pytest.raises(FormatError):
        from_tensors({"blocks": packed.blocks[:, :-1]}, packed.meta())
    with pytest.raises(FormatError):
        from_tensors(packed.tensors(), {**packed.meta(), "shape": [4, 200]})  # 200 is no multiple of 256


@pytest.fixture(scope="module")
def captured(tmp_path_factory):
    """(W, H) of the down_proj (512 inputs) of a tiny 256-wide llama, H from the inputs it sees on text."""
    from helpers import build_wide

    path = build_wide(tmp_path_factory.mktemp("wide") / "llama", "llama")
    return down_proj_stats(path, (path / "calib.txt").read_text())


@pytest.mark.parametrize("name", ["Q2_K", "Q3_K", "Q4_K", "Q6_K", "IQ4_NL", "Q4_0"])
def test_gptq_beats_rtn_on_the_grid(captured, name):
    W, H = captured
    rtn, _ = solve(W, H, QuantConfig(method="rtn", gguf_type=name))
    rtn_loss = proxy_loss(W, rtn.dequantize(), H)
    for act_order in (True, False):
        for method in ("gptq", "foem"):
            packed, info = solve(W, H, QuantConfig(method=method, gguf_type=name, act_order=act_order))
            assert packed.gguf_type == name
            assert info["loss"] == pytest.approx(proxy_loss(W, packed.dequantize(), H), rel=1e-6)
            assert info["loss"] < 0.9 * rtn_loss, (name, method, act_order, info["loss"], rtn_loss)


def test_gptq_values_are_the_stored_blocks(captured):
    """The engine's quantized columns are exactly what the stored bytes decode to (no drift between the two)."""
    W, H = captured
    for name in ("Q5_K", "Q3_K", "IQ4_NL", "Q8_0"):
        packed, _ = solve(W, H, QuantConfig(method="gptq", gguf_type=name, act_order=False))
        f = TYPES[name].codec.unpack(packed.blocks)
        again = TYPES[name].codec.pack(f)
        assert torch.equal(again, packed.blocks)
        assert torch.isfinite(packed.dequantize()).all()
