"""Hadamard constructions, the fast (K ⊗ 2^p) transform, the FFT fallback and the seeded RHT."""
from __future__ import annotations

import math

import pytest
import torch

from lowbit.quip import hadamard as had

# order -> expected construction (Paley over GF(p^k) for 28 = 27+1, 52 = 2·(25+1), 344 = 343+1)
ORDERS = {2: ("sylvester",), 8: ("sylvester",), 12: ("paley1", 11), 20: ("paley1", 19), 24: ("paley1", 23),
          28: ("paley1", 27), 36: ("paley2", 17), 44: ("paley1", 43), 52: ("paley2", 25),
          60: ("paley1", 59), 76: ("paley2", 37), 108: ("paley1", 107), 140: ("paley1", 139),
          144: ("kron", 2, 72), 148: ("paley2", 73), 344: ("paley1", 343)}

# hidden / intermediate / kv sizes of real models -> expected (K, 2^p)
MODEL_SIZES = {
    "SmolLM2-135M": {576: (36, 16), 1536: (12, 128), 192: (12, 16)},
    "SmolLM2-360M": {960: (60, 16), 2560: (20, 128), 320: (20, 16)},
    "SmolLM2-1.7B / Llama-3.2-1B": {2048: (1, 2048), 8192: (1, 8192)},
    "Llama-2-7B": {4096: (1, 4096), 11008: (344, 32)},
    "Llama-2-13B": {5120: (20, 256), 13824: (108, 128)},
    "Llama-3-8B / Mistral-7B": {1024: (1, 1024), 14336: (28, 512)},
    "Llama-2-70B": {28672: (28, 1024)},
    "Llama-3.2-3B / Phi-3-mini": {3072: (12, 256)},
    "TinyLlama-1.1B": {5632: (44, 128)},
    "Qwen2.5-0.5B": {896: (28, 32), 4864: (76, 64), 128: (1, 128)},
    "Qwen2.5-1.5B": {8960: (140, 64)},
    "Qwen2.5-7B": {3584: (28, 128), 18944: (148, 128), 512: (1, 512)},
    "Qwen2.5-72B": {29568: (924, 32)},
    "Gemma-2-2B": {2304: (36, 64), 9216: (36, 256)},
    "Llama-3.1-405B": {53248: (52, 1024)},
}
ALL_SIZES = sorted({n for sizes in MODEL_SIZES.values() for n in sizes} | {640})


@pytest.mark.parametrize("K", sorted(ORDERS))
def test_generated_matrices_are_hadamard(K):
    assert had.recipe(K) == ORDERS[K]
    H = had.hadamard_matrix(K).double()
    assert H.shape == (K, K)
    assert torch.all(H.abs() == 1)
    assert torch.equal(H @ H.T, K * torch.eye(K, dtype=torch.float64))


@pytest.mark.parametrize("q", [7, 11, 27, 43, 13, 25, 29])
def test_jacobsthal_properties(q):
    Q = had.jacobsthal(q).double()
    J = torch.ones(q, q, dtype=torch.float64)
    assert torch.equal(Q @ Q.T, q * torch.eye(q, dtype=torch.float64) - J)
    assert torch.equal(Q.sum(1), torch.zeros(q, dtype=torch.float64))
    assert torch.equal(Q.T, -Q if q % 4 == 3 else Q)


def test_unconstructible_orders_and_sizes():
    assert had.recipe(172) is None          # 11008 = 43·256 is served by 344 = 7³+1 (Paley I over GF(343))
    assert had.recipe(6) is None
    assert had.hadamard_factor(154) is None  # 2·7·11: FFT fallback
    assert had.hadamard_factor(1) == (1, 1)
    assert had.hadamard_factor(640) == (20, 32)
    with pytest.raises(ValueError):
        had.hadamard_transform(torch.zeros(2, 154))


@pytest.mark.parametrize("model", sorted(MODEL_SIZES))
def test_real_model_sizes_are_supported(model):
    for n, expected in MODEL_SIZES[model].items():
        assert had.hadamard_factor(n) == expected, (model, n)


def test_fwht_matches_sylvester():
    x = torch.randn(3, 5, 64, dtype=torch.float64)
    assert torch.allclose(had.fwht(x), x @ had.sylvester(64).double().T, atol=1e-12)


@pytest.mark.parametrize("n", [8, 12, 24, 40, 48, 56, 96, 144, 576, 640, 1536, 2048])
def test_transform_matches_dense_matrix(n):
    D = had.hadamard_dense(n)
    assert torch.allclose(D @ D.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    x = torch.randn(4, n, dtype=torch.float64)
    assert torch.allclose(had.hadamard_transform(x), x @ D.T, atol=1e-10)
    assert torch.allclose(had.hadamard_transform(x, inverse=True), x @ D, atol=1e-10)


@pytest.mark.parametrize("n", ALL_SIZES)
def test_transform_is_orthogonal_for_every_supported_size(n):
    x = torch.randn(3, n, dtype=torch.float64)
    y = had.hadamard_transform(x)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-10)
    assert torch.allclose(had.hadamard_transform(y, inverse=True), x, atol=1e-10)
    e = torch.zeros(1, n, dtype=torch.float64)
    e[0, n // 3] = 1.0
    assert torch.allclose(had.hadamard_transform(e).abs(), torch.full((1, n), 1 / math.sqrt(n), dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transform_batched_low_precision(dtype):
    x = torch.randn(2, 3, 576)
    y = had.hadamard_transform(x.to(dtype))
    assert y.dtype == dtype and y.shape == (2, 3, 576)
    ref = had.hadamard_transform(x.double())
    assert (y.double() - ref).abs().max() < (0.05 if dtype == torch.bfloat16 else 1e-5)


def test_fft_fallback_is_orthogonal():
    n = 2 * 7 * 11
    V = had.RHT(n, seed=3)
    assert V.kind == "fft"
    M = V.matrix()
    assert torch.allclose(M @ M.T, torch.eye(n, dtype=torch.float64), atol=1e-12)
    x = torch.randn(5, n, dtype=torch.float64)
    y = V.forward(x)
    assert torch.allclose(y, x @ M.T, atol=1e-12)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-12)
    assert torch.allclose(V.inverse(y), x, atol=1e-12)
    assert torch.allclose(had.fft_transform(had.fft_transform(x), inverse=True), x, atol=1e-12)
    with pytest.raises(ValueError):
        had.RHT(77, seed=0)
    assert had.RHT(576, seed=0, kind="fft").kind == "fft"


def test_rht_seeded_signs_and_global_rng_untouched():
    state = torch.random.get_rng_state()
    a, b, c = had.RHT(1536, seed=7), had.RHT(1536, seed=7), had.RHT(1536, seed=8)
    x = torch.randn(2, 1536, generator=torch.Generator().manual_seed(0))
    ya, yb, yc = a.forward(x), b.forward(x), c.forward(x)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.signs, b.signs) and torch.equal(ya, yb)
    assert set(a.signs.unique().tolist()) == {-1.0, 1.0}
    assert not torch.equal(a.signs, c.signs) and not torch.allclose(ya, yc)
    expected = had.hadamard_transform(x * a.signs)
    assert torch.allclose(ya, expected)


@pytest.mark.parametrize("m,n", [(96, 576), (48, 154), (12, 640)])
def test_weight_and_hessian_rotation_preserve_proxy_loss(m, n):
    g = torch.Generator().manual_seed(m + n)
    U, V = had.RHT(m, seed=1), had.RHT(n, seed=2)
    W = torch.randn(m, n, generator=g, dtype=torch.float64)
    dW = torch.randn(m, n, generator=g, dtype=torch.float64)
    X = torch.randn(3 * n, n, generator=g, dtype=torch.float64)
    H = X.T @ X / X.shape[0]
    Wt, dWt, Ht = had.rotate_weight(W, U, V), had.rotate_weight(dW, U, V), had.rotate_hessian(H, V)
    assert torch.allclose(Wt, U.matrix() @ W @ V.matrix().T, atol=1e-10)
    assert torch.allclose(Ht, V.matrix() @ H @ V.matrix().T, atol=1e-10)
    assert torch.allclose(had.unrotate_weight(Wt, U, V), W, atol=1e-10)
    loss = torch.trace(dW @ H @ dW.T)
    assert torch.allclose(torch.trace(dWt @ Ht @ dWt.T), loss, rtol=1e-10)
    x = torch.randn(7, n, generator=g, dtype=torch.float64)            # inference: y = Uᵀ W̃ V x
    assert torch.allclose(U.inverse(V.forward(x) @ Wt.T), x @ W.T, atol=1e-10)
    with pytest.raises(ValueError):
        had.rotate_weight(W.T, U, V)
