"""Fast kernels against their PyTorch references on random packed weights (bits 1–8, sym/asym,
partial last groups, group sizes that do not divide 16, g_idx), and the dispatcher's fallbacks."""
import warnings

import pytest
import torch

from lowbit import kernels
from lowbit.kernels import build, dispatch, group_cpu, outliers, reference
from lowbit.packed.qlinear import QuantLinear
from lowbit.packed.qweight import OutlierQuantWeight

from helpers import random_weight

needs_compiler = pytest.mark.skipif(not build.has_compiler(), reason="no C++ compiler")  # a build error fails


CASES = [(bits, m, n, gs) for bits in (2, 3, 4, 8)
         for (m, n, gs) in ((48, 576, 64), (37, 100, 32), (20, 130, 128), (9, 77, 10), (16, 70, 70))]


@needs_compiler
@pytest.mark.parametrize("bits,m,n,gs", CASES)
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("g_idx", [False, True])
def test_group_cpu_matches_reference(bits, m, n, gs, sym, g_idx):
    p = random_weight(m, n, bits, gs, sym, g_idx, seed=bits * 1000 + n)
    assert torch.equal(group_cpu.dequantize(p), reference.dequantize(p))  # bit for bit
    for tokens in (1, 3, group_cpu.GEMV_MAX_TOKENS + 5):  # GEMV path and dequantize+GEMM path
        x = torch.randn(tokens, n, generator=torch.Generator().manual_seed(tokens))
        y, ref = group_cpu.matmul(p, x, int8_act=False), reference.matmul(p, x)
        assert y.shape == ref.shape == (tokens, m)
        assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


Q8_CASES = [(bits, m, n, gs) for bits in (2, 4, 8)
            for (m, n, gs) in ((48, 576, 64), (40, 1536, 128), (33, 640, -1), (17, 576, 128))
            if bits != 2 or n % 64 == 0]


@needs_compiler
@pytest.mark.skipif(group_cpu.available() and not group_cpu.EXT.load().has_q8(), reason="no int8 path (no AVX2)")
@pytest.mark.parametrize("bits,m,n,gs", Q8_CASES)
@pytest.mark.parametrize("sym", [True, False])
def test_int8_activation_path_is_exactly_xhat_times_w(bits, m, n, gs, sym):
    """Decode with int8 activations: equal to ``x̂ Ŵᵀ`` (x̂ the int8-rounded blocks) up to fp32 summation
    order, and within the rounding error of ``x Ŵᵀ``; many tokens still take the exact path."""
    gs = n if gs == -1 else gs
    p = random_weight(m, n, bits, gs, sym, seed=bits * 7 + n)
    assert group_cpu.int8_supported(p)
    qb = 64 if bits == 2 else 32
    for tokens in (1, 3):
        x = torch.randn(tokens, n, generator=torch.Generator().manual_seed(tokens)) * 3
        x[0, 5] = 40.0  # an outlier channel: its block gets a coarse scale, the others do not care
        y = group_cpu.matmul(p, x, int8_act=True)
        xhat = reference.int8_blocks(x, qb)
        ref_hat, ref = xhat @ p.dequantize().T, reference.matmul(p, x)
        assert torch.allclose(y, ref_hat, rtol=1e-5, atol=2e-5 * ref_hat.abs().max().item())
        assert not torch.equal(xhat, x)
        rel = ((y - ref).norm() / ref.norm()).item()
        assert 1e-5 < rel < 0.03, rel  # really rounded, and only a little
    x = torch.randn(group_cpu.GEMV_MAX_TOKENS + 1, n)
    assert torch.allclose(group_cpu.matmul(p, x, int8_act=True), reference.matmul(p, x), rtol=1e-5,
                          atol=1e-5 * reference.matmul(p, x).abs().max().item())


def test_int8_blocks_rounding():
    x = torch.tensor([[127.0, -63.4, 0.5, 1.5] + [0.0] * 28, [0.0] * 32])
    xh = reference.int8_blocks(x, 32)
    assert xh[0, :4].tolist() == [127.0, -63.0, 0.0, 2.0]  # d = 1: half to even
    assert torch.equal(xh[1], torch.zeros(32))  # an all-zero block stays zero (no 0/0)


@needs_compiler
def test_int8_path_not_used_where_it_does_not_apply():
    assert not group_cpu.int8_supported(random_weight(8, 576, 5, 64, False))         # 5-bit
    assert not group_cpu.int8_supported(random_weight(8, 576, 2, 32, False))         # 2-bit needs 64-blocks
    assert not group_cpu.int8_supported(random_weight(8, 100, 4, 32, False))         # n % 32
    assert not group_cpu.int8_supported(random_weight(8, 576, 4, 64, False, g_idx=True))
    p = random_weight(8, 576, 5, 64, False)
    x = torch.randn(1, 576)
    assert torch.allclose(group_cpu.matmul(p, x, int8_act=True), reference.matmul(p, x), rtol=1e-5, atol=1e-5)


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_group_cpu_low_precision_inputs_and_batch_dims(dtype):
    p = random_weight(64, 192, 4, 64, False)
    x = torch.randn(2, 1, 192).to(dtype)
    y = group_cpu.matmul(p, x)
    assert y.dtype == dtype and y.shape == (2, 1, 64)
    ref = x.float() @ p.dequantize().T
    assert torch.allclose(y.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


@needs_compiler
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
    x = torch.randn(1, 64)
    assert kernels.kernel_name(outl, x) == "outliers"
    with kernels.use_backend("reference"):
        assert kernels.kernel_name(outl, x) == "reference"
    x = torch.randn(1, 64)
    assert torch.allclose(kernels.matmul(outl, x), x @ outl.dequantize().T, rtol=0.03, atol=0.03)


@needs_compiler
@pytest.mark.parametrize("tokens", [1, 3, group_cpu.GEMV_MAX_TOKENS + 3])
@pytest.mark.parametrize("g_idx", [False, True])
def test_outlier_kernel_matches_reference(tokens, g_idx):
    """GWQ's dense + sparse fp16 weight: the fast path equals ``x Ŵᵀ`` (exact backend), the outliers
    really contribute, and the int8-activation variant stays within rounding error."""
    gen = torch.Generator().manual_seed(tokens)
    dense = random_weight(96, 576, 4, 64, False, g_idx=g_idx, seed=5)
    mask = torch.rand(96, 576, generator=gen) < 0.01
    outl = OutlierQuantWeight.from_dense(dense, torch.randn(96, 576, generator=gen) * 2, mask)
    x = torch.randn(tokens, 576, generator=gen)
    ref = reference.matmul(outl, x)
    y = outliers.matmul(outl, x)
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    assert not torch.allclose(y, reference.matmul(dense, x), rtol=1e-3, atol=1e-3)  # the sparse part counts
    y8 = outliers.matmul(outl, x, int8_act=True)
    assert ((y8 - ref).norm() / ref.norm()).item() < 0.03
    assert kernels.kernel_name(outl, x) == "outliers"


@needs_compiler
def test_outlier_kernel_wide_rows_and_bf16():
    """n > 32768 stores int32 columns (int16 otherwise); bf16 inputs come back as bf16 with the same values."""
    gen = torch.Generator().manual_seed(0)
    n = 33000
    dense = random_weight(8, n, 4, 120, False, seed=2)
    mask = torch.rand(8, n, generator=gen) < 0.01
    mask[:, -1] = True  # the last columns need all 16 bits
    outl = OutlierQuantWeight.from_dense(dense, torch.randn(8, n, generator=gen) * 2, mask)
    assert outl.outlier_col.dtype == torch.int32
    x = torch.randn(2, n, generator=gen)
    ref = reference.matmul(outl, x)
    with kernels.use_backend("exact"):
        assert torch.allclose(kernels.matmul(outl, x), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
        yb = kernels.matmul(outl, x.bfloat16())
    assert yb.dtype == torch.bfloat16
    assert ((yb.float() - ref).norm() / ref.norm()).item() < 0.02


def test_fallback_when_kernel_unavailable(monkeypatch):
    """No compiler (``CXX`` names none): the kernel is unavailable with that reason, matmul falls back, says so once."""
    p = random_weight(16, 64, 3, 32, False)
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setattr(group_cpu, "EXT", group_cpu.EXT.variant())  # a fresh, not yet built extension
    monkeypatch.setattr(dispatch, "_warned", set())
    assert not group_cpu.available() and "no C++ compiler" in group_cpu.unavailable_reason()
    assert kernels.kernel_name(p, torch.randn(1, 64)) == "reference"
    monkeypatch.setattr(dispatch, "_warned", set())
    x = torch.randn(1, 64)
    with pytest.warns(RuntimeWarning, match="reference path.*no C\\+\\+ compiler"):
        y = kernels.matmul(p, x)
    assert torch.allclose(y, reference.matmul(p, x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once only
        kernels.matmul(p, x)


@needs_compiler
def test_quantlinear_forward_uses_kernel_with_bias_and_follows_buffer_changes():
    p = random_weight(24, 96, 4, 32, False)
    bias = torch.randn(24)
    lin = QuantLinear(p, bias)
    x = torch.randn(1, 5, 96)
    ref = reference.matmul(p, x) + bias
    assert torch.allclose(lin(x), ref, rtol=1e-5, atol=1e-5)
    lin.scales = lin.scales * 2  # a replaced buffer must be seen (no stale cached packed weight)
    assert torch.allclose(lin(x) - bias, 2 * (ref - bias), rtol=1e-4, atol=1e-4)
