"""Grids, RTN and GPTQ as pure functions: golden values, partial groups, act-order, damping, and
GPTQ's proxy loss below RTN's on activations captured from a real (tiny) model."""
import pytest
import torch

from lowbit.config import QuantConfig
from lowbit.solvers import SOLVERS
from lowbit.solvers.feedback import NotPositiveDefinite, column_feedback, inverse_cholesky
from lowbit.solvers.grid import UniformGrid
from lowbit.solvers.loss import proxy_loss


def solve(method, W, H, **kw):
    cfg = QuantConfig(method=method, **kw)
    return SOLVERS[cfg.method](W, H, cfg)


def test_asym_grid_golden():
    grid = UniformGrid(bits=2, sym=False)
    w = torch.tensor([[-1.0, 0.0, 0.5, 2.0]])
    scale, zero = grid.fit(w)
    assert scale.item() == pytest.approx(1.0)      # (2 − (−1)) / 3
    assert zero.item() == 1.0                      # round(1 / 1)
    q = grid.quantize(w, scale, zero)
    assert q.tolist() == [[0.0, 1.0, 1.0, 3.0]]    # 0.5 rounds to even (0) + 1
    assert grid.dequantize(q, scale, zero).tolist() == [[-1.0, 0.0, 0.0, 2.0]]


def test_sym_grid_golden():
    grid = UniformGrid(bits=4, sym=True)
    w = torch.tensor([[-3.0, 1.0, 7.5]])
    scale, zero = grid.fit(w)
    assert scale.item() == pytest.approx(1.0)      # 2·7.5/15
    assert zero.item() == 8.0
    assert grid.quantize(w, scale, zero).tolist() == [[5.0, 9.0, 15.0]]   # 7.5+8 → 16 clamps to 15


def test_grid_range_includes_zero_and_scales_are_fp16_exact():
    w = torch.rand(16, 32) + 1.0   # all positive: the range is widened to include 0
    scale, zero = UniformGrid(4).fit(w)
    assert torch.equal(zero, torch.zeros(16))
    assert torch.equal(scale, scale.half().float())


def test_mse_grid_not_worse_than_minmax():
    w = torch.randn(64, 128)
    w[:, 0] *= 8  # an outlier per row favours shrinking
    errs = []
    for mse in (False, True):
        grid = UniformGrid(3, mse=mse)
        s, z = grid.fit(w)
        errs.append((grid.dequantize(grid.quantize(w, s, z), s, z) - w).pow(2).sum())
    assert errs[1] < errs[0]


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_partial_last_group(method):
    torch.manual_seed(0)
    W = torch.randn(6, 80)
    X = torch.randn(512, 80)
    qw, _ = solve(method, W, 2 / 512 * X.T @ X, bits=4, group_size=32, mse=False)
    assert qw.n_groups == 3 and qw.scales.shape == (6, 3)
    deq = qw.dequantize()
    # columns 64..79 form the partial group: they take exactly ≤ 16 distinct grid values per row
    grid_vals = qw.scales.float()[:, 2:3] * (torch.arange(16).float() - qw.zeros()[:, 2:3])
    assert torch.isclose(deq[:, 64:, None], grid_vals[:, None, :]).any(-1).all()
    if method == "rtn":  # RTN's last-group grid spans that group's own min/max
        w = W[:, 64:]
        lo, hi = w.min(1).values.clamp(max=0), w.max(1).values.clamp(min=0)
        assert torch.allclose(qw.scales.float()[:, 2], ((hi - lo) / 15).half().float())


def test_gptq_beats_rtn_on_real_activations(captured):
    W, H = captured
    for kw in (dict(bits=4, group_size=32), dict(bits=3, group_size=64), dict(bits=4, group_size=-1, sym=True)):
        _, rtn = solve("rtn", W, H, **kw)
        _, gptq = solve("gptq", W, H, **kw)
        assert gptq["loss"] < 0.9 * rtn["loss"], kw


def test_gptq_loss_is_the_proxy_loss(captured):
    W, H = captured
    qw, info = solve("gptq", W, H, bits=4, group_size=32)
    assert info["loss"] == pytest.approx(proxy_loss(W, qw.dequantize(), H), rel=1e-6)
    # the engine's own Σ‖e‖²/2 equals the proxy loss under the damped Hessian
    U, lam = inverse_cholesky(H, 0.01)
    Hd = H + lam * H.diag().mean() * torch.eye(H.shape[0])
    grid = UniformGrid(4)
    s, z = grid.fit(W)
    Q, loss = column_feedback(W, U, lambda p, Wl: grid.dequantize(grid.quantize(Wl[:, p:p + 1], s, z), s, z))
    assert loss == pytest.approx(proxy_loss(W, Q, Hd), rel=1e-3)


def test_act_order_static_groups_are_contiguous(captured):
    W, H = captured
    qw_static, info_s = solve("gptq", W, H, bits=3, group_size=32, act_order=True)
    qw_dyn, info_d = solve("gptq", W, H, bits=3, group_size=32, act_order=True, static_groups=False)
    assert qw_static.g_idx is None
    assert qw_dyn.g_idx is not None and sorted(qw_dyn.g_idx.bincount().tolist()) == [32] * (W.shape[1] // 32)
    _, plain = solve("gptq", W, H, bits=3, group_size=32)
    _, rtn = solve("rtn", W, H, bits=3, group_size=32)
    for info in (info_s, info_d, plain):
        assert info["loss"] < rtn["loss"]


def test_dead_inputs_are_zeroed():
    torch.manual_seed(1)
    W = torch.randn(8, 64)
    X = torch.randn(256, 64)
    X[:, 5] = 0
    qw, info = solve("gptq", W, 2 / 256 * X.T @ X, bits=4, group_size=32)
    assert torch.isfinite(torch.tensor(info["loss"]))
    assert torch.allclose(qw.dequantize()[:, 5], torch.zeros(8), atol=qw.scales.float().max().item())


def test_damping_retries_then_gives_up():
    H = torch.diag(torch.tensor([10.0, 10.0, 10.0, -1.0]))  # indefinite; mean diagonal 7.25
    U, lam = inverse_cholesky(H, damp=0.01)                   # 0.01 and 0.1 fail, 1.0 works
    assert lam == pytest.approx(1.0) and torch.isfinite(U).all()
    Hd = H + lam * 7.25 * torch.eye(4)
    assert torch.allclose(U.T @ U, torch.linalg.inv(Hd), atol=1e-5)
    with pytest.raises(NotPositiveDefinite):
        inverse_cholesky(torch.full((3, 3), float("nan")), damp=0.01)


def test_solvers_are_pure(captured):
    W, H = captured
    W0, H0 = W.clone(), H.clone()
    state = torch.random.get_rng_state()
    solve("gptq", W, H, bits=4, group_size=32, act_order=True)
    assert torch.equal(W, W0) and torch.equal(H, H0)
    assert torch.equal(state, torch.random.get_rng_state())


# --- the fast paths (issue #17) are the same arithmetic as the reference ones -------------------------------

def _packed_equal(a, b) -> bool:
    ta, tb = a.tensors(), b.tensors()
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.parametrize("method,kw", [
    ("gptq", {}), ("gptq", {"act_order": False}), ("gptq", {"static_groups": False}), ("gptq", {"sym": True, "bits": 3}),
    ("gptq", {"group_size": -1}), ("foem", {}), ("foem", {"act_order": False}),
    ("foem", {"act_order": False, "group_size": 32, "block_size": 64}),
])
def test_compiled_column_loop_is_bit_identical_to_the_python_engine(method, kw):
    from lowbit import kernels
    from lowbit.kernels import feedback_cpu

    if not feedback_cpu.available():
        pytest.skip(f"feedback kernel unavailable: {feedback_cpu.unavailable_reason()}")
    cfg = QuantConfig(method=method, **{"bits": 4, "group_size": 64, **kw})
    g = torch.Generator().manual_seed(3)
    for m, n in [(96, 256), (40, 200)]:  # 200: a partial last group
        W = torch.randn(m, n, generator=g)
        X = torch.randn(512, n, generator=g) * torch.rand(n, generator=g)
        H = X.T @ X / 256
        fast, info_fast = SOLVERS[cfg.method](W, H, cfg)
        with kernels.use_backend("reference"):
            ref, info_ref = SOLVERS[cfg.method](W, H, cfg)
        assert _packed_equal(fast, ref) and info_fast == info_ref, (method, kw, m, n)


def test_grids_fitted_all_at_once_equal_one_group_at_a_time():
    g = torch.Generator().manual_seed(0)
    for sym in (False, True):
        grid = UniformGrid(4, sym, mse=True)
        W = torch.randn(300, 576, generator=g) * torch.rand(300, 1, generator=g)
        one = [grid.fit(W[:, k * 64:(k + 1) * 64]) for k in range(9)]
        s, z = grid.fit(W.reshape(300 * 9, 64))
        assert torch.equal(s.view(300, 9), torch.stack([o[0] for o in one], 1))
        assert torch.equal(z.view(300, 9), torch.stack([o[1] for o in one], 1))


@pytest.mark.parametrize("n", [64, 300, 576, 1536])
def test_symmetric_gram_equals_the_full_product_bit_for_bit(n):
    from lowbit.calib.hessian import InputStats, window_gram

    g = torch.Generator().manual_seed(n)
    X = torch.randn(4 * 128, n, generator=g) * torch.rand(n, generator=g)
    P = window_gram(X[:128])
    assert torch.equal(P, X[:128].T @ X[:128]) and torch.equal(P, P.T)
    st = InputStats(n, torch.device("cpu"), window=128)
    st.add(X[:256])
    st.add(X[256:])
    S = torch.zeros(n, n, dtype=torch.float64)
    for w in X.split(128):
        S += w.T @ w
    assert torch.equal(st.hessian(), (S * (2.0 / X.shape[0])).float())
