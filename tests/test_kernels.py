"""Fast kernels against their PyTorch references on random packed weights (bits 1–8, sym/asym,
partial last groups, group sizes that do not divide 16, g_idx), and the dispatcher's fallbacks."""
import warnings

import pytest
import torch

from lowbit import kernels
from lowbit.kernels import group_cpu, reference
from lowbit.packed.qlinear import QuantLinear
from lowbit.packed.qweight import GroupQuantWeight, OutlierQuantWeight

fast = pytest.mark.skipif(not group_cpu.available(), reason=f"no compiled kernel: {group_cpu.unavailable_reason()}")


def random_weight(m, n, bits, gs, sym, g_idx=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    G = -(-n // gs)
    codes = torch.randint(0, 2 ** bits, (m, n), generator=gen)
    scales = torch.rand(m, G, generator=gen) * 0.05 + 0.005
    zeros = None if sym else torch.randint(0, 2 ** bits, (m, G), generator=gen).float()
    gi = torch.randperm(n, generator=gen) // gs if g_idx else None  # act-order without static groups
    return GroupQuantWeight.from_codes(codes, scales, zeros, bits, gs, g_idx=gi)


CASES = [(bits, m, n, gs) for bits in (2, 3, 4, 8)
         for (m, n, gs) in ((48, 576, 64), (37, 100, 32), (20, 130, 128), (9, 77, 10), (16, 70, 70))]


@fast
@pytest.mark.parametrize("bits,m,n,gs", CASES)
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("g_idx", [False, True])
def test_group_cpu_matches_reference(bits, m, n, gs, sym, g_idx):
    p = random_weight(m, n, bits, gs, sym, g_idx, seed=bits * 1000 + n)
    assert torch.equal(group_cpu.dequantize(p), reference.dequantize(p))  # bit for bit
    for tokens in (1, 3, group_cpu.GEMV_MAX_TOKENS + 5):  # GEMV path and dequantize+GEMM path
        x = torch.randn(tokens, n, generator=torch.Generator().manual_seed(tokens))
        y, ref = group_cpu.matmul(p, x), reference.matmul(p, x)
        assert y.shape == ref.shape == (tokens, m)
        assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@fast
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_group_cpu_low_precision_inputs_and_batch_dims(dtype):
    p = random_weight(64, 192, 4, 64, False)
    x = torch.randn(2, 1, 192).to(dtype)
    y = group_cpu.matmul(p, x)
    assert y.dtype == dtype and y.shape == (2, 1, 64)
    ref = x.float() @ p.dequantize().T
    assert torch.allclose(y.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


@fast
def test_dispatcher_picks_fast_kernel_and_falls_back():
    p = random_weight(32, 64, 4, 32, True)
    x = torch.randn(1, 64)
    assert kernels.kernel_name(p, x) == "group_cpu"
    with kernels.use_backend("reference"):
        assert kernels.kernel_name(p, x) == "reference"
    assert kernels.kernel_name(p, x.requires_grad_()) == "reference"  # autograd needs the torch path
    mask = torch.zeros(32, 64, dtype=torch.bool)
    mask[3, 5] = True
    outl = OutlierQuantWeight.from_dense(p, torch.randn(32, 64), mask)  # another format kind
    assert kernels.kernel_name(outl, x) == "reference"
    x = torch.randn(1, 64)
    assert torch.allclose(kernels.matmul(outl, x), x @ outl.dequantize().T)


def test_fallback_when_kernel_unavailable(monkeypatch):
    p = random_weight(16, 64, 3, 32, False)
    monkeypatch.setattr(group_cpu, "_state", {"error": "no compiler"})
    monkeypatch.setattr(kernels, "_warned", set())
    x = torch.randn(1, 64)
    with pytest.warns(RuntimeWarning, match="reference path.*no compiler"):
        y = kernels.matmul(p, x)
    assert torch.allclose(y, reference.matmul(p, x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once only
        kernels.matmul(p, x)


@fast
def test_quantlinear_forward_uses_kernel_with_bias_and_follows_buffer_changes():
    p = random_weight(24, 96, 4, 32, False)
    bias = torch.randn(24)
    lin = QuantLinear(p, bias)
    x = torch.randn(1, 5, 96)
    ref = reference.matmul(p, x) + bias
    assert torch.allclose(lin(x), ref, rtol=1e-5, atol=1e-5)
    lin.scales = lin.scales * 2  # a replaced buffer must be seen (no stale cached packed weight)
    assert torch.allclose(lin(x) - bias, 2 * (ref - bias), rtol=1e-4, atol=1e-4)
