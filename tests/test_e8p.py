"""E8P codebook: source patterns, lattice membership, exact encoding, packing; the 1-bit E8 residual codebook."""
from __future__ import annotations

import itertools

import pytest
import torch

from lowbit.quip import e8p


@pytest.fixture(scope="module")
def cb():
    return e8p.codebook().double()


def _brute_force(x: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """argmin_c ‖x − c‖² over the rows of C, chunked, float64."""
    C = C.double()
    return torch.cat([torch.cdist(x[s:s + 512].double(), C).argmin(-1) for s in range(0, x.shape[0], 512)])


def test_abs_table_227_plus_29():
    A = e8p.abs_table().double()
    assert A.shape == (256, 8)
    assert set(A.unique().tolist()) == {0.5, 1.5, 2.5}
    assert torch.unique(A, dim=0).shape[0] == 256
    n2 = A.pow(2).sum(-1)
    # every positive half-integer vector with ‖a‖² ≤ 10, counted by norm²: 1, 8, 28, 56+8, 70+56
    counts = {v: int((n2[:227] == v).sum()) for v in (2.0, 4.0, 6.0, 8.0, 10.0)}
    assert counts == {2.0: 1, 4.0: 8, 6.0: 28, 8.0: 64, 10.0: 126}
    brute = sum(1 for v in itertools.product((0.5, 1.5, 2.5, 3.5), repeat=8) if sum(h * h for h in v) <= 10)
    assert brute == 227
    tail = A[227:]
    assert torch.all(n2[227:] == 12)
    assert torch.all((tail == 1.5).sum(-1) == 5) and torch.all((tail == 0.5).sum(-1) == 3)


def test_codewords_lie_in_e8_plus_quarter_and_are_distinct(cb):
    assert cb.shape == (65536, 8)
    assert torch.unique(cb, dim=0).shape[0] == 65536
    z = cb - 0.25
    two_z = 2 * z
    assert torch.equal(two_z, two_z.round())
    odd = two_z.remainder(2)                                   # 1 for half-integer coords, 0 for integers
    assert torch.all((odd == odd[:, :1]).all(-1))              # all integer or all half-integer
    assert torch.all(z.sum(-1).remainder(2) == 0)              # even coordinate sum
    assert int((odd[:, 0] == 1).sum()) == 32768                # half D̂8 + ¼, half D8 + ¼ (= D̂8 − ¼)


def test_code_bit_fields_and_parity_rule(cb):
    codes = torch.arange(65536)
    A = e8p.abs_table().double()
    i, sig, t = codes & 255, (codes >> 8) & 127, codes >> 15
    shift = torch.where(t == 0, 0.25, -0.25).double()
    signed = cb - shift[:, None]                               # the D̂8 point ±a
    assert torch.equal(signed.abs(), A[i])
    neg = signed < 0
    assert torch.equal((neg[:, :7].long() << torch.arange(7)).sum(-1), sig)
    sum_a = A[i].sum(-1).round().long()                        # integer
    assert torch.equal(neg[:, 7].long(), (sum_a + neg[:, :7].sum(-1)) % 2)
    assert torch.equal(e8p.decode_structured(codes).double(), cb)


@pytest.mark.parametrize("scale", [0.3, 1.0, 2.0, 6.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.e2e
def test_encode_is_exact_nearest(cb, scale, dtype):
    x = torch.randn(3000, 8, generator=torch.Generator().manual_seed(int(scale * 10)), dtype=torch.float64) * scale
    bf = _brute_force(x, cb)
    codes = e8p.encode(x.to(dtype))
    d_enc = (x - cb[codes]).pow(2).sum(-1)
    d_bf = (x - cb[bf]).pow(2).sum(-1)
    assert torch.allclose(d_enc, d_bf, atol=1e-5)
    if dtype == torch.float64:
        assert torch.equal(codes, bf)
    else:                                                      # float32 may flip a near-tie
        assert (codes == bf).double().mean() >= 0.998
    for k in (1, 512):                                         # forced fallback and full scoring agree
        assert torch.equal(e8p.encode(x, candidates=k), e8p.encode(x))


def test_encode_shapes_and_quantize():
    x = torch.randn(4, 5, 8)
    values, codes = e8p.quantize(x)
    assert codes.shape == (4, 5) and codes.dtype == torch.int64 and values.shape == (4, 5, 8)
    assert torch.equal(values, e8p.decode(codes))
    assert e8p.encode(torch.zeros(0, 8)).shape == (0,)
    with pytest.raises(ValueError):
        e8p.encode(torch.zeros(3, 4))


def test_quantization_error_beats_scalar_two_bit():
    x = torch.randn(40000, 8, generator=torch.Generator().manual_seed(0))
    values, _ = e8p.quantize(x)
    mse = (values - x).pow(2).mean()
    assert mse < 0.1                                           # Lloyd-Max 2-bit scalar: 0.1175; E8P ≈ 0.092


def test_decode_encode_idempotent_on_codewords(cb):
    codes = e8p.encode(cb)
    assert torch.equal(codes, torch.arange(65536))
    assert torch.equal(e8p.decode(codes).double(), cb)


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32])
def test_pack_unpack_round_trip(dtype):
    codes = torch.cat([torch.tensor([0, 1, 32767, 32768, 65535, 40000]),
                       torch.randint(0, 65536, (3 * 64 - 6,), generator=torch.Generator().manual_seed(0))]).reshape(3, 64)
    packed = e8p.pack(codes, dtype)
    assert packed.dtype == dtype
    assert packed.shape == ((3, 64) if dtype == torch.int16 else (3, 32))
    assert torch.equal(e8p.unpack(packed), codes)
    if dtype == torch.int32:
        assert int(packed[0, 0]) == 0 | (1 << 16)             # low half = first code
    with pytest.raises(ValueError):
        e8p.pack(codes[:, :3], torch.int32)


def test_residual_codebook():
    C = e8p.residual_codebook().double()
    assert C.shape == (256, 8) and torch.unique(C, dim=0).shape[0] == 256
    n2 = C.pow(2).sum(-1)
    assert int((n2 == 0).sum()) == 1 and int((n2 == 2).sum()) == 240 and int((n2 == 4).sum()) == 15
    two = 2 * C
    assert torch.equal(two, two.round())
    odd = two.remainder(2)
    assert torch.all((odd == odd[:, :1]).all(-1)) and torch.all(C.sum(-1).remainder(2) == 0)   # in E8
    x = torch.randn(2000, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    codes = e8p.encode_residual(x)
    assert torch.equal(codes, _brute_force(x, C))
    assert torch.equal(e8p.decode_residual(codes).double(), C[codes])
    assert torch.equal(e8p.encode_residual(C), torch.arange(256))
