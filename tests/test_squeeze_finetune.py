"""Squeeze10's per-block scale fit (``--finetune``): the trainable cell starts at the stored weight, exports
to the same format, lowers the block error against the FP stream's targets, and the result saves/loads exactly."""
from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.calib.finetune import BlockFinetuner
from lowbit.calib.views import TrainableMixed
from lowbit.config import QuantConfig
from lowbit.errors import LowbitError
from lowbit.packed.mixed import MixedBinaryWeight
from lowbit.packed.qlinear import QuantLinear
from lowbit.solvers import SOLVERS



@pytest.mark.parametrize("residual", [False, True])
def test_untrained_cell_is_the_stored_weight_and_exports_unchanged(captured, residual):  # noqa: F811
    W, H = captured
    cfg = QuantConfig(method="squeeze", group_size=32, binary_residual=residual)
    qw, _ = SOLVERS[cfg.method](W, H, cfg)
    mod = TrainableMixed(qw, None)
    with torch.no_grad():
        assert torch.equal(mod.weight(), qw.dequantize())
    back = mod.export()
    assert isinstance(back, MixedBinaryWeight) and back.meta() == qw.meta()
    for k, t in qw.tensors().items():
        assert torch.equal(back.tensors()[k], t)


def test_trained_cells_export_what_was_trained(captured):  # noqa: F811
    W, H = captured
    cfg = QuantConfig(method="squeeze", group_size=32)
    qw, _ = SOLVERS[cfg.method](W, H, cfg)
    mod = TrainableMixed(qw, None)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        mod.gamma.mul_(1 + 0.1 * torch.randn(mod.gamma.shape, generator=g))
        mod.delta.add_(0.3 * torch.randn(mod.delta.shape, generator=g))
        trained = mod.weight()
    back = mod.export()
    assert torch.allclose(back.dequantize(), trained, rtol=2e-3, atol=2e-3 * float(trained.abs().max()))
    assert not torch.allclose(back.dequantize(), qw.dequantize(), atol=1e-4)
    assert back.stored_bits() == qw.stored_bits()
    # the codes did not move: binary cells still hold two values per row-group
    high = back.high_cells()
    Wq = back.dequantize()
    for i in range(4):
        for c in range(high.shape[1]):
            if not high[i, c]:
                assert len(Wq[i, c * 32:(c + 1) * 32].unique()) <= 2


def test_gradients_reach_only_gamma_and_delta(captured):  # noqa: F811
    W, H = captured
    cfg = QuantConfig(method="squeeze", group_size=32)
    qw, _ = SOLVERS[cfg.method](W, H, cfg)
    mod = TrainableMixed(qw, torch.zeros(W.shape[0]))
    x = torch.randn(5, W.shape[1])
    mod(x).pow(2).sum().backward()
    assert mod.gamma.grad is not None and mod.gamma.grad.abs().sum() > 0
    assert mod.delta.grad is not None and mod.delta.grad.abs().sum() > 0
    assert mod.bias.grad is None
    assert [p for g in mod.param_groups(1e-3) for p in g["params"]] == [mod.gamma, mod.delta]


def test_squeeze_finetune_lowers_block_error_and_saves_exactly(tiny_models, tiny_text, tmp_path):
    """Through the API on a real tiny model: the finetuner gets the FP stream's inputs (FIAS), the held-out block
    MSE never rises and drops somewhere, and the trained cells save and load exactly."""
    seen, history = [], []
    orig = BlockFinetuner.__call__

    def spy(self, *a):
        seen.append(a[5] is not None)
        orig(self, *a)
        history[:] = self.history

    BlockFinetuner.__call__ = spy
    try:
        res = lowbit.quantize(str(tiny_models["llama"]), method="squeeze", group_size=32, source=str(tiny_text),
                              nsamples=8, seqlen=64, out=tmp_path / "q", progress=False, finetune=True, ft_steps=25,
                              ft_lr=1e-2)
    finally:
        BlockFinetuner.__call__ = orig
    assert seen == [True, True]
    assert len(history) == 2 and all(after <= before for before, after in history)
    assert any(after < 0.95 * before for before, after in history)
    assert res.meta["config"]["finetune"] is True
    assert all(l["kind"] == "bin+int" for l in res.meta["layers"].values())
    model, tok, _ = lowbit.load(tmp_path / "q", device="cpu")
    saved = {n: m for n, m in res.model.named_modules() if isinstance(m, QuantLinear)}
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLinear):
            assert torch.equal(mod.packed.dequantize(), saved[name].packed.dequantize())


def test_finetune_flag_is_refused_for_other_methods():
    with pytest.raises(LowbitError, match="--finetune applies only to --method quip or squeeze"):
        QuantConfig(method="gptq", finetune=True)
    assert QuantConfig(method="squeeze", finetune=True).finetune is True


def test_finetune_learning_rate_defaults_per_method():
    from lowbit.cli import build_parser

    assert QuantConfig(method="squeeze").ft_lr == 5e-3 and QuantConfig(method="quip").ft_lr == 1e-3
    assert QuantConfig(method="squeeze", ft_lr=2e-2).to_json()["ft_lr"] == 2e-2
    assert build_parser().parse_args(["quantize", "m", "--method", "squeeze", "--finetune"]).ft_lr is None
    with pytest.raises(LowbitError, match="--ft-lr"):
        QuantConfig(method="squeeze", ft_lr=0.0)
