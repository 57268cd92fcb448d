"""FIAS: the target ``W*`` minimises ``‖W X̃ᵀ − Q Xᵀ‖² + λ‖Q − W‖²``, is ``W`` when the streams agree,
and the runner hands the solver ``W*`` with the quantized stream's ``H`` (checked on a real tiny model)."""
from __future__ import annotations

import copy

import pytest
import torch

from lowbit.calib.fias import CrossStats, fias_target
from lowbit.calib.runner import quantize_blocks
from lowbit.config import QuantConfig
from lowbit.models.arch import resolve_spec
from lowbit.packed.qlinear import QuantLinear
from lowbit.solvers import SOLVERS


def _streams(N=400, n=24, m=10, noise=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    Xf = torch.randn(N, n, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2, n, dtype=torch.float64)
    Xq = Xf + noise * torch.randn(N, n, generator=g, dtype=torch.float64)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    return Xf, Xq, W


def _objective(Q, W, Xf, Xq, lam):
    return float(((Xf @ W.T - Xq @ Q.T) ** 2).sum() * 2 / Xq.shape[0] + lam * ((Q - W) ** 2).sum())


def test_target_is_w_when_the_streams_agree():
    Xf, _, W = _streams()
    H = 2 / Xf.shape[0] * Xf.T @ Xf
    assert torch.allclose(fias_target(W, H, H.clone()), W, atol=1e-10)


def test_target_is_the_least_squares_fit_without_damping():
    Xf, Xq, W = _streams()
    H, C = 2 / Xq.shape[0] * Xq.T @ Xq, 2 / Xq.shape[0] * Xf.T @ Xq
    ref = torch.linalg.lstsq(Xq, Xf @ W.T).solution.T      # argmin_Q ‖Xq Qᵀ − Xf Wᵀ‖
    assert torch.allclose(fias_target(W, H, C, damp=0.0), ref, atol=1e-8)
    assert not torch.allclose(ref, W, atol=1e-2)           # the noisy stream really moves the target


@pytest.mark.parametrize("damp", [0.0, 0.01, 0.3])
def test_objective_splits_into_target_loss_plus_h_weighted_distance(damp):
    """``L(Q) = L(W*) + tr((Q − W*)(H + λI)(Q − W*)ᵀ)`` for any ``Q``: an H-weighted solver run on ``W*``
    minimises the FIAS objective."""
    Xf, Xq, W = _streams()
    H, C = 2 / Xq.shape[0] * Xq.T @ Xq, 2 / Xq.shape[0] * Xf.T @ Xq
    lam = damp * float(torch.diag(H).mean())
    Ws = fias_target(W, H, C, damp=damp)
    A = H + lam * torch.eye(H.shape[0], dtype=H.dtype)
    for seed in range(3):
        Q = Ws + torch.randn(W.shape, generator=torch.Generator().manual_seed(seed), dtype=W.dtype) * 0.2
        D = Q - Ws
        lhs = _objective(Q, W, Xf, Xq, lam)
        rhs = _objective(Ws, W, Xf, Xq, lam) + float(torch.trace(D @ A @ D.T))
        assert lhs == pytest.approx(rhs, rel=1e-9)
        assert lhs > _objective(Ws, W, Xf, Xq, lam)


def test_cross_stats_accumulate_in_chunks():
    Xf, Xq, _ = _streams(N=90, n=12)
    st = CrossStats(12, torch.device("cpu"))
    for k in range(0, 90, 40):
        st.add(Xq[k:k + 40].float(), Xf[k:k + 40].float())
    H, C = st.finish()
    assert torch.allclose(H, 2 / 90 * Xq.T @ Xq, rtol=1e-5, atol=1e-5)
    assert torch.allclose(C, 2 / 90 * Xf.T @ Xq, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="rows"):
        CrossStats(12, torch.device("cpu")).add(Xq[:5].float(), Xf[:6].float())


def _inputs_of(model, layer: str, ids) -> torch.Tensor:
    xs = []
    h = model.get_submodule(layer).register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=ids)
    h.remove()
    return torch.cat(xs).double()


def test_runner_solves_each_layer_for_the_fp_target(tiny_models, tiny_text):
    """On a real tiny LLaMA at 2 bits: block 0's first group sees identical streams (``W* = W``); block 1's
    q_proj gets ``H`` from the *quantized* model's activations and ``W* = fias_target(W, H, C)`` with ``C``
    from the FP model's, recomputed here independently from the finished models."""
    from lowbit.models.sources import load_model

    model, tok, _ = load_model(str(tiny_models["llama"]))
    fp = copy.deepcopy(model)
    ids = torch.tensor(tok(tiny_text.read_text(), add_special_tokens=False)["input_ids"][:256]).view(4, 64)
    seen = {}
    cfg = QuantConfig(method="gptq", bits=2, group_size=32)

    def solve(W, H, name):
        seen[name] = (W.clone(), H.clone())
        return SOLVERS[cfg.method](W, H, cfg)

    q = copy.deepcopy(model)
    quantize_blocks(q, resolve_spec(model), ids, solve, fp_targets=True, progress=False, batch_size=2)
    W0, _ = seen["model.layers.0.self_attn.q_proj"]
    assert torch.allclose(W0, fp.model.layers[0].self_attn.q_proj.weight, atol=1e-5)
    name = "model.layers.1.self_attn.q_proj"
    assert isinstance(q.get_submodule(name), QuantLinear)
    Xq, Xf = _inputs_of(q, name, ids), _inputs_of(fp, name, ids)
    H = 2 / Xq.shape[0] * Xq.T @ Xq
    C = 2 / Xq.shape[0] * Xf.T @ Xq
    W_seen, H_seen = seen[name]
    assert torch.allclose(H_seen.double(), H, rtol=1e-3, atol=1e-5)
    assert not torch.allclose(H, 2 / Xf.shape[0] * Xf.T @ Xf, rtol=1e-2, atol=1e-4)  # the streams differ at 2 bits
    W = fp.get_submodule(name).weight.double()
    expect = fias_target(W, H, C)
    assert torch.allclose(W_seen.double(), expect, rtol=1e-3, atol=1e-4)
    assert not torch.allclose(expect, W, atol=1e-3)
