"""``--gguf-type`` with AWQ and DL-QAT: AWQ's scale search measures the type's own rounding and the runner solves
the scaled weights on the type (``--awq-solver rtn`` = the type's RTN, ``gptq`` = its feedback solver); DL-QAT
trains on the legacy types' exact grids and stores the trained weight as their blocks bit for bit, or projects
its trained weight onto the other types; exports read back equal through the ``gguf`` package."""
import numpy as np
import pytest
import torch

import lowbit
from lowbit.config import QuantConfig
from lowbit.gguf import TYPES
from lowbit.gguf.solve import feedback, solve as gguf_solve
from lowbit.methods import awq
from lowbit.packed.ggufw import GGUFWeight
from lowbit.qat import gguf as qgguf
from lowbit.qat.fakequant import FakeQuantLinear
from lowbit.solvers import rtn

from helpers import build_wide, family_config, random_model


def layer_stats(n=256, N=512, seed=0, k=2, m=8):
    """``k`` weights (m, n) and their common input's statistics, channels of very uneven magnitude (what AWQ
    exploits): ``(Ws, a (n,), H (n, n), X (N, n))``."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, n, generator=g) * torch.exp(1.5 * torch.randn(n, generator=g))
    Ws = [torch.randn(m, n, generator=g) * 0.05 for _ in range(k)]
    return Ws, X.abs().mean(0).double(), 2 / N * X.T @ X, X


def type_rtn(W, gtype):
    codec = TYPES[gtype].codec
    return codec.decode(codec.quantize(W))


@pytest.mark.parametrize("gtype", ["Q4_0", "Q4_K"])
def test_awq_search_measures_the_types_own_rounding(gtype):
    Ws, a, H, X = layer_stats(k=1 if gtype == "Q4_K" else 2)  # K-quant RTN is slow in Python: one weight
    cfg = QuantConfig(method="awq", gguf_type=gtype)
    alpha, s, errs = awq.search(Ws, a, H, cfg, 3, [gtype] * len(Ws))
    # α = 0 is the type's RTN: the loss the GGUF solver reports for AWQ's rtn solver, whose blocks are the type's RTN
    solved = [gguf_solve(W, H, cfg) for W in Ws]
    for W, (packed, _) in zip(Ws, solved):
        assert torch.equal(packed.blocks, GGUFWeight.from_fields(gtype, TYPES[gtype].codec.quantize(W)).blocks)
    assert errs[0] == pytest.approx(sum(info["loss"] for _, info in solved), rel=1e-6)
    # the error kept is Σ_i mean_t ‖(W_i − Q_T(W_i diag s) diag(s)⁻¹) x_t‖², Q_T the type's RTN, from the inputs
    direct = sum(float(((W - type_rtn(W * s, gtype) / s).double() @ X.T.double()).pow(2).sum(0).mean()) for W in Ws)
    assert min(errs) == pytest.approx(direct, rel=1e-4)
    assert alpha > 0 and min(errs) < 0.9 * errs[0]  # uneven channels: AWQ helps on the type too
    # and it is not the int group grid's error
    assert awq.search(Ws, a, H, QuantConfig(method="awq", bits=4, group_size=32), 3)[2] != errs


def test_awq_searches_each_linear_on_its_preset_or_planned_type():
    from lowbit.gguf import preset_type

    block = random_model(family_config("llama", 160)).model.layers[1]
    names = ["self_attn.v_proj", "mlp.down_proj", "self_attn.q_proj"]
    for solver in ("rtn", "gptq"):  # GPTQ on the type counts as having an importance matrix, as in the solver
        cfg = QuantConfig(method="awq", gguf_type="Q4_K_M", awq_solver=solver)
        got = awq.layer_types(cfg, block, names, "model.layers.1", 2)
        assert got == [preset_type("Q4_K_M", f"model.layers.1.{n}", None, 2, tuple(block.get_submodule(n).weight.shape),
                                   imatrix=solver == "gptq") for n in names]
        assert got[0] == got[1] == "Q6_K" and got[2] == "Q4_K"  # llama.cpp's extra bits for attn_v/ffn_down
    planned = {f"model.layers.1.{n}": t for n, t in zip(names, ("Q8_0", "Q4_0", "IQ4_NL"))}  # --target-bpw's plan
    got = awq.layer_types(QuantConfig(method="awq"), block, names, "model.layers.1", 2, planned)
    assert got == ["Q8_0", "Q4_0", "IQ4_NL"]
    assert awq.layer_types(QuantConfig(method="awq"), block, names, "model.layers.1", 2) is None  # the int grid


def test_awq_solvers_on_the_type():
    Ws, _, H, _ = layer_stats(seed=1, k=1, m=4)
    W = Ws[0]
    assert not feedback(QuantConfig(method="awq", gguf_type="Q4_K"))  # --awq-solver rtn: not GPTQ
    assert feedback(QuantConfig(method="awq", gguf_type="Q4_K", awq_solver="gptq"))
    for gtype in ("Q4_0", "Q4_K"):
        by_rtn, info = gguf_solve(W, H, QuantConfig(method="awq", gguf_type=gtype))
        assert torch.equal(by_rtn.blocks, GGUFWeight.from_fields(gtype, TYPES[gtype].codec.quantize(W)).blocks)
        assert info["loss"] > 0
        by_gptq, ginfo = gguf_solve(W, H, QuantConfig(method="awq", gguf_type=gtype, awq_solver="gptq"))
        ref = gguf_solve(W, H, QuantConfig(method="gptq", gguf_type=gtype))[0]
        assert torch.equal(by_gptq.blocks, ref.blocks) and ginfo["loss"] < info["loss"]


@pytest.mark.parametrize("gtype", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_dlqat_legacy_types_store_the_trained_weight_bit_for_bit(gtype):
    import gguf

    g = torch.Generator().manual_seed(0)
    W = torch.randn(8, 64, generator=g) * 0.05
    lp = qgguf.LayerPlan(TYPES[gtype], None, QuantConfig(method="dlqat", gguf_type=gtype).replace(
        **dict(zip(("bits", "group_size", "sym"), qgguf.nearest_grid(TYPES[gtype])))))
    assert lp.exact and lp.grid.group_size == 32 and lp.grid.sym == (gtype in ("Q4_0", "Q5_0", "Q8_0"))
    init = rtn.solve(W, None, lp.grid.replace(method="rtn"))[0]
    mod = FakeQuantLinear(W, None, init.scales.float(), init.zeros(), init.column_groups(), init.bits, 32, 4, g,
                          sym=init.sym, fp16_min=TYPES[gtype].codec.has_min)
    with torch.no_grad():  # as if trained: magnitudes and LoRA moved
        mod.magnitude.mul_(1 + 0.1 * torch.randn(mod.magnitude.shape, generator=g))
        mod.lora_b.normal_(0, 0.02, generator=g)
    w_hat = mod.quantized()[0].detach()
    packed, info = qgguf.to_gguf(mod, lp)
    assert packed.gguf_type == gtype and info["gguf_projection"] == "exact" and info["codes_changed"] > 0
    assert torch.equal(packed.dequantize(), w_hat)  # lowbit's decode: the trained weight itself
    back = gguf.quants.dequantize(packed.blocks.numpy(), gguf.GGMLQuantizationType[gtype])
    np.testing.assert_array_equal(back, w_hat.numpy())  # and the gguf package's


def test_dlqat_projects_other_types_by_their_rtn():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(4, 256, generator=g) * 0.05
    lp = qgguf.LayerPlan(TYPES["Q4_K"], None, QuantConfig(method="dlqat", bits=4, group_size=32))
    assert not lp.exact
    init = rtn.solve(W, None, lp.grid.replace(method="rtn"))[0]
    mod = FakeQuantLinear(W, None, init.scales.float(), init.zeros(), init.column_groups(), 4, 32, 2, g)
    packed, info = qgguf.to_gguf(mod, lp)
    assert info["gguf_projection"] == "rtn"
    ref = GGUFWeight.from_fields("Q4_K", TYPES["Q4_K"].codec.quantize(mod.quantized()[0].detach()))
    assert torch.equal(packed.blocks, ref.blocks)


def test_dlqat_grid_of_every_type():
    expect = {"Q4_0": (4, 32, True), "Q4_1": (4, 32, False), "Q5_0": (5, 32, True), "Q5_1": (5, 32, False),
              "Q8_0": (8, 32, True), "Q2_K": (2, 16, False), "Q3_K": (3, 16, True), "Q4_K": (4, 32, False),
              "Q5_K": (5, 32, False), "Q6_K": (6, 16, True), "IQ4_NL": (4, 32, True), "IQ4_XS": (4, 32, True)}
    for name, grid in expect.items():
        assert qgguf.nearest_grid(TYPES[name]) == grid, name
    for name in ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S"):
        bits, gs, sym = qgguf.nearest_grid(TYPES[name])
        assert bits == int(name[2]) and sym and 256 % gs == 0


def test_dlqat_plan_falls_back_as_llama_cpp():
    from lowbit.models.arch import resolve_spec

    cfg = family_config("llama", 160)
    cfg.intermediate_size = 80  # down_proj rows of 80: no 32-block holds them -> F16, not trained
    model = random_model(cfg)
    layers = qgguf.plan(model, resolve_spec(model), QuantConfig(method="dlqat", gguf_type="Q4_K"))
    assert len(layers) == 14
    for name, lp in layers.items():
        if name.endswith("down_proj"):
            assert lp.gtype.name == "F16" and lp.grid is None and "-> F16" in lp.fallback
        else:  # 64 columns: Q4_K falls back to Q5_0, a legacy type trained exactly
            assert lp.gtype.name == "Q5_0" and lp.exact and "-> Q5_0" in lp.fallback, name
            assert (lp.grid.bits, lp.grid.group_size, lp.grid.sym) == (5, 32, True)


# ---------------------------------------------------------------- end to end (lowbit.quantize, export)

def _ce(model, ids):
    from lowbit.qat.train import lm_loss

    with torch.no_grad():
        return float(lm_loss(model, ids))


def _readback_equal(folder, tmp_path, gtype):
    """Export ``folder`` to GGUF and require the gguf package's dequantizer to give lowbit's weights."""
    import gguf

    from lowbit.export import export_gguf
    from test_gguf_export import lowbit_weights

    r = export_gguf(folder, tmp_path / "m.gguf")
    assert r["types"] == {gtype: 14} and r["lossless"] == 14
    ours = lowbit_weights(folder)
    got = {t.name: gguf.quants.dequantize(t.data, t.tensor_type)
           for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors if t.name in ours}
    assert set(got) == set(ours) and len(ours) == 14
    for k in ours:
        np.testing.assert_array_equal(got[k], ours[k])


@pytest.fixture(scope="module")
def uneven_wide(tmp_path_factory):
    """The 256/512-wide llama (K-quants fit) with uneven norm weights, so some channels dominate (AWQ's case)."""
    from transformers import AutoModelForCausalLM

    path = build_wide(tmp_path_factory.mktemp("wide") / "llama", "llama")
    model = AutoModelForCausalLM.from_pretrained(path)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.exp(torch.randn(p.shape, generator=g)))
    model.save_pretrained(path)
    return path


@pytest.mark.e2e
@pytest.mark.parametrize("gtype", ["Q4_0", "Q4_K"])
def test_awq_on_the_type_no_worse_than_rtn_and_exports_losslessly(uneven_wide, tmp_path, gtype):
    from lowbit.models.sources import load_model

    fp, tok, _ = load_model(str(uneven_wide))
    text = (uneven_wide / "calib.txt").read_text()
    ids = torch.tensor(tok(text[-8000:], add_special_tokens=False)["input_ids"][:8 * 64]).view(8, 64)
    with torch.no_grad():
        ref = fp(input_ids=ids).logits
    kw = dict(gguf_type=gtype, source=str(uneven_wide / "calib.txt"), nsamples=8, seqlen=64, progress=False)
    err = {}
    for name, mk in {"rtn": dict(method="rtn"), "awq": dict(method="awq", awq_grid=2)}.items():
        res = lowbit.quantize(str(uneven_wide), out=tmp_path / name, **mk, **kw)
        assert {(l["kind"], l["gguf_type"]) for l in res.meta["layers"].values()} == {("gguf", gtype)}
        with torch.no_grad():
            err[name] = (res.model(input_ids=ids).logits - ref).pow(2).mean().item()
    assert err["awq"] <= err["rtn"], err
    _readback_equal(tmp_path / "awq", tmp_path, gtype)


@pytest.mark.e2e
def test_dlqat_on_q4_0_trains_below_rtn_and_exports_losslessly(tiny_models, tiny_text, tmp_path):
    from lowbit.qat import QATConfig

    src = str(tiny_models["llama"])
    kw = dict(gguf_type="Q4_0", source=str(tiny_text), seqlen=64, nsamples=8, progress=False)
    d = lowbit.quantize(src, method="dlqat", out=tmp_path / "d", qat=QATConfig(steps=20, lora_rank=4, lr=0.01), **kw)
    r = lowbit.quantize(src, method="rtn", **kw)
    assert {(l["kind"], l["gguf_type"], l["dlqat_grid"]) for l in d.meta["layers"].values()} == \
        {("gguf", "Q4_0", "w4 sym g32")}
    ids = torch.tensor(d.tokenizer(tiny_text.read_text()[-6000:], add_special_tokens=False)["input_ids"][:8 * 64])
    ids = ids.view(8, 64)
    assert _ce(d.model, ids) < _ce(r.model, ids) - 0.1
    loaded, _, _ = lowbit.load(tmp_path / "d", device="cpu")
    assert _ce(loaded, ids) == pytest.approx(_ce(d.model, ids), abs=2e-2)  # fp16 embeddings/norms on disk
    _readback_equal(tmp_path / "d", tmp_path, "Q4_0")
