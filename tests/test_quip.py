"""QuIP#: fast lattice encoding, BlockLDLQ vs RTN on real activations, RVQ ordering, the packed format and its
bit accounting, both transform kinds, the pipeline with save/load and fine-tuning, RNG hygiene, flag validation."""
import math

import pytest
import torch

import lowbit
from lowbit.cli import main
from lowbit.config import QuantConfig
from lowbit.errors import LowbitError
from lowbit.packed.qlinear import QuantLinear
from lowbit.packed.qweight import FORMATS, from_tensors
from lowbit.packed.quipw import QuipWeight
from lowbit.quip import e8p, lattice
from lowbit.solvers import SOLVERS
from lowbit.solvers.loss import proxy_loss
from lowbit.solvers.quip import rht_kind, solve_with



def cfg(**kw):
    return QuantConfig(method="quip", **kw)


@pytest.mark.parametrize("sigma", [0.3, 1.0, 2.5])
def test_lattice_encode_is_exact(sigma):
    x = torch.randn(4000, 8, generator=torch.Generator().manual_seed(3)) * sigma
    fast, ref = lattice.encode(x), e8p.encode(x)
    d_fast = (e8p.decode(fast) - x).pow(2).sum(-1)
    d_ref = (e8p.decode(ref) - x).pow(2).sum(-1)
    assert torch.allclose(d_fast, d_ref, atol=1e-5)      # same distance (codes equal up to exact ties)
    assert (fast == ref).float().mean() > 0.999


def test_blockldlq_beats_rtn_with_the_same_codebook(captured):  # noqa: F811
    W, H = captured
    fixed = ((1.0, 1.0),)
    _, ldlq = solve_with(W, H, cfg(bits=2), candidates=fixed)
    _, rtn = solve_with(W, H, cfg(bits=2), candidates=fixed, feedback=False)
    assert ldlq["loss"] < 0.8 * rtn["loss"]


def test_bits_order_the_loss_and_loss_is_measured_in_the_original_space(captured):  # noqa: F811
    W, H = captured
    losses = {}
    for bits in (2, 3, 4):
        qw, info = SOLVERS[cfg(bits=bits).method](W, H, cfg(bits=bits))
        assert info["loss"] == pytest.approx(proxy_loss(W, qw.dequantize(), H), rel=1e-5)
        losses[bits] = info["loss"]
    assert losses[4] < losses[3] < losses[2]


def test_e8p_beats_a_scalar_grid_on_a_gaussian_source():
    W = torch.randn(64, 256, generator=torch.Generator().manual_seed(5))
    H = torch.eye(256)                                       # loss = ½·squared error: the codebook alone
    for bits in (2, 3, 4):
        _, lattice_ = SOLVERS[cfg().method](W, H, cfg(bits=bits))
        _, scalar = SOLVERS[cfg().method](W, H, cfg(bits=bits, codebook="scalar"))
        assert lattice_["loss"] < 0.95 * scalar["loss"]


@pytest.mark.parametrize("bits,stage2_bits", [(2, 0), (3, 8), (4, 16)])
def test_format_round_trip_and_exact_bit_accounting(captured, bits, stage2_bits):  # noqa: F811
    W, H = captured
    qw, _ = SOLVERS[cfg().method](W, H, cfg(bits=bits))
    m, n = qw.shape
    assert qw.codes.dtype == torch.int16 and qw.codes.shape == (m, n // 8)
    back = from_tensors(qw.tensors(), qw.meta())
    assert isinstance(back, QuipWeight) and FORMATS["quip"] is QuipWeight
    assert all(torch.equal(a, b) for a, b in zip(back.tensors().values(), qw.tensors().values()))
    assert torch.equal(back.dequantize(), qw.dequantize())
    stages = 1 if bits == 2 else 2
    expect = 16 * m * n // 8 + stage2_bits * m * n // 8 + 32 * stages + 32 * (math.ceil(m / 32) + math.ceil(n / 32))
    assert qw.stored_bits() == expect
    assert bits <= expect / (m * n) < bits + 0.04
    x = torch.randn(3, 5, n)
    assert torch.allclose(qw.matmul(x), x @ qw.dequantize().T, atol=1e-5)
    bad = dict(qw.tensors())
    bad["codes"] = bad["codes"][:, :-1]
    with pytest.raises(ValueError, match="codes"):
        from_tensors(bad, qw.meta())


def test_fft_transform_and_a_dimension_without_hadamard():
    assert rht_kind(96) == "hadamard" and rht_kind(376) == "fft"  # 376 = 8·47: no constructible H_K
    g = torch.Generator().manual_seed(4)
    X = torch.randn(2000, 376, generator=g)
    W, H = torch.randn(24, 376, generator=g) * 0.05, 2 / 2000 * X.T @ X
    qw, info = SOLVERS[cfg().method](W, H, cfg(bits=2))
    assert qw.meta()["in_kind"] == "fft" and qw.meta()["out_kind"] == "hadamard"
    assert info["loss"] == pytest.approx(proxy_loss(W, qw.dequantize(), H), rel=1e-5)
    x = torch.randn(4, 376, generator=g)
    assert torch.allclose(qw.matmul(x), x @ qw.dequantize().T, atol=1e-5)


def test_forced_fft_matches_hadamard_quality(captured):  # noqa: F811
    W, H = captured
    _, had = solve_with(W, H, cfg(bits=2))
    qw, fft = solve_with(W, H, cfg(bits=2), kinds=("fft", "fft"))
    assert (qw.out_kind, qw.in_kind) == ("fft", "fft")
    assert torch.equal(from_tensors(qw.tensors(), qw.meta()).dequantize(), qw.dequantize())
    assert fft["loss"] < 1.5 * had["loss"]


def test_ablations_run(captured):  # noqa: F811
    W, H = captured
    plain, _ = SOLVERS[cfg().method](W, H, cfg(bits=2, rht=False))
    assert plain.sign_mode == "none" and plain.tensors().keys() == {"codes", "scales"}
    assert plain.stored_bits() == 2 * W.numel() + 32
    scalar, _ = SOLVERS[cfg().method](W, H, cfg(bits=3, codebook="scalar"))
    assert scalar.codes.dtype == torch.int32 and scalar.stored_bits() == \
        3 * 64 * 96 + 32 + 32 * (2 + 3)                          # 96 = 3·32 columns: no padding
    levels = scalar.rotated() / scalar.scales[0]
    assert torch.allclose(levels - 0.5, (levels - 0.5).round(), atol=1e-5) and levels.abs().max() <= 3.5 + 1e-5


def test_global_rng_untouched_and_deterministic(captured):  # noqa: F811
    W, H = captured
    state = torch.random.get_rng_state()
    a, _ = SOLVERS[cfg().method](W, H, cfg(bits=2))
    b, _ = SOLVERS[cfg().method](W, H, cfg(bits=2))
    c, _ = SOLVERS[cfg().method](W, H, cfg(bits=2, rht_seed=1))
    assert torch.equal(state, torch.random.get_rng_state())
    assert torch.equal(a.su, b.su) and torch.equal(a.codes, b.codes) and not torch.equal(a.sv, c.sv)


def _fp16_rest(model):
    """The in-memory model as the checkpoint stores it: float tensors outside QuantLinear rounded to fp16."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not isinstance(model.get_submodule(name.rpartition(".")[0]), QuantLinear):
                p.copy_(p.half().float())
    return model


@pytest.mark.parametrize("extra", [{}, {"finetune": True, "ft_steps": 6}])
def test_pipeline_save_load(tiny_models, tiny_text, tmp_path, extra):
    state = torch.random.get_rng_state()
    res = lowbit.quantize(str(tiny_models["llama"]), method="quip", bits=2, source=str(tiny_text), nsamples=8,
                          seqlen=64, out=tmp_path / "q", progress=False, **extra)
    assert torch.equal(state, torch.random.get_rng_state())
    layers = res.meta["layers"]
    assert len(layers) == 14 and all(l["kind"] == "quip" and l["codebook"] == "e8p" for l in layers.values())
    assert {l["signs"] for l in layers.values()} <= ({"bits", "real"} if extra else {"bits"})
    assert 2.0 < res.report["bits_per_weight"] < (2.6 if extra else 2.1)
    model, tok, _ = lowbit.load(tmp_path / "q", device="cpu")
    saved = {n: m for n, m in res.model.named_modules() if isinstance(m, QuantLinear)}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            assert mod.packed.kind == "quip"
            for k, t in mod.packed.tensors().items():
                assert torch.equal(t, saved[name].packed.tensors()[k])
            assert torch.equal(mod.packed.dequantize(), saved[name].packed.dequantize())
            assert not any(t.is_floating_point() and t.shape == mod.packed.shape for t in mod.buffers())
    ids = torch.tensor(tok(tiny_text.read_text()[:2000], add_special_tokens=False)["input_ids"][:64])[None]
    with torch.no_grad():
        assert torch.allclose(_fp16_rest(res.model)(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4)


def test_finetune_lowers_the_block_error(tiny_models, tiny_text):
    from lowbit.calib.finetune import BlockFinetuner

    seen = []
    orig = BlockFinetuner.__call__

    def spy(self, *a):
        orig(self, *a)
        seen.append(list(self.history))

    BlockFinetuner.__call__ = spy
    try:
        res = lowbit.quantize(str(tiny_models["llama"]), method="quip", bits=2, source=str(tiny_text), nsamples=8,
                              seqlen=64, progress=False, finetune=True, ft_steps=25, ft_lr=3e-3)
    finally:
        BlockFinetuner.__call__ = orig
    history = seen[-1]
    assert len(history) == 2 and all(after <= before for before, after in history)
    assert any(after < 0.98 * before for before, after in history)
    assert res.meta["config"]["finetune"] is True


def test_bad_flags_are_one_line_errors(tiny_models):
    for kw, needle in ((dict(bits=5), "--bits"), (dict(codebook="pq"), "--codebook"), (dict(ft_steps=-1), "--ft-steps")):
        with pytest.raises(LowbitError, match=needle):
            cfg(**kw)
    for kw, needle in ((dict(rht=False), "--no-rht"), (dict(finetune=True), "--finetune"), (dict(codebook="scalar"), "--codebook")):
        with pytest.raises(LowbitError, match=needle):
            QuantConfig(method="gptq", **kw)
    assert main(["quantize", str(tiny_models["llama"]), "--method", "quip", "--bits", "8", "--quiet"]) == 2
    assert main(["quantize", str(tiny_models["llama"]), "--no-rht", "--quiet"]) == 2
