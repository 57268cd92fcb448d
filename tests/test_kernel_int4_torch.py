"""torch's int4 weight-only matmul (tinygemm) for 4-bit ``GroupQuantWeight`` (:mod:`lowbit.kernels.int4_torch`).

Without a GPU: the zero/scale conversion against lowbit's own dequantization, torch's CPU twin of the op
(``aten._weight_int4pack_mm_for_cpu``: the same decode ``(q − 8)·scale + zero``, the same ``scales_and_zeros``)
on the converted layout against ``x Ŵᵀ``, the weights the op refuses, and the dispatcher's choices.  Where CUDA
exists: the CUDA op itself, and a tiny model quantized, loaded on CUDA and run without dequantizing.
"""
import dataclasses

import pytest
import torch

import lowbit
from lowbit import kernels
from lowbit.kernels import build, dispatch, int4_torch, reference
from lowbit.packed.qlinear import QuantLinear
from lowbit.packed.qweight import GroupQuantWeight

from helpers import random_weight

cpu_twin = pytest.mark.skipif(not int4_torch.cpu_available(), reason="this torch has no _weight_int4pack_mm_for_cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

# Bounds on max|y − ref| / max|ref|, ref = x Ŵᵀ in fp32 with lowbit's Ŵ and the same (rounded) x (measured
# here: 1.4e-6, 4.6e-4, 5.1e-3; on CUDA, emulated, 5.9e-3):
# fp32: the conversion is exact (module docstring), only the summation order differs;
# fp16: the shifted zero s·(8 − z) rounded to fp16 (unit roundoff 2⁻¹¹), the output too;
# bf16: scale and shifted zero rounded to bf16 (2⁻⁸, relative to |s|·|q − 8| + |s·(8 − z)|), the output too.
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
# Against what the op itself decodes, only the rounding of the output (one unit roundoff) and summation order.
ROUNDOFF = {torch.float32: 1e-5, torch.float16: 1.05 * 2 ** -11, torch.bfloat16: 1.05 * 2 ** -8}
SHAPES = ((32, 256), (48, 512), (16, 768))


def _err(y, ref):
    return ((y.float() - ref).abs().max() / ref.abs().max()).item()


def _tinygemm_weight(codes, sz, dtype, gs):
    """What the op decodes: ``(q − 8)·S0 + S1`` with ``S`` rounded to the compute ``dtype``, in fp32 (m, n) (the
    CPU twin decodes in fp32 like this; the CUDA kernel rounds the result to bf16 by its bf16 FMA)."""
    s = sz.to(dtype).float()[torch.arange(codes.shape[1], device=sz.device) // gs]  # (n, m, 2)
    return (codes.float() - 8) * s[..., 0].T + s[..., 1].T


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("gs", int4_torch.GROUP_SIZES)
def test_layout_decodes_to_lowbits_weight_exactly(sym, gs):
    """``(q − 8)·S[g, i, 0] + S[g, i, 1]`` is ``s·(q − z)`` bit for bit (fp32), and the codes are lowbit's."""
    p = random_weight(24, 512, 4, gs, sym, seed=gs)
    codes, sz = int4_torch.layout(p)
    assert codes.dtype == torch.uint8 and codes.shape == (24, 512) and sz.shape == (512 // gs, 24, 2)
    assert torch.equal(codes.long(), p.codes())
    assert torch.equal(_tinygemm_weight(codes, sz, torch.float32, gs), p.dequantize())
    assert torch.equal(sz[..., 0], p.scales.float().T)  # the first entry is the scale itself
    assert sym == bool((sz[..., 1] == 0).all())  # symmetric (z = 8): no shift; asymmetric: some


def test_nibble_order_is_the_cuda_ops_input():
    """The CUDA op's input byte holds the even column in the high nibble (int4mm.cu; torch's
    ``_group_quantize_tensor`` packs ``q[:, ::2] << 4 | q[:, 1::2]`` for CUDA)."""
    q = torch.tensor([[1, 2, 3, 4], [15, 0, 7, 8]], dtype=torch.uint8)
    assert int4_torch._nibbles(q).tolist() == [[0x12, 0x34], [0xF0, 0x78]]


@cpu_twin
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gs", int4_torch.GROUP_SIZES)
@pytest.mark.parametrize("sym", [True, False])
def test_cpu_twin_equals_dequantized_matmul(dtype, gs, sym):
    """torch's CPU op on the converted layout computes ``x Ŵᵀ`` with lowbit's ``Ŵ``: within summation order in
    fp32, and exactly what the op's own decoding in ``dtype`` gives otherwise (within the output rounding)."""
    for k, (m, n) in enumerate(SHAPES):
        if n % gs:
            continue
        p = random_weight(m, n, 4, gs, sym, seed=100 * k + gs)
        run = int4_torch.plan(p, dtype)
        w, w_op = p.dequantize(), _tinygemm_weight(*int4_torch.layout(p), dtype, gs)  # lowbit's; the op's decode
        if dtype != torch.float32 and not sym:  # the rounding of S really shows: the bound below is not vacuous
            assert not torch.equal(w_op, w)
        for shape in ((1, n), (3, n), (2, 5, n)):
            x = torch.randn(*shape, generator=torch.Generator().manual_seed(n + shape[0])).to(dtype)
            y = run(x)
            assert y.dtype == dtype and y.shape == (*shape[:-1], m)
            assert _err(y, x.float() @ w.T) < TOL[dtype], (m, n, shape)
            assert _err(y, x.float() @ w_op.T) < ROUNDOFF[dtype]


@cpu_twin
def test_a_wrong_convention_fails():
    """The tests above can fail: lowbit's zero point passed as tinygemm's (no ``(8 − z)·s`` shift) is far off."""
    p = random_weight(32, 256, 4, 64, False, seed=3)
    codes, sz = int4_torch.layout(p)
    wrong = sz.clone()
    wrong[..., 1] = p.zeros().T
    packed = int4_torch.VARIANTS["cpu"].convert(codes, int4_torch.inner_k_tiles(256))
    x = torch.randn(2, 256)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 64, wrong)
    assert _err(y, x @ p.dequantize().T) > 0.1
    good = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 64, sz)
    assert _err(good, x @ p.dequantize().T) < TOL[torch.float32]


def test_refusals_name_the_reason():
    assert int4_torch.refusal(random_weight(32, 256, 4, 64, False)) is None
    assert int4_torch.refusal(random_weight(32, 256, 4, 256, True)) is None
    cases = {"4-bit": random_weight(32, 256, 3, 64, False),
             "g_idx": random_weight(32, 256, 4, 64, False, g_idx=True),
             "group size 16": random_weight(32, 256, 4, 16, False),
             "group size 100": random_weight(32, 300, 4, 100, False),
             "partial": random_weight(32, 288, 4, 64, False),     # 4.5 groups
             "not a multiple of 8": random_weight(20, 256, 4, 64, False)}
    for why, p in cases.items():
        assert why in int4_torch.refusal(p), (why, int4_torch.refusal(p))
    p = random_weight(32, 256, 4, 64, False)
    assert "multiple of 16" in int4_torch.refusal(random_weight(24, 256, 4, 64, False), 16)
    assert "scales" in int4_torch.refusal(dataclasses.replace(p, scales=p.scales[:, :3]))
    assert "qzeros" in int4_torch.refusal(dataclasses.replace(p, qzeros=p.qzeros.long()))
    with pytest.raises(ValueError, match="partial"):
        int4_torch.plan(cases["partial"])


def test_inner_k_tiles():
    assert [int4_torch.inner_k_tiles(n) for n in (32, 64, 96, 128, 576, 1536)] == [2, 4, 2, 8, 4, 8]


def test_cpu_inputs_never_take_it():
    """CPU (and meta) inputs: the kernel declines, so CPU dispatch is what it was (the group kernel or the
    reference path)."""
    p = random_weight(32, 256, 4, 64, False)
    for x in (torch.randn(1, 256), torch.randn(3, 256).bfloat16(), torch.randn(1, 256, device="meta")):
        assert not int4_torch.supports(p, x)
    assert kernels.kernel_name(p, torch.randn(1, 256)) == ("group_cpu" if build.has_compiler() else "reference")


def test_exact_backend_takes_it_for_bf16_inputs_only(monkeypatch):
    """The op computes in bf16: under ``"auto"`` every float input goes to it (cast), under ``"exact"`` only bf16
    (others take the reference path).  CUDA is faked here by making ``supports`` say yes for a weight whose
    bf16 scales the CPU kernels do not read."""
    p = random_weight(32, 256, 4, 64, False)
    p = dataclasses.replace(p, scales=p.scales.bfloat16())
    monkeypatch.setattr(int4_torch, "supports", lambda packed, x: True)
    monkeypatch.setattr(int4_torch, "unavailable_reason", lambda: None)
    monkeypatch.setattr(int4_torch, "available", lambda: True)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(1, 256).to(dtype)
        assert kernels.kernel_name(p, x) == "int4_torch"
        with kernels.use_backend("exact"):
            assert kernels.kernel_name(p, x) == ("int4_torch" if dtype == torch.bfloat16 else "reference")
        with kernels.use_backend("reference"):
            assert kernels.kernel_name(p, x) == "reference"


def test_lowbit_kernels_lists_it_with_its_reason(capsys):
    rows = {r.name: r for r in kernels.warm_up()}
    assert rows["int4_torch"].available == int4_torch.available()
    if not torch.cuda.is_available():
        assert rows["int4_torch"].reason == "no CUDA device"
    line = next(l for l in dispatch.status_table(list(rows.values())).splitlines() if l.startswith("int4_torch"))
    assert line.split()[1] == ("yes" if int4_torch.available() else "no")


# ---- where CUDA exists -------------------------------------------------------------------------------------


def _sm80():
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("tinygemm needs compute capability 8.0+")


def _cuda(p):
    return dataclasses.replace(p, **{k: t.cuda() for k, t in p.tensors().items()})


@needs_cuda
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("gs", int4_torch.GROUP_SIZES)
def test_cuda_op_equals_dequantized_matmul(sym, gs):
    _sm80()
    for m, n in ((32, 256), (64, 512), (24, 1536), (8, 768)):
        if n % gs:
            continue
        p = _cuda(random_weight(m, n, 4, gs, sym, seed=m + n + gs))
        codes, sz = int4_torch.layout(p)
        assert codes.is_cuda and sz.is_cuda
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            x = torch.randn(5, n, device="cuda").to(dtype)
            assert kernels.kernel_name(p, x) == "int4_torch"
            y = kernels.matmul(p, x)
            assert y.dtype == dtype and y.shape == (5, m)
            xb = x.bfloat16().float()  # the op computes with bf16 activations
            assert _err(y, xb @ p.dequantize().T) < TOL[torch.bfloat16], (m, n, dtype)
            w_op = _tinygemm_weight(codes, sz, torch.bfloat16, gs).bfloat16().float()  # decoded by a bf16 FMA
            assert _err(y, xb @ w_op.T) < ROUNDOFF[torch.bfloat16]
        for x in (torch.randn(1, n, device="cuda").bfloat16(), torch.randn(2, 3, n, device="cuda").bfloat16()):
            assert kernels.matmul(p, x).shape == (*x.shape[:-1], m)
        assert kernels.matmul(p, torch.empty(0, n, device="cuda").bfloat16()).shape == (0, m)


@needs_cuda
def test_cuda_refused_weights_and_devices_take_the_reference_path():
    _sm80()
    x = torch.randn(2, 256, device="cuda").bfloat16()
    for p in (random_weight(32, 256, 3, 64, False), random_weight(32, 256, 4, 64, False, g_idx=True),
              random_weight(20, 256, 4, 64, False), random_weight(32, 256, 4, 100, False)):
        p = _cuda(p)
        assert kernels.kernel_name(p, x) == "reference"
        assert torch.allclose(kernels.matmul(p, x), reference.matmul(p, x))
    p = random_weight(32, 256, 4, 64, False)  # buffers left on the CPU, input on CUDA: not this kernel
    assert not int4_torch.supports(p, x)


@needs_cuda
def test_quantlinear_on_cuda_caches_the_repacked_weight(monkeypatch):
    _sm80()
    p = random_weight(64, 256, 4, 64, False)
    lin = QuantLinear(p, torch.randn(64)).cuda()
    x = torch.randn(1, 3, 256, device="cuda").bfloat16()
    with kernels.use_backend("reference"):
        ref = lin(x).float()
    calls = []
    monkeypatch.setattr(int4_torch, "layout", lambda packed, _f=int4_torch.layout: calls.append(1) or _f(packed))
    monkeypatch.setattr(GroupQuantWeight, "dequantize", lambda *a, **k: pytest.fail("dequantized on CUDA"))
    for _ in range(3):
        y = lin(x)
    assert len(calls) == 1  # repacked once, on the first call
    assert _err(y, ref) < TOL[torch.bfloat16]


@needs_cuda
def test_tiny_model_quantized_loaded_and_run_on_cuda(tiny_models, tmp_path, monkeypatch):
    """quantize (RTN w4g32) -> load on CUDA in bf16 -> forward: every quantized layer the op takes runs it, none
    of them dequantizes, and the logits agree with the reference backend's."""
    _sm80()
    out = tmp_path / "q"
    lowbit.quantize(str(tiny_models["llama"]), method="rtn", bits=4, group_size=32, out=out, progress=False)
    model, _, _ = lowbit.load(out, device="cuda", dtype=torch.bfloat16)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    taken = [m for m in layers if int4_torch.refusal(m.packed) is None]
    assert layers and len(taken) >= len(layers) - 1  # (a quantized head of an odd vocabulary may not fit)
    for m in taken:
        probe = torch.empty(1, m.in_features, device="cuda", dtype=torch.bfloat16)
        assert kernels.kernel_name(m.packed, probe) == "int4_torch"
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0)).cuda()
    with torch.no_grad():
        with kernels.use_backend("reference"):
            ref = model(ids).logits.float()
        dequantized = []
        orig = GroupQuantWeight.dequantize
        monkeypatch.setattr(GroupQuantWeight, "dequantize",
                            lambda self, *a, **k: dequantized.append(self.shape) or orig(self, *a, **k))
        y = model(ids).logits.float()
    assert not [s for s in dequantized if s in {tuple(m.packed.shape) for m in taken}]
    assert ((y - ref).norm() / ref.norm()).item() < 0.03
    assert (y.argmax(-1) == ref.argmax(-1)).float().mean().item() > 0.9
