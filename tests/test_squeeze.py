"""Squeeze10: binary cells decode to two values per row-group, mask and bit accounting, PBAR ranks a
robust cell above a fragile one, save/load is exact (FIAS: tests/test_fias.py)."""
import copy

import pytest
import torch

import lowbit
from lowbit.calib.runner import quantize_blocks
from lowbit.config import QuantConfig
from lowbit.models.arch import resolve_spec
from lowbit.packed import bitpack
from lowbit.packed.mixed import MixedBinaryWeight
from lowbit.packed.qlinear import QuantLinear
from lowbit.packed.qweight import from_tensors
from lowbit.solvers import SOLVERS
from lowbit.solvers.loss import proxy_loss
from lowbit.solvers.squeeze import binarize, binarize_residual, binary_fit, cell_scores, choose_high, residual_fit



def squeeze(W, H, **kw):
    cfg = QuantConfig(method="squeeze", **kw)
    return SOLVERS[cfg.method](W, H, cfg)


def test_binary_cells_have_two_values_and_high_cells_a_grid(captured):  # noqa: F811
    W, H = captured
    qw, info = squeeze(W, H, group_size=32, binary_frac=0.75)
    Wq = qw.dequantize()
    high = qw.high_cells()
    m, G = high.shape
    assert int((~high).sum()) == round(0.75 * m * G)
    for i in range(m):
        for g in range(G):
            vals = Wq[i, g * 32:(g + 1) * 32].unique()
            assert len(vals) <= (2 if not high[i, g] else 16)
    assert info["binary_frac"] == pytest.approx(0.75, abs=1e-6)  # every cell is full here (96 = 3·32)


def test_bits_accounting_and_round_trip(captured):  # noqa: F811
    W, H = captured
    qw, _ = squeeze(W, H, group_size=32, binary_frac=0.8)
    m, n = qw.shape
    G = qw.n_groups
    kw = int(qw.high_cells()[:, torch.arange(n) // 32].sum())
    expect = (m * bitpack.packed_width(n, 1) + bitpack.packed_width(kw, 3) + bitpack.packed_width(m * G, 1)) * 32 \
        + 2 * m * G * 16
    assert qw.stored_bits() == expect
    assert abs(kw - 0.2 * m * n) <= 32  # ≈ 20 % of the weights keep 3 more bits
    back = from_tensors(qw.tensors(), qw.meta())
    assert isinstance(back, MixedBinaryWeight) and torch.equal(back.dequantize(), qw.dequantize())
    bad = dict(qw.tensors())
    bad["mask"] = torch.zeros_like(bad["mask"])
    with pytest.raises(ValueError, match="mask"):
        from_tensors(bad, qw.meta())


def test_pbar_ranks_robust_cell_above_fragile_one():
    g = torch.Generator().manual_seed(0)
    robust = torch.where(torch.rand(1, 16, generator=g) > 0.5, 1.0, -1.0) * 0.1  # already two values
    fragile = torch.randn(1, 16, generator=g) * 0.1
    quiet = torch.randn(1, 16, generator=g) * 0.1                                # spread, but inputs are tiny
    R = torch.cat([fragile, robust, quiet], dim=1)
    H = torch.diag(torch.cat([torch.ones(32), torch.full((16,), 1e-4)]))
    s = cell_scores(R, H, 16)
    assert s[0, 1] < s[0, 0] and s[0, 2] < s[0, 0]  # binarizing the fragile cell costs most
    assert choose_high(s, 2 / 3).tolist() == [[True, False, False]]
    mag = cell_scores(R, H, 16, "magnitude")  # magnitude cannot see the input statistics
    assert mag[0, 2] > 0.1 * mag[0, 0]


def test_more_binary_cells_cost_more(captured):  # noqa: F811
    W, H = captured
    losses = [squeeze(W, H, group_size=32, binary_frac=f)[1]["loss"] for f in (0.0, 0.5, 1.0)]
    assert losses[0] < losses[1] < losses[2]
    one_shot = squeeze(W, H, group_size=32, squeeze_staged=False)[1]["loss"]
    assert one_shot > 0


def test_residual_binarizer_matches_the_definition_and_beats_plain(captured):  # noqa: F811
    W, _ = captured
    w = W[:, :32].float()
    a1, mu, a2 = residual_fit(w)
    assert torch.equal(a1, (w - mu[:, None]).abs().mean(1).half().float())
    b1 = torch.where(w >= mu[:, None], 1.0, -1.0)
    r = w - mu[:, None] - a1[:, None] * b1
    assert torch.allclose(a2, r.abs().mean(1).half().float())
    v, t, u = binarize_residual(w, a1, mu, a2)
    assert torch.equal(v, (mu[:, None] + a1[:, None] * (2 * t - 1)) + a2[:, None] * (2 * u - 1))
    greedy = mu[:, None] + a1[:, None] * b1 + a2[:, None] * torch.where(r >= 0, 1.0, -1.0)
    ok = a2 <= a1  # there the nearest level is the sign-of-residual rule
    assert ok.any() and torch.allclose(v[ok], greedy[ok], atol=1e-6)
    assert ((v - w).abs() <= (greedy - w).abs() + 1e-6).all()
    plain = binarize(w, *binary_fit(w))
    assert (v - w).pow(2).sum() < 0.6 * (plain - w).pow(2).sum()


def test_residual_cells_have_four_values_and_lower_error(captured):  # noqa: F811
    W, H = captured
    qw, info = squeeze(W, H, group_size=32, binary_frac=0.75, binary_residual=True)
    plain, pinfo = squeeze(W, H, group_size=32, binary_frac=0.75)
    Wq = qw.dequantize()
    assert qw.binary_residual and not plain.binary_residual and qw.meta()["binary_residual"] is True
    high = qw.high_cells()
    m, G = high.shape
    assert int((~high).sum()) == round(0.75 * m * G)
    n4 = 0
    for i in range(m):
        for g in range(G):
            vals = len(Wq[i, g * 32:(g + 1) * 32].unique())
            assert vals <= (4 if not high[i, g] else 16)
            n4 += (not high[i, g]) and vals > 2
    assert n4 > 0.5 * int((~high).sum())  # the second sign is really used
    assert info["loss"] == pytest.approx(proxy_loss(W, Wq, H), rel=1e-5)  # the stored weight is the solver's
    assert info["loss"] < 0.8 * pinfo["loss"]
    X = torch.randn(256, W.shape[1], generator=torch.Generator().manual_seed(0)) @ torch.linalg.cholesky(H + 1e-3 * torch.eye(H.shape[0])).T
    out = lambda q: float(((q.dequantize() - W) @ X.T).norm())  # noqa: E731
    assert out(qw) < out(plain)
    one_shot = squeeze(W, H, group_size=32, binary_residual=True, squeeze_staged=False)[1]["loss"]
    assert 0 < one_shot


def test_residual_bits_accounting_and_round_trip(captured):  # noqa: F811
    W, H = captured
    qw, _ = squeeze(W, H, group_size=32, binary_frac=0.8, binary_residual=True)
    plain, _ = squeeze(W, H, group_size=32, binary_frac=0.8)
    m, n = qw.shape
    G = qw.n_groups
    assert int(qw.high_cells().sum()) == int(plain.high_cells().sum())  # as many high cells (PBAR may pick others)
    nb = int((~qw.high_cells()).sum())                       # binary cells
    kb = int((~qw.high_cells())[:, torch.arange(n) // 32].sum())  # binary weights
    assert kb == nb * 32
    extra = bitpack.packed_width(kb, 1) * 32 + nb * 16
    assert qw.stored_bits() == plain.stored_bits() + extra
    assert qw.tensors()["p3"].shape == (nb,) and qw.tensors()["qres"].dtype == torch.int32
    bpw, plain_bpw = qw.stored_bits() / (m * n), plain.stored_bits() / (m * n)
    assert bpw - plain_bpw == pytest.approx(0.8 * (1 + 16 / 32), abs=0.02)  # +1 bit/binary weight + fp16/cell
    back = from_tensors(qw.tensors(), qw.meta())
    assert isinstance(back, MixedBinaryWeight) and back.binary_residual
    assert torch.equal(back.dequantize(), qw.dequantize())
    for key in ("qres", "p3"):  # the residual tensors are required once the flag is set
        bad = {k: v for k, v in qw.tensors().items() if k != key}
        with pytest.raises(ValueError, match=key):
            from_tensors(bad, qw.meta())
    with pytest.raises(ValueError, match="binary_residual"):
        from_tensors(qw.tensors(), {**qw.meta(), "binary_residual": "yes"})


def test_checkpoints_without_residual_still_load(captured):  # noqa: F811
    W, H = captured
    qw, _ = squeeze(W, H, group_size=32)
    assert set(qw.tensors()) == {"qsign", "qrest", "mask", "p1", "p2"}  # the format is unchanged without the option
    old_meta = {k: v for k, v in qw.meta().items() if k != "binary_residual"}  # written before the option existed
    back = from_tensors(qw.tensors(), old_meta)
    assert not back.binary_residual and torch.equal(back.dequantize(), qw.dequantize())


def test_binary_residual_config_and_cli():
    from lowbit.cli import build_parser
    from lowbit.errors import LowbitError

    assert QuantConfig().binary_residual is False
    assert QuantConfig(method="squeeze", binary_residual=True).to_json()["binary_residual"] is True
    with pytest.raises(LowbitError, match="binary-residual"):
        QuantConfig(method="gptq", binary_residual=True)
    a = build_parser().parse_args(["quantize", "m", "--method", "squeeze", "--binary-residual"])
    assert a.binary_residual is True
    assert build_parser().parse_args(["quantize", "m"]).binary_residual is False


def test_squeeze_pipeline_save_load(tiny_models, tiny_text, tmp_path):
    res = lowbit.quantize(str(tiny_models["llama"]), method="squeeze", group_size=32, source=str(tiny_text),
                          nsamples=8, seqlen=64, out=tmp_path / "q", progress=False)
    assert res.meta["calibration"]["fp_targets"] is None and res.meta["config"]["binary_frac"] == 0.8
    assert res.meta["config"]["binary_residual"] is False
    assert all(l["kind"] == "bin+int" for l in res.meta["layers"].values())
    assert res.report["bits_per_weight"] < 3  # tiny rows: the per-cell fp16 pairs weigh more than at n = 576
    model, tok, _ = lowbit.load(tmp_path / "q", device="cpu")
    saved = {n: m for n, m in res.model.named_modules() if isinstance(m, QuantLinear)}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            assert torch.equal(mod.packed.dequantize(), saved[name].packed.dequantize())
    ids = torch.tensor(tok(tiny_text.read_text()[:2000], add_special_tokens=False)["input_ids"][:64])[None]
    with torch.no_grad():
        assert torch.allclose(res.model(input_ids=ids).logits, model(input_ids=ids).logits, atol=2e-2, rtol=1e-2)


def test_squeeze_residual_pipeline_save_load(tiny_models, tiny_text, tmp_path):
    from lowbit.cli import main

    out = tmp_path / "q"
    assert main(["quantize", str(tiny_models["llama"]), "--method", "squeeze", "--binary-residual", "--group-size", "32",
                 "--calib", str(tiny_text), "--nsamples", "4", "--seqlen", "64", "--out", str(out), "--quiet"]) == 0
    model, _, meta = lowbit.load(out, device="cpu")
    assert meta["config"]["binary_residual"] is True
    assert all(l["kind"] == "bin+int" and l["binary_residual"] is True for l in meta["layers"].values())
    mods = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert mods and all(m.packed.binary_residual for m in mods)
