"""The compiled Squeeze10 kernel (``"bin+int"``, :mod:`lowbit.kernels.mixed_cpu`) against the PyTorch reference on
random ``MixedBinaryWeight``s: 1–4 tokens (table-lookup decode) and more (dequantize once + GEMM), n not a multiple of
32 and partial last groups, group sizes 32/64/128 and odd ones, 2/3/4/8 high bits, high fractions 0, ~0.2 and 1,
with and without residual binarization, fp32/bf16/fp16 inputs, the AVX2 and the portable scalar loops, the
dispatcher and a quantized model's forward."""
import math

import pytest
import torch

import lowbit
from lowbit import kernels
from lowbit.kernels import build, mixed_cpu, reference
from lowbit.packed.mixed import MixedBinaryWeight
from lowbit.packed.qlinear import QuantLinear

needs_compiler = pytest.mark.skipif(not build.has_compiler(), reason="no C++ compiler")  # a build error fails


def random_mixed(m, n, gs, bits, frac, residual, seed=0):
    """A ``MixedBinaryWeight`` with random cells (``frac`` of them high), codes, fp16 parameters and residual signs."""
    g = torch.Generator().manual_seed(seed)
    G = -(-n // gs)
    high = torch.rand(m, G, generator=g) < frac
    if frac >= 1:
        high[:] = True
    high_w = high[:, torch.arange(n) // gs]
    codes = torch.where(high_w, torch.randint(0, 2 ** bits, (m, n), generator=g),
                        torch.randint(0, 2, (m, n), generator=g))
    p1 = torch.rand(m, G, generator=g) * 0.1 + 0.01                        # α or s
    p2 = torch.where(high, torch.rand(m, G, generator=g) * 2 ** bits,      # z
                     torch.randn(m, G, generator=g) * 0.02)                # μ
    extra = {}
    if residual:
        extra = {"res": torch.randint(0, 2, (m, n), generator=g), "p3": torch.rand(m, G, generator=g) * 0.05}
    p = MixedBinaryWeight.from_codes(codes, high, p1, p2, bits, gs, **extra)
    assert p.binary_residual == residual
    return p


def assert_close_fp32(y, ref):
    """fp32 up to summation order: 1e-5 of the output norm overall, 1e-4 of the RMS per element."""
    assert y.shape == ref.shape and y.dtype == ref.dtype == torch.float32
    assert torch.isfinite(y).all()
    scale = ref.norm().item()
    assert (y - ref).norm().item() <= 1e-5 * scale
    assert (y - ref).abs().max().item() <= 1e-4 * scale / math.sqrt(ref.numel()) * 10


CASES = [  # m, n, gs, bits, high fraction
    (48, 576, 128, 4, 0.2),
    (40, 300, 128, 4, 0.2),    # n % 32 != 0, partial last group (44 columns)
    (33, 200, 64, 3, 0.2),     # partial last group of 8
    (24, 96, 32, 2, 0.5),
    (20, 150, 37, 3, 0.3),     # odd group size: cells straddle bytes and words
    (17, 77, 13, 4, 0.0),      # all binary
    (17, 77, 13, 4, 1.0),      # all high
    (16, 130, 128, 8, 0.5),    # 8-bit high cells (7-bit rest codes), 2-column last group
    (12, 45, 7, 5, 1.0),
]


@needs_compiler
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("m,n,gs,bits,frac", CASES)
def test_mixed_cpu_matches_reference(m, n, gs, bits, frac, residual):
    p = random_mixed(m, n, gs, bits, frac, residual, seed=m * n + gs + bits)
    x = torch.randn(1, n)
    assert mixed_cpu.supports(p, x)
    assert torch.equal(mixed_cpu.dequantize(p), p.dequantize())  # prefill temporary: bit for bit
    gen = torch.Generator().manual_seed(n)
    for rows in (1, 2, 3, 4, 9):  # every token count of the decode path, and the GEMM path
        x = torch.randn(rows, n, generator=gen)
        ref = reference.matmul(p, x)
        assert_close_fp32(mixed_cpu.matmul(p, x), ref)
        assert_close_fp32(mixed_cpu.matmul(p, x, scalar=True), ref)  # portable loop
    # the values really depend on every part of the format
    assert not torch.allclose(mixed_cpu.matmul(p, x), torch.zeros(rows, m))


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_mixed_cpu_low_precision_inputs(dtype, rows):
    p = random_mixed(64, 320, 64, 4, 0.2, True, seed=rows)
    xl = torch.randn(rows, 320, generator=torch.Generator().manual_seed(rows)).to(dtype)
    y = mixed_cpu.matmul(p, xl)
    assert y.dtype == dtype and y.shape == (rows, 64)
    refl = reference.matmul(p, xl).float()  # rounds Ŵ to the low precision too: agrees to about its precision
    assert (y.float() - refl).norm() <= 1e-2 * refl.norm()
    if rows <= mixed_cpu.GEMV_MAX_TOKENS:  # decode: fp32 math, rounded once at the end
        truth = xl.float() @ p.dequantize().T
        err = (y.float() - truth).abs()
        ulp = 2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10
        assert (err <= ulp * truth.abs() + 1e-4 * truth.norm() / math.sqrt(truth.numel())).all()
    else:  # prefill: Ŵ in x.dtype and the GEMM of x.dtype, as the reference
        assert (y.float() - refl).norm() <= 1e-3 * refl.norm()


@needs_compiler
def test_mixed_cpu_batch_dims_empty_and_row_independence():
    p = random_mixed(40, 300, 128, 3, 0.2, True, seed=7)
    x = torch.randn(2, 5, 300, generator=torch.Generator().manual_seed(1))
    y = mixed_cpu.matmul(p, x)
    assert y.shape == (2, 5, 40)
    assert_close_fp32(y, reference.matmul(p, x))
    y1 = mixed_cpu.matmul(p, x.reshape(10, 300)[3:4])  # decode path on one row = that row of the GEMM path
    assert_close_fp32(y1, y.reshape(10, 40)[3:4])
    x3 = x[:1, :3]  # (1, 3, n): 3 tokens with a batch dim
    assert_close_fp32(mixed_cpu.matmul(p, x3), reference.matmul(p, x3))
    assert mixed_cpu.matmul(p, torch.empty(0, 300)).shape == (0, 40)
    assert mixed_cpu.matmul(p, torch.randn(300)).shape == (40,)


@needs_compiler
def test_mixed_cpu_reads_every_weight_exactly():
    """One-hot inputs read single columns of Ŵ back; with small integer parameters all sums are exact."""
    m, n, gs, bits = 24, 70, 9, 3
    g = torch.Generator().manual_seed(5)
    G = -(-n // gs)
    high = torch.rand(m, G, generator=g) < 0.4
    high_w = high[:, torch.arange(n) // gs]
    codes = torch.where(high_w, torch.randint(0, 8, (m, n), generator=g), torch.randint(0, 2, (m, n), generator=g))
    p1 = torch.randint(1, 4, (m, G), generator=g).float()
    p2 = torch.randint(-2, 3, (m, G), generator=g).float()
    p = MixedBinaryWeight.from_codes(codes, high, p1, p2, bits, gs, res=torch.randint(0, 2, (m, n), generator=g),
                                     p3=torch.randint(1, 3, (m, G), generator=g).float())
    W = p.dequantize()
    for j in (0, 8, 9, 31, 32, 63, 69):
        x = torch.zeros(1, n)
        x[0, j] = 1.0
        assert torch.equal(mixed_cpu.matmul(p, x)[0], W[:, j])
        assert torch.equal(mixed_cpu.matmul(p, x, scalar=True)[0], W[:, j])


@needs_compiler
def test_dispatcher_picks_mixed_kernel():
    p = random_mixed(32, 256, 128, 4, 0.2, False)
    x = torch.randn(1, 256)
    assert kernels.kernel_name(p, x) == "mixed_cpu"
    assert kernels.kernel_name(p, x.bfloat16()) == "mixed_cpu"
    with kernels.use_backend("exact"):
        assert kernels.kernel_name(p, x) == "mixed_cpu"
        assert_close_fp32(kernels.matmul(p, x), reference.matmul(p, x))
    assert_close_fp32(kernels.matmul(p, x), reference.matmul(p, x))  # auto: float activations too
    with kernels.use_backend("reference"):
        assert kernels.kernel_name(p, x) == "reference"
    assert kernels.kernel_name(p, x.double()) == "reference"
    assert kernels.kernel_name(p, x.requires_grad_()) == "reference"  # autograd needs the torch path


def test_mixed_cpu_supports():
    p = random_mixed(8, 64, 32, 4, 0.5, False)
    x = torch.randn(1, 64)
    assert mixed_cpu.supports(p, x) and mixed_cpu.supports(p, x.half()) and mixed_cpu.supports(p, x.bfloat16())
    assert not mixed_cpu.supports(p, x.double())
    assert not mixed_cpu.supports(object(), x)


@needs_compiler
def test_quantlinear_forward_uses_mixed_kernel():
    p = random_mixed(24, 200, 64, 4, 0.3, True, seed=3)
    bias = torch.randn(24)
    lin = QuantLinear(p, bias)
    for shape in ((1, 1, 200), (1, 3, 200), (2, 6, 200)):
        x = torch.randn(*shape)
        with kernels.use_backend("reference"):
            ref = lin(x)
        y = lin(x)
        assert kernels.kernel_name(lin.packed, x) == "mixed_cpu"
        assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@needs_compiler
def test_squeeze_model_forward_matches_reference_backend(tiny_models, tiny_text, tmp_path):
    res = lowbit.quantize(str(tiny_models["llama"]), method="squeeze", group_size=32, source=str(tiny_text),
                          nsamples=4, seqlen=32, out=tmp_path / "q", progress=False)
    model, tok, _ = lowbit.load(tmp_path / "q", device="cpu")
    mods = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert mods and all(m.packed.kind == "bin+int" for m in mods)
    ids = torch.tensor(tok(tiny_text.read_text()[:500], add_special_tokens=False)["input_ids"][:12])[None]
    with torch.no_grad():
        for part in (ids[:, :1], ids[:, :3], ids):  # decode-sized inputs and a prefill
            assert kernels.kernel_name(mods[0].packed, torch.empty(part.shape[1], mods[0].in_features)) == "mixed_cpu"
            y = model(input_ids=part).logits
            with kernels.use_backend("reference"):
                ref = model(input_ids=part).logits
            assert torch.allclose(y, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert res.meta["config"]["binary_frac"] == 0.8


@needs_compiler
def test_mixed_cpu_thread_count_does_not_change_the_result():
    """Rows are split between threads; each row's sums are formed the same way whatever the split."""
    p = random_mixed(100, 300, 64, 4, 0.3, True, seed=11)
    x = torch.randn(2, 300, generator=torch.Generator().manual_seed(2))
    y1 = mixed_cpu.matmul(p, x)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        y2 = mixed_cpu.matmul(p, x)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(y1, y2)
    assert_close_fp32(y2, reference.matmul(p, x))
