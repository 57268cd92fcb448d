"""The compiled QuIP# (E8P) CPU kernel against the PyTorch reference on random ``QuipWeight``s: 2, 3 and 4 bits,
1-bit sign planes, real fp16 signs and no RHT, Hadamard and FFT transforms, 1/3 rows (fused decode) and more
(decode once + GEMM), fp32 and bf16 inputs, the AVX2 and the portable scalar loops."""
import math

import pytest
import torch

from lowbit.config import QuantConfig
from lowbit.kernels import build, quip_cpu, reference
from lowbit.packed.quipw import QuipWeight, pack_signs, stages_of
from lowbit.quip import e8p
from lowbit.quip.hadamard import hadamard_factor
from lowbit.solvers import SOLVERS

needs_compiler = pytest.mark.skipif(not build.has_compiler(), reason="no C++ compiler")  # a build error fails


def _kind(k):
    return "hadamard" if hadamard_factor(k) else "fft"


def random_quip(m, n, bits, signs, seed=0):
    """A ``QuipWeight`` with uniformly random codes (every bit pattern, both shifts) and random scales/signs."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-2 ** 15, 2 ** 15, (m, n // 8), generator=g, dtype=torch.int32).to(torch.int16)
    codes2 = None
    if bits == 3:
        codes2 = torch.randint(0, 256, (m, n // 8), generator=g, dtype=torch.int32).to(torch.uint8)
    elif bits == 4:
        codes2 = torch.randint(-2 ** 15, 2 ** 15, (m, n // 8), generator=g, dtype=torch.int32).to(torch.int16)
    scales = torch.rand(len(stages_of("e8p", bits)), generator=g) * 0.05 + 0.01
    su = sv = None
    out_kind = in_kind = "none"
    if signs != "none":
        a = torch.randint(0, 2, (m,), generator=g) * 2.0 - 1
        b = torch.randint(0, 2, (n,), generator=g) * 2.0 - 1
        if signs == "bits":
            su, sv = pack_signs(a), pack_signs(b)
        else:  # fine-tuned: real-valued fp16 "signs"
            su = (a * (0.8 + 0.4 * torch.rand(m, generator=g))).half()
            sv = (b * (0.8 + 0.4 * torch.rand(n, generator=g))).half()
        out_kind, in_kind = _kind(m), _kind(n)
    p = QuipWeight((m, n), bits, "e8p", out_kind, in_kind, codes=codes, scales=scales, codes2=codes2, su=su, sv=sv)
    assert p.sign_mode == signs
    return p


def assert_close_fp32(y, ref):
    """fp32 up to summation order: 1e-4 of the output norm overall and per element (relative to the RMS)."""
    assert y.shape == ref.shape and y.dtype == ref.dtype == torch.float32
    assert torch.isfinite(y).all()
    scale = ref.norm().item()
    assert (y - ref).norm().item() <= 1e-4 * scale
    assert (y - ref).abs().max().item() <= 1e-4 * scale / math.sqrt(ref.numel()) * 10


SHAPES = [(376, 576), (200, 1536)]  # out dims: 376 = 8·47 has no Hadamard (FFT), 200 = 100·2 (Paley II)


@needs_compiler
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("signs", ["bits", "real", "none"])
@pytest.mark.parametrize("m,n", SHAPES)
def test_quip_cpu_matches_reference(bits, signs, m, n):
    p = random_quip(m, n, bits, signs, seed=bits * 100 + n + len(signs))
    assert quip_cpu.supports(p, torch.empty(1, n))
    assert torch.equal(quip_cpu.rotated(p), p.rotated())  # bit for bit (prefill temporary)
    W = p.dequantize()
    gen = torch.Generator().manual_seed(m)
    for rows in (1, 3):
        x = torch.randn(rows, n, generator=gen)
        ref = reference.matmul(p, x)
        assert_close_fp32(quip_cpu.matmul(p, x), ref)
        assert_close_fp32(quip_cpu.matmul(p, x, scalar=True), ref)          # portable decode loop
        assert_close_fp32(quip_cpu.matmul(p, x, fast_rht=False), ref)       # torch transforms
        # bf16 input: the kernel works in fp32 and rounds once at the end -> within a bf16 ulp of the truth
        xb = x.to(torch.bfloat16)
        yb = quip_cpu.matmul(p, xb)
        assert yb.dtype == torch.bfloat16 and yb.shape == (rows, m)
        truth = xb.float() @ W.T
        err = (yb.float() - truth).abs()
        assert (err <= 2.0 ** -7 * truth.abs() + 1e-4 * truth.norm() / math.sqrt(truth.numel())).all()
        refb = reference.matmul(p, xb).float()  # rounds Ŵ to bf16 too: agrees to ~bf16 precision
        assert (yb.float() - refb).norm() <= 1e-2 * refb.norm()


@needs_compiler
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_quip_cpu_prefill_batch_dims_and_small_shapes(bits):
    p = random_quip(96, 376, bits, "bits", seed=bits)  # 376: FFT input transform, 96 = 12·8 Hadamard output
    x = torch.randn(2, 5, 376, generator=torch.Generator().manual_seed(1))  # 10 rows: decode once + GEMM
    y = quip_cpu.matmul(p, x)
    assert y.shape == (2, 5, 96)
    assert_close_fp32(y, reference.matmul(p, x))
    assert_close_fp32(y, p.matmul(x))
    for rows in range(1, quip_cpu.GEMV_MAX_TOKENS + 2):  # every token-block size of the fused path, and past it
        xr = x.reshape(10, 376)[:rows]
        assert_close_fp32(quip_cpu.matmul(p, xr), reference.matmul(p, xr))
    # rows of x and rows of Ŵ are independent: row i of y only depends on row i of x
    y1 = quip_cpu.matmul(p, x.reshape(10, 376)[3:4])
    assert_close_fp32(y1, y.reshape(10, 96)[3:4])
    assert quip_cpu.matmul(p, torch.empty(0, 376)).shape == (0, 96)


@needs_compiler
def test_quip_cpu_decodes_every_code_exactly():
    """All 65 536 E8P codes (one per row) and all 256 residual codes: the fused kernel's per-row dot products
    against one-hot inputs read the codewords back exactly."""
    m = 1 << 16
    codes = e8p.pack(torch.arange(m)[:, None])                      # (65536, 1) int16
    codes2 = torch.arange(m)[:, None].remainder(256).to(torch.uint8)
    scales = torch.tensor([1.0, 0.5])
    p = QuipWeight((m, 8), 3, "e8p", "none", "none", codes=codes, scales=scales, codes2=codes2)
    expect = e8p.codebook() + 0.5 * e8p.residual_codebook()[torch.arange(m) % 256]
    assert torch.equal(quip_cpu.rotated(p), expect)
    for j in range(0, 8, 3):
        x = torch.zeros(1, 8)
        x[0, j] = 1.0
        assert torch.equal(quip_cpu.matmul(p, x)[0], expect[:, j])
        assert torch.equal(quip_cpu.matmul(p, x, scalar=True)[0], expect[:, j])


@needs_compiler
def test_quip_cpu_on_a_solved_weight():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(1000, 192, generator=g)
    W, H = torch.randn(64, 192, generator=g) * 0.05, 2 / 1000 * X.T @ X
    for bits in (2, 3, 4):
        qw, _ = SOLVERS["quip"](W, H, QuantConfig(method="quip", bits=bits))
        x = torch.randn(3, 192, generator=g)
        assert quip_cpu.supports(qw, x)
        assert_close_fp32(quip_cpu.matmul(qw, x), reference.matmul(qw, x))


def test_quip_cpu_supports():
    p = random_quip(16, 64, 2, "bits")
    x = torch.randn(1, 64)
    assert quip_cpu.supports(p, x) and quip_cpu.supports(p, x.half()) and quip_cpu.supports(p, x.bfloat16())
    assert not quip_cpu.supports(p, x.double())
    scalar = QuipWeight((16, 64), 2, "scalar", "none", "none", codes=torch.zeros(16, 4, dtype=torch.int32),
                        scales=torch.ones(1))
    assert not quip_cpu.supports(scalar, x)
    assert not quip_cpu.supports(object(), x)
