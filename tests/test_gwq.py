"""GWQ: outlier selection, grids and feedback around exact fp16 outliers, the CSR format and its bit
accounting, the gradient saliency against plain autograd, and the whole pipeline with save/load."""
import pytest
import torch

import lowbit
from lowbit.calib.gradients import weight_saliency
from lowbit.config import QuantConfig
from lowbit.errors import LowbitError
from lowbit.models.arch import resolve_spec
from lowbit.packed.qlinear import QuantLinear
from lowbit.packed.qweight import OutlierQuantWeight, from_tensors
from lowbit.solvers import SOLVERS
from lowbit.solvers.gwq import saliency_scores, select_outliers
from lowbit.solvers.loss import proxy_loss



def solve(W, H, grad=None, **kw):
    cfg = QuantConfig(**kw)
    if cfg.method.value == "gwq":
        return SOLVERS[cfg.method](W, H, cfg, saliency=grad)
    return SOLVERS[cfg.method](W, H, cfg)


def test_select_outliers_counts():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(40, 200, generator=g)
    assert select_outliers(s, 0.01).sum() == 80
    top = select_outliers(s, 0.01)
    assert s[top].min() > s[~top].max()  # really the largest scores
    row = select_outliers(s, 0.05, "row")
    assert (row.sum(1) == 10).all()
    grp = select_outliers(s, 0.05, "group", group_size=64)  # groups of 64, 64, 64, 8 columns
    assert [int(grp[:, c:c + 64].sum()) for c in range(0, 200, 64)] == [128, 128, 128, 16]
    assert select_outliers(s, 0.0).sum() == 0


def test_hessian_saliency_is_spqr_formula():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(6, 10, generator=g)
    X = torch.randn(200, 10, generator=g)
    H = 2 / 200 * X.T @ X
    s = saliency_scores(W, H, QuantConfig(method="gwq", saliency="hessian", damp=0.01), None)
    Hd = H + 0.01 * H.diag().mean() * torch.eye(10)
    expect = W.pow(2) / torch.linalg.inv(Hd).diag().pow(2)
    assert torch.allclose(s, expect, rtol=1e-3)


@pytest.mark.parametrize("saliency", ["hessian", "magnitude", "grad"])
def test_outliers_lower_the_loss_and_are_exact(captured, saliency):  # noqa: F811
    W, H = captured
    grad = torch.rand(W.shape, generator=torch.Generator().manual_seed(2)) if saliency == "grad" else None
    _, base = solve(W, H, method="gptq", bits=3, group_size=32)
    qw, info = solve(W, H, grad, method="gwq", bits=3, group_size=32, saliency=saliency, outlier_frac=0.02)
    assert isinstance(qw, OutlierQuantWeight) and qw.nnz == info["outliers"] == round(0.02 * W.numel())
    rows, cols = qw.outlier_coords()
    dense = qw.dense.dequantize()
    assert (dense[rows, cols] == 0).all()  # dense codes are the zero point under every outlier
    assert torch.equal(qw.dequantize()[rows, cols], qw.outlier_val.float())
    if saliency != "grad":  # a real selection beats plain GPTQ; random scores need not
        assert info["loss"] < base["loss"]
    assert info["loss"] == pytest.approx(proxy_loss(W, qw.dequantize(), H), rel=1e-4)


def test_rtn_solver_keeps_original_values_and_excludes_them_from_grids(captured):  # noqa: F811
    W, H = captured
    W = W.clone()
    W[3, 5] = 50 * W.abs().max()  # one huge weight would wreck its group's grid
    plain, _ = solve(W, H, method="rtn", bits=3, group_size=32, mse=False)
    qw, _ = solve(W, H, method="gwq", gwq_solver="rtn", saliency="magnitude", outlier_frac=0.001,
                  bits=3, group_size=32, mse=False)
    rows, cols = qw.outlier_coords()
    assert (3, 5) in set(zip(rows.tolist(), cols.tolist()))
    assert torch.equal(qw.outlier_val, W[rows, cols].half())  # no feedback: the original weights, in fp16
    assert qw.scales[3, 0] < plain.scales[3, 0] / 10           # the outlier left the grid of its group
    others = torch.ones_like(W, dtype=torch.bool)
    others[rows, cols] = False
    # elsewhere it is plain RTN on grids fitted without the outliers
    assert (qw.dequantize() - W)[others].abs().max() <= qw.scales.float().max() / 2 + 1e-6


def test_format_round_trip_and_bits(captured):  # noqa: F811
    W, H = captured
    qw, _ = solve(W, H, method="gwq", saliency="magnitude", bits=4, group_size=32, outlier_frac=0.01)
    back = from_tensors(qw.tensors(), qw.meta())
    assert isinstance(back, OutlierQuantWeight)
    assert torch.equal(back.dequantize(), qw.dequantize())
    m, n = qw.shape
    expect = qw.dense.stored_bits() + qw.nnz * (16 + 16) + (m + 1) * 32
    assert qw.stored_bits() == expect
    assert qw.nnz * 32 / (m * n) == pytest.approx(0.32, abs=0.01)  # values + columns: ≈ +0.32 bits at 1 %
    bad = dict(qw.tensors())
    bad["outlier_col"] = bad["outlier_col"].clone()
    bad["outlier_col"][0] = n + 3
    with pytest.raises(ValueError, match="outlier_col"):
        from_tensors(bad, qw.meta())


def test_gradient_saliency_equals_autograd(tiny_models, tiny_text):
    from lowbit.models.sources import load_model

    model, tok, _ = load_model(str(tiny_models["llama"]))
    spec = resolve_spec(model)
    ids = torch.tensor(tok(tiny_text.read_text(), add_special_tokens=False)["input_ids"][:96]).view(3, 32)
    state = torch.random.get_rng_state()
    sal = weight_saliency(model, spec, ids, progress=False)
    assert torch.equal(state, torch.random.get_rng_state())
    assert not any(p.requires_grad and p.grad is not None for p in model.parameters())
    lin = model.model.layers[1].self_attn.v_proj
    expect = torch.zeros_like(lin.weight)
    for row in ids:
        g, = torch.autograd.grad(model(input_ids=row[None], labels=row[None]).loss, lin.weight)
        expect += g.abs()
    assert torch.allclose(sal["model.layers.1.self_attn.v_proj"], expect, rtol=1e-4, atol=1e-8)
    assert len(sal) == 7 * len(model.model.layers)


def test_gwq_pipeline_save_load(tiny_models, tiny_text, tmp_path):
    res = lowbit.quantize(str(tiny_models["llama"]), method="gwq", bits=3, group_size=32, source=str(tiny_text),
                          nsamples=8, seqlen=64, grad_samples=2, outlier_frac=0.01, out=tmp_path / "q",
                          progress=False)
    assert res.meta["config"]["saliency"] == "grad" and res.meta["calibration"]["grad_samples"] == 2
    layers = res.meta["layers"]
    assert all(l["kind"] == "int+outliers" and l["nnz"] > 0 for l in layers.values())
    dense_bpw = lowbit.quantize(str(tiny_models["llama"]), method="gptq", bits=3, group_size=32,
                                source=str(tiny_text), nsamples=8, seqlen=64, progress=False).report["bits_per_weight"]
    assert res.report["bits_per_weight"] > dense_bpw + 0.3  # outliers are counted honestly
    model, tok, _ = lowbit.load(tmp_path / "q", device="cpu")
    saved = {n: m for n, m in res.model.named_modules() if isinstance(m, QuantLinear)}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            assert torch.equal(mod.outlier_val, saved[name].outlier_val)
            assert torch.equal(mod.packed.dequantize(), saved[name].packed.dequantize())
    ids = torch.tensor(tok(tiny_text.read_text()[:2000], add_special_tokens=False)["input_ids"][:64])[None]
    with torch.no_grad():
        assert torch.allclose(res.model(input_ids=ids).logits, model(input_ids=ids).logits, atol=2e-2, rtol=1e-2)


def test_gwq_settings_are_validated():
    with pytest.raises(LowbitError, match="--saliency"):
        QuantConfig(method="gwq", saliency="fisher")
    with pytest.raises(LowbitError, match="--outlier-frac"):
        QuantConfig(method="gwq", outlier_frac=0.7)
    with pytest.raises(LowbitError, match="--outlier-select"):
        QuantConfig(method="gwq", outlier_select="column")
    with pytest.raises(LowbitError, match="--gwq-solver"):
        QuantConfig(method="gwq", gwq_solver="awq")
