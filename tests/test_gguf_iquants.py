"""GGUF's I-quants (lowbit.gguf.iquants): bytes against the gguf package's dequantizer, the grids' sign rules,
the nearest-point search against brute force, and GPTQ/FOEM (BlockLDLQ on the vector grids) beating RTN."""
import numpy as np
import pytest
import torch
from helpers import build_wide, down_proj_stats

from lowbit.config import QuantConfig
from lowbit.gguf import TYPES
from lowbit.gguf.solve import solve
from lowbit.solvers.loss import proxy_loss

IQ = ("IQ4_XS", "IQ3_XXS", "IQ3_S", "IQ2_XXS", "IQ2_XS", "IQ2_S")
VECTOR = IQ[1:]


def qtype(name):
    import gguf

    return gguf.GGMLQuantizationType[name]


def random_fields(name, m, n, gen):
    """Fields with every stored bit random (the parity types: the eighth sign of 8 the parity of the seven)."""
    c = TYPES[name].codec
    f = c.fields(m, n, "cpu")
    f["d"] = (torch.randn(f["d"].shape, generator=gen) * 0.01).half().float()
    if name == "IQ4_XS":
        f["sc"] = torch.randint(-32, 32, f["sc"].shape, generator=gen)
        f["codes"] = torch.randint(0, 16, (m, n), generator=gen)
        return f
    f["ls"] = torch.randint(0, 16, f["ls"].shape, generator=gen)
    f["idx"] = torch.randint(0, c.grid.shape[0], f["idx"].shape, generator=gen)
    neg = torch.randint(0, 2, (m, n), generator=gen)
    if c.parity:
        v = neg.view(m, -1, 8)
        v[..., 7] = v[..., :7].sum(-1) % 2
    f["codes"] = neg
    return f


def test_table_sizes_and_grids():
    import gguf

    for name in IQ:
        t = TYPES[name]
        assert gguf.GGML_QUANT_SIZES[qtype(name)] == (t.block, t.type_size), name
        assert t.fallback == "IQ4_NL"
    dims = {n: tuple(TYPES[n].codec.grid.shape) for n in VECTOR}
    assert dims == {"IQ3_XXS": (256, 4), "IQ3_S": (512, 4), "IQ2_XXS": (256, 8), "IQ2_XS": (512, 8),
                    "IQ2_S": (1024, 8)}
    assert TYPES["IQ4_XS"].bits_per_weight == 4.25 and TYPES["IQ2_XXS"].bits_per_weight == 2.0625


@pytest.mark.parametrize("name", IQ)
def test_pack_is_what_the_gguf_dequantizer_reads(name):
    import gguf

    gen = torch.Generator().manual_seed(1)
    t = TYPES[name]
    f = random_fields(name, 5, 512, gen)
    b = t.codec.pack(f)
    assert b.dtype == torch.uint8 and tuple(b.shape) == (5, 2 * t.type_size)
    np.testing.assert_array_equal(gguf.quants.dequantize(b.numpy(), qtype(name)), t.codec.decode(f).numpy())
    back = t.codec.unpack(b)
    assert set(back) == set(f) and all(torch.equal(back[k], f[k]) for k in f)


@pytest.mark.parametrize("name", VECTOR)
def test_rtn_obeys_the_sign_rule_and_round_trips(name):
    """Quantized fields survive pack/unpack unchanged: for the parity types this holds only if every 8 weights
    got an even number of minus signs (unpack recomputes the eighth sign from the seven)."""
    gen = torch.Generator().manual_seed(2)
    W = torch.randn(8, 256, generator=gen)
    W[0] = 0.0
    c = TYPES[name].codec
    f = c.quantize(W)
    back = c.unpack(c.pack(f))
    assert all(torch.equal(back[k], f[k]) for k in f), name
    assert torch.equal(c.decode(f)[0], torch.zeros(256))
    if c.parity:
        assert (f["codes"].view(8, -1, 8).sum(-1) % 2 == 0).all()


@pytest.mark.parametrize("name", VECTOR)
def test_nearest_point_against_brute_force(name):
    """Free signs (IQ2_S, IQ3_S): the exact weighted optimum over the whole grid.  Parity grids: never worse than
    the naive rule (nearest point for |x|, then flip the cheapest sign), and usually strictly better."""
    c = TYPES[name].codec
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 8, generator=gen)
    imp = torch.rand(8, generator=gen) + 0.1
    delta = torch.full((64, 1), 0.12)
    idx, neg, v = c.encode(x, delta, imp)
    ours = (imp * (x - 0.12 * v) ** 2).sum(1)
    G = c.grid
    t = x.abs() / 0.12
    D = c.dim
    # unconstrained cost of every point per half (the signs of x), summed over the halves' best
    halves = [(imp[h * D:(h + 1) * D] * (t[:, None, h * D:(h + 1) * D] - G[None]) ** 2).sum(-1) for h in range(8 // D)]
    best_free = sum(h.min(1).values for h in halves) * 0.12 ** 2
    if not c.parity:
        torch.testing.assert_close(ours, best_free, rtol=1e-5, atol=1e-6)
        return
    odd = (x < 0).sum(1) % 2 == 1
    torch.testing.assert_close(ours[~odd], best_free[~odd], rtol=1e-5, atol=1e-6)
    pts = [h.argmin(1) for h in halves]
    g = torch.cat([G[p] for p in pts], 1)
    naive = best_free + odd * (4 * imp * t * g).min(1).values * 0.12 ** 2
    assert (ours <= naive + 1e-6).all() and (ours[odd] < naive[odd] - 1e-9).any()
    assert (neg.sum(1) % 2 == 0).all()


@pytest.mark.parametrize("name", IQ)
def test_rtn_error_is_small_for_its_bits(name):
    gen = torch.Generator().manual_seed(4)
    W = torch.randn(16, 512, generator=gen)
    packed, _ = solve(W, None, QuantConfig(method="rtn", gguf_type=name))
    assert packed.gguf_type == name
    rel = float(((packed.dequantize() - W) ** 2).mean() / (W ** 2).mean())
    bound = {"IQ4_XS": 0.008, "IQ3_S": 0.025, "IQ3_XXS": 0.04, "IQ2_S": 0.09, "IQ2_XS": 0.1, "IQ2_XXS": 0.13}[name]
    assert rel < bound, (name, rel)


@pytest.fixture(scope="module")
def captured(tmp_path_factory):
    path = build_wide(tmp_path_factory.mktemp("wide") / "llama", "llama")
    return down_proj_stats(path, (path / "calib.txt").read_text())


@pytest.mark.parametrize("name,act_order", [("IQ4_XS", True), ("IQ4_XS", False), ("IQ2_XS", True),
                                            ("IQ2_XS", False), ("IQ3_XXS", False), ("IQ2_S", False)])
@pytest.mark.e2e
def test_gptq_and_foem_beat_rtn_on_the_grid(captured, name, act_order):
    W, H = captured
    rtn, _ = solve(W, H, QuantConfig(method="rtn", gguf_type=name))
    rtn_loss = proxy_loss(W, rtn.dequantize(), H)
    for method in ("gptq", "foem"):
        packed, info = solve(W, H, QuantConfig(method=method, gguf_type=name, act_order=act_order))
        assert packed.gguf_type == name
        assert info["loss"] == pytest.approx(proxy_loss(W, packed.dequantize(), H), rel=1e-6)
        assert info["loss"] < 0.85 * rtn_loss, (name, method, act_order, info["loss"], rtn_loss)
        f = TYPES[name].codec.unpack(packed.blocks)
        assert torch.equal(TYPES[name].codec.pack(f), packed.blocks)


def test_rows_the_super_block_does_not_divide_fall_back_to_iq4_nl():
    W = torch.randn(4, 96) * 0.02
    packed, info = solve(W, None, QuantConfig(method="rtn", gguf_type="IQ2_XS"))
    assert packed.gguf_type == "IQ4_NL" and info["gguf_fallback"].endswith("-> IQ4_NL")
