"""The batched GGUF codec paths (every sub-block, block and row at once) against the per-block ones they replace:
the same fields bit for bit, so batching neither mixes rows nor blocks nor changes a float sum."""
import pytest
import torch

from lowbit.gguf import TYPES

QUANT = [n for n in TYPES if n != "F16"]


def matrix(m, n, seed):
    """Random rows with the awkward ones codecs special-case: zero, constant, one weight, tiny, huge, one sign."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(m, n, generator=g) * torch.exp(torch.randn(m, n, generator=g)) * 0.05
    W[0] = 0
    W[1] = 0.25
    W[2, 5] = -1.5
    W[2, torch.arange(n) != 5] = 0
    W[3] *= 1e-7
    W[4] *= 1e4
    W[5] = W[5].abs()
    W[6, : n // 2] = 0
    imp = torch.rand(n, generator=g) * 2
    imp[::7] = 0
    return W, imp


def same(f, g):
    assert set(f) == set(g)
    for k in f:
        assert f[k].dtype == g[k].dtype and torch.equal(f[k], g[k]), k


def cat(parts, dim):
    return {k: torch.cat([p[k] for p in parts], dim) for k in parts[0]}


@pytest.mark.parametrize("name", QUANT)
@pytest.mark.parametrize("weighted", [False, True])
def test_rtn_of_a_matrix_is_rtn_of_its_row_slices_and_column_blocks(name, weighted):
    codec = TYPES[name].codec
    W, imp = matrix(9, 512, 1)
    imp = imp if weighted else None
    whole = codec.quantize(W, imp)
    same(whole, cat([codec.quantize(W[r0:r1], imp) for r0, r1 in ((0, 4), (4, 6), (6, 9))], 0))
    B = codec.block
    blocks = [codec.quantize(W[:, c0:c0 + B], None if imp is None else imp[c0:c0 + B]) for c0 in range(0, 512, B)]
    for k in whole:  # per-block fields are laid out block after block along the columns
        assert torch.equal(whole[k], torch.cat([b[k] for b in blocks], 1)), k


@pytest.mark.parametrize("name", QUANT)
@pytest.mark.parametrize("layout", ["rows", "columns"])
def test_batched_fit_equals_the_block_by_block_fit(name, layout):
    """``fit_all`` (batched) against ``fit_blockwise`` (fit_block then fit_sub, block by block), on a row-major
    matrix (RTN) and a column-major one (the solvers' working copy), with the Hessian-diagonal weights."""
    codec = TYPES[name].codec
    W, imp = matrix(12, 512, 2)
    if layout == "columns":
        W = W.T.contiguous().T
    f, g = codec.fields(12, 512, "cpu"), codec.fields(12, 512, "cpu")
    codec.fit_all(f, W, imp)
    codec.fit_blockwise(g, W, imp)
    same(f, g)


@pytest.mark.parametrize("name", ["IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S"])
def test_grid_search_of_many_units_is_each_units_search(name):
    """One ``encode`` over all units (points, signs, the parity flips) equals 8 columns at a time."""
    codec = TYPES[name].codec
    W, imp = matrix(9, 64, 3)
    delta = W.abs().reshape(9, 8, 8).amax(2) / 2 + 1e-3
    idx, neg, v = codec.encode(W, delta, imp)
    per = 8 // codec.dim
    for u in range(8):
        i, s, vv = codec.encode(W[:, 8 * u:8 * u + 8], delta[:, u:u + 1], imp[8 * u:8 * u + 8])
        assert torch.equal(idx[:, per * u:per * (u + 1)], i) and torch.equal(neg[:, 8 * u:8 * u + 8], s)
        assert torch.equal(v[:, 8 * u:8 * u + 8], vv)
    if codec.parity:  # every unit of 8 has an even number of minus signs, and some units needed the flip
        assert (neg.view(9, 8, 8).sum(2) % 2 == 0).all()
        assert (neg != (W < 0).long()).any()
