"""The int8-activation (AVX2 maddubs) decode path for 3-bit weights: exactly ``x̂ Ŵᵀ`` with ``x̂`` the
int8-rounded activation blocks, for sym/asym weights, several shapes and group sizes, 1 and 3 tokens."""
import pytest
import torch

from lowbit.kernels import build, group_cpu, reference
from lowbit.packed.qweight import GroupQuantWeight
from helpers import random_weight

needs_compiler = pytest.mark.skipif(not build.has_compiler(), reason="no C++ compiler")  # a build error fails
q8 = pytest.mark.skipif(group_cpu.available() and not group_cpu.EXT.load().has_q8(),
                        reason="no int8 path (the CPU has no AVX2)")


# (m, n, gs): m not a multiple of 8 (or 32: the kernel's row tiles), n = 576, group sizes 32/64/128 and n
Q8_3BIT_CASES = [(48, 576, 64), (37, 576, 32), (17, 576, 128), (40, 1536, 128), (33, 640, -1), (1, 96, 32),
                 (70, 288, 96)]


@needs_compiler
@q8
@pytest.mark.parametrize("m,n,gs", Q8_3BIT_CASES)
@pytest.mark.parametrize("sym", [True, False])
def test_int8_path_3bit_is_exactly_xhat_times_w(m, n, gs, sym):
    gs = n if gs == -1 else gs
    p = random_weight(m, n, 3, gs, sym, seed=3 * 7 + n + m)
    assert group_cpu.int8_supported(p)
    for tokens in (1, 3):
        x = torch.randn(tokens, n, generator=torch.Generator().manual_seed(tokens + m)) * 3
        x[0, 5] = 40.0  # an outlier channel: its block gets a coarse scale
        y = group_cpu.matmul(p, x, int8_act=True)
        xhat = reference.int8_blocks(x, 32)
        ref_hat, ref = xhat @ p.dequantize().T, reference.matmul(p, x)
        assert y.shape == (tokens, m) and y.dtype == torch.float32
        assert torch.allclose(y, ref_hat, rtol=1e-5, atol=2e-5 * ref_hat.abs().max().item())
        assert not torch.equal(xhat, x)
        rel = ((y - ref).norm() / ref.norm()).item()
        assert 1e-5 < rel < (0.03 if m >= 8 else 0.1), rel  # really rounded, and only a little (1 row: noisier)
    x = torch.randn(group_cpu.GEMV_MAX_TOKENS + 1, n)  # many tokens: the exact (dequantize + GEMM) path
    ref = reference.matmul(p, x)
    assert torch.allclose(group_cpu.matmul(p, x, int8_act=True), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@needs_compiler
@q8
def test_int8_path_3bit_unpacks_every_position():
    """One-hot activations read each weight column on its own: every code position of a 32-code block (the
    unpack permutation), every row (the row tiles) and every group's zero must come out right."""
    m, n, gs = 35, 128, 64
    for sym in (True, False):
        p = random_weight(m, n, 3, gs, sym, seed=11 + sym)
        w = p.dequantize()
        y = group_cpu.matmul(p, torch.eye(n), int8_act=True)  # n > GEMV_MAX_TOKENS: exact GEMM path, so go by rows
        assert torch.allclose(y, w.T, rtol=1e-6, atol=1e-7)
        for j in range(n):
            x = torch.zeros(1, n)
            x[0, j] = 1.0  # x̂ = x exactly (d = 1/127, xq = 127)
            yj = group_cpu.matmul(p, x, int8_act=True)
            assert torch.allclose(yj[0], w[:, j], rtol=1e-5, atol=1e-6), j


@needs_compiler
@q8
def test_int8_path_3bit_extreme_codes_and_bf16_input():
    """All codes 7 (or 0) against all activations ±127: the int16 pair sums stay in range; bf16 in -> bf16 out."""
    m, n, gs = 9, 576, 64
    for code in (0, 7):
        codes = torch.full((m, n), code)
        scales = torch.full((m, n // gs), 0.01)
        zeros = torch.full((m, n // gs), float(7 - code))
        p = GroupQuantWeight.from_codes(codes, scales, zeros, 3, gs)
        assert group_cpu.int8_supported(p)
        for sign in (1.0, -1.0):
            x = torch.full((1, n), sign)
            y = group_cpu.matmul(p, x, int8_act=True)
            s = p.scales[0, 0].float().item()  # 0.01 in fp16
            expect = sign * n * s * (code - (7 - code))
            assert torch.allclose(y, torch.full((1, m), expect), rtol=1e-5), (code, sign, y[0, 0].item())
            assert torch.allclose(y, reference.int8_blocks(x, 32) @ p.dequantize().T, rtol=1e-5)
    p = random_weight(24, 576, 3, 64, False, seed=5)
    x = torch.randn(2, 576)
    yb = group_cpu.matmul(p, x.bfloat16(), int8_act=True)
    assert yb.dtype == torch.bfloat16 and yb.shape == (2, 24)
    ref_hat = reference.int8_blocks(x.bfloat16().float(), 32) @ p.dequantize().T
    assert torch.allclose(yb.float(), ref_hat, rtol=1e-2, atol=1e-2 * ref_hat.abs().max().item())


@needs_compiler
@q8
def test_int8_supported_for_3bit():
    assert group_cpu.int8_supported(random_weight(8, 576, 3, 64, False))
    assert group_cpu.int8_supported(random_weight(8, 576, 3, 64, True))
    assert not group_cpu.int8_supported(random_weight(8, 100, 3, 32, False))  # n % 32
    assert not group_cpu.int8_supported(random_weight(8, 576, 3, 48, False))  # group size % 32
    assert not group_cpu.int8_supported(random_weight(8, 576, 3, 64, False, g_idx=True))
    p = random_weight(8, 100, 3, 32, False)  # not supported: int8_act=True falls back to the exact kernel
    x = torch.randn(1, 100)
    assert torch.allclose(group_cpu.matmul(p, x, int8_act=True), reference.matmul(p, x), rtol=1e-5, atol=1e-5)
