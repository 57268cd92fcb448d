"""The kernels' build helper (sources from ``csrc/``, the cache key, failures reported in one line), ``warm_up``
and ``lowbit kernels``, the group kernel's build-time variants, and the fallbacks of every ``supports()``: a
packed layer converted by ``model.to(torch.bfloat16)`` or a buffer off the CPU takes the reference path."""
import dataclasses
import subprocess
import sys

import pytest
import torch

from lowbit import kernels
from lowbit.cli import main
from lowbit.kernels import build, group_cpu, int4_torch, reference
from lowbit.packed.mixed import MixedBinaryWeight
from lowbit.packed.qlinear import QuantLinear
from lowbit.packed.qweight import OutlierQuantWeight
from lowbit.packed.quipw import QuipWeight

from helpers import random_weight

needs_compiler = pytest.mark.skipif(not build.has_compiler(), reason="no C++ compiler")  # a build error fails
_CUDA_ONLY = {"int4_torch": int4_torch}  # available where a CUDA device is (tests/test_kernel_int4_torch.py)


def test_sources_are_package_files_with_their_headers():
    files = build.source_files(build.CSRC / "group_cpu.cpp")
    assert [f.name for f in files] == ["group_cpu.cpp", "group_cpu_bf16.h", "group_cpu_avx2.h", "group_cpu_q8.h"]
    for name in ("group_cpu", "outliers", "quip_cpu", "mixed_cpu"):
        mod = kernels.KERNELS[name]
        assert mod.EXT.source.is_file() and mod.EXT.source.parent == build.CSRC


def test_cache_key_covers_sources_flags_torch_python_and_compiler(tmp_path, monkeypatch):
    (tmp_path / "k.cpp").write_text('#include "k.h"\nint f() { return K; }\n')
    (tmp_path / "k.h").write_text("#define K 1\n")
    files = build.source_files(tmp_path / "k.cpp")
    assert [f.name for f in files] == ["k.cpp", "k.h"]
    key = build.cache_key(files, ["-O3"])
    assert build.cache_key(files, ["-O3"]) == key  # deterministic
    assert build.cache_key(files, ["-O3", "-DX"]) != key
    (tmp_path / "k.h").write_text("#define K 2\n")  # an included header's bytes count
    assert build.cache_key(files, ["-O3"]) != key
    (tmp_path / "k.h").write_text("#define K 1\n")
    assert build.cache_key(files, ["-O3"]) == key
    for target, attr, value in ((sys, "version", "3.99.0 (other)"), (torch, "__version__", "0.0.0"),
                                (build, "compiler_version", lambda: "clang version 99")):
        with monkeypatch.context() as m:
            m.setattr(target, attr, value)
            assert build.cache_key(files, ["-O3"]) != key, attr


def test_no_compiler_is_reported_not_raised(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    ext = group_cpu.EXT.variant()
    assert not build.has_compiler()
    assert ext.load() is None and not ext.available()
    assert ext.reason().startswith("no C++ compiler") and "/nonexistent/c++" in ext.reason()


@needs_compiler
def test_build_error_is_one_line_with_the_compiler_message(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "bad.cpp").write_text("#error lowbit-test-broken-source\n")
    ext = build.Extension("bad", tmp_path / "bad.cpp", ("-O0",), "test kernel")
    assert ext.load() is None
    reason = ext.reason()
    assert reason.startswith("build error: ") and "lowbit-test-broken-source" in reason and "\n" not in reason
    assert any((tmp_path / "cache" / "kernels").glob("lowbit_bad_*"))  # built under $LOWBIT_CACHE/kernels


@needs_compiler
def test_warm_up_builds_every_kernel_and_says_what_it_has():
    rows = kernels.warm_up()
    assert [r.name for r in rows] == [*kernels.KERNELS, *kernels.SOLVER_KERNELS]
    assert all(r.available == (r.name not in _CUDA_ONLY or _CUDA_ONLY[r.name].available()) and r.reason
               for r in rows), rows
    assert "AVX" in rows[0].reason or "scalar" in rows[0].reason
    with kernels.use_backend("reference"):
        rows = kernels.warm_up()
    assert not any(r.available for r in rows) and all("reference backend" in r.reason for r in rows)


@needs_compiler
def test_lowbit_kernels_prints_one_line_per_kernel(capsys):
    assert main(["kernels"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["kernel", "available", "reason"]
    assert [l.split()[:2] for l in lines[1:]] == [
        [name, "yes" if name not in _CUDA_ONLY or _CUDA_ONLY[name].available() else "no"]
        for name in [*kernels.KERNELS, *kernels.SOLVER_KERNELS]]


def test_table_says_why_not():
    rows = [kernels.KernelStatus("group_cpu", False, "no C++ compiler ('c++' not found or not working; set CXX)"),
            kernels.KernelStatus("quip_cpu", True, "AVX2")]
    lines = kernels.status_table(rows).splitlines()
    assert lines[1].split(None, 2) == ["group_cpu", "no", rows[0].reason]
    assert lines[2].split(None, 2) == ["quip_cpu", "yes", "AVX2"]


@pytest.mark.e2e
@needs_compiler
def test_python_m_lowbit_kernels():
    r = subprocess.run([sys.executable, "-m", "lowbit.kernels"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 1 + len(kernels.KERNELS) + len(kernels.SOLVER_KERNELS) and "Traceback" not in r.stderr


@pytest.mark.e2e
@needs_compiler
@pytest.mark.parametrize("define", ["LOWBIT_NO_AVX512", "LOWBIT_NO_AVX2"])
def test_group_kernel_variants_match_reference(define):
    """The paths of CPUs without AVX-512 (AVX2 + int8 activations) and without AVX2 (scalar), built here by
    ``-D`` defines, against the reference (on an AVX-512 machine they would otherwise never run)."""
    ext = group_cpu.EXT.variant(define)
    mod = ext.load()
    assert mod is not None, ext.reason()
    assert not mod.has_avx512() and not mod.has_bf16()
    if define == "LOWBIT_NO_AVX2":
        assert not mod.has_avx2() and not mod.has_q8()
    for bits, m, n, gs, g_idx in ((4, 48, 576, 64, False), (3, 37, 100, 32, True), (8, 9, 77, 10, False),
                                  (2, 16, 64, 64, False), (5, 20, 130, 128, False)):
        for sym in (True, False):
            p = random_weight(m, n, bits, gs, sym, g_idx, seed=bits + n)
            args = (p.qweight, p.scales, torch.empty(0, dtype=torch.int32) if sym else p.qzeros,
                    p.g_idx if g_idx else torch.empty(0, dtype=torch.int32))
            assert torch.equal(mod.dequantize(*args, n, bits, gs), reference.dequantize(p))
            x = torch.randn(3, n, generator=torch.Generator().manual_seed(n))
            ref = reference.matmul(p, x)
            y = mod.gemm(x, *args, bits, gs, 3)
            assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
            if mod.has_q8() and group_cpu.int8_supported(p):
                xhat = reference.int8_blocks(x, 64 if bits == 2 else 32)
                y8 = mod.gemm_q8(x, *args[:3], bits, gs)
                assert torch.allclose(y8, xhat @ p.dequantize().T, rtol=1e-5, atol=2e-5 * ref.abs().max().item())


def _weights():
    """One weight (24, 96) of every kernel's format, in its canonical layout, with random contents."""
    g = torch.Generator().manual_seed(0)
    dense = random_weight(24, 96, 4, 32, False, seed=1)
    high = torch.rand(24, 3, generator=g) < 0.3  # mixed: 3 cells of 32 per row, about 30 % high (4-bit)
    codes = torch.where(high[:, torch.arange(96) // 32], torch.randint(0, 16, (24, 96), generator=g),
                        torch.randint(0, 2, (24, 96), generator=g))
    mixed = MixedBinaryWeight.from_codes(codes, high, torch.rand(24, 3, generator=g) * 0.1 + 0.01,
                                         torch.randn(24, 3, generator=g) * 0.02, 4, 32,
                                         res=torch.randint(0, 2, (24, 96), generator=g),
                                         p3=torch.rand(24, 3, generator=g) * 0.05)
    quip = QuipWeight((24, 96), 3, "e8p", "hadamard", "hadamard",  # 3 bits: E8P codes + 8-bit E8 residual
                      codes=torch.randint(-2 ** 15, 2 ** 15, (24, 12), generator=g, dtype=torch.int32).to(torch.int16),
                      scales=torch.tensor([0.03, 0.01]),
                      codes2=torch.randint(0, 256, (24, 12), generator=g, dtype=torch.int32).to(torch.uint8),
                      su=(torch.rand(24, generator=g) + 0.5).half(), sv=(0.5 - torch.rand(96, generator=g)).half())
    return {"group_cpu": dense,
            "outliers": OutlierQuantWeight.from_dense(dense, torch.randn(24, 96, generator=g),
                                                          torch.rand(24, 96, generator=g) < 0.02),
            "mixed_cpu": mixed, "quip_cpu": quip}


@needs_compiler
@pytest.mark.parametrize("name", ["group_cpu", "outliers", "mixed_cpu", "quip_cpu"])
def test_bfloat16_model_runs_and_equals_reference(name):
    """``QuantLinear(...).to(torch.bfloat16)`` turns the fp16 scales into bf16: the int, outlier and mixed kernels
    read fp16 only, so they decline and the layer runs the reference path, exactly; the QuIP# kernel casts its
    scales to fp32 as the reference does, so it keeps running and agrees with the reference."""
    p = _weights()[name]
    bias = torch.randn(24)
    lin = QuantLinear(p, bias)
    assert kernels.kernel_name(lin.packed, torch.randn(1, 96)) == name  # before: the kernel
    lin = lin.to(torch.bfloat16)
    assert any(t.dtype == torch.bfloat16 for t in lin.packed.tensors().values())
    for x in (torch.randn(1, 2, 96).bfloat16(), torch.randn(3, 96), torch.randn(7, 96).bfloat16()):
        ref = reference.matmul(lin.packed, x) + lin.bias.to(x.dtype)
        y = lin(x)
        assert y.dtype == x.dtype and y.shape == ref.shape
        if name == "quip_cpu":
            assert kernels.kernel_name(lin.packed, x) == "quip_cpu"
            assert (y.float() - ref.float()).norm() <= 2e-2 * ref.float().norm()
        else:
            assert kernels.kernel_name(lin.packed, x) == "reference"
            assert torch.equal(y, ref)


@pytest.mark.parametrize("name", ["group_cpu", "outliers", "mixed_cpu", "quip_cpu"])
def test_supports_checks_every_tensor_and_the_input(name):
    """A tensor off the CPU (``meta`` stands in for CUDA here), non-contiguous or of the wrong dtype, or an input
    of the wrong width: the kernel declines (the dispatcher then runs the reference path) instead of raising."""
    p, mod = _weights()[name], kernels.KERNELS[name]
    x = torch.randn(2, 96)
    assert mod.supports(p, x) and mod.supports(p, x.bfloat16()) and mod.supports(p, x.half())
    assert not mod.supports(p, x.double()) and not mod.supports(p, x[:, :95]) and not mod.supports(p, x.to("meta"))
    for key, t in p.tensors().items():
        if t.device.type == "cpu" and t.numel() > 1:
            assert not mod.supports(dataclasses.replace(p, **{key: t.to("meta")}), x), key
            if t.dim() == 2 and min(t.shape) > 1:
                assert not mod.supports(dataclasses.replace(p, **{key: t.t().contiguous().t()}), x), key
    narrow = {torch.float16: torch.bfloat16, torch.int32: torch.int64, torch.int16: torch.int32,
              torch.uint8: torch.int16}
    for key, t in p.tensors().items():
        if name == "quip_cpu" and key in ("scales", "su", "sv"):  # float, cast to fp32 like the reference does
            continue
        if key == "outlier_col":  # int16 or int32 by width: both are read
            continue
        assert not mod.supports(dataclasses.replace(p, **{key: t.to(narrow[t.dtype])}), x), key


@needs_compiler
def test_input_of_the_wrong_width_raises_even_after_a_good_one():
    """The layer's cached plan is per input width: a narrower ``x`` gets the reference path, which raises,
    instead of the kernel reading only the first columns of each row."""
    lin = QuantLinear(random_weight(24, 96, 4, 32, False), None)
    assert lin(torch.randn(1, 96)).shape == (1, 24)
    with pytest.raises(RuntimeError):
        lin(torch.randn(1, 64))
