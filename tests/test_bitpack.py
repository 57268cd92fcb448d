"""Bit-packing: exact round trips for every width and awkward lengths, and a hand-computed layout."""
import pytest
import torch

from lowbit.packed.bitpack import pack, packed_width, unpack


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("n", [1, 7, 31, 32, 33, 64, 100, 576])
def test_round_trip_exact(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 2 ** bits, (3, 5, n), generator=g)
    words = pack(codes, bits)
    assert words.dtype == torch.int32
    assert words.shape == (3, 5, packed_width(n, bits))
    assert torch.equal(unpack(words, bits, n), codes)


def test_extreme_codes_round_trip():
    for bits in (2, 3, 4, 8):
        codes = torch.tensor([[2 ** bits - 1] * 40 + [0] * 24])
        assert torch.equal(unpack(pack(codes, bits), bits, 64), codes)


def test_layout_is_little_endian_bit_stream():
    # 4-bit codes 1..8 in the first word: nibble k holds code k -> 0x87654321
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8] + [0] * 24])
    words = pack(codes, 4)
    assert words.shape == (1, 4)
    assert int(words[0, 0]) & 0xFFFFFFFF == 0x87654321
    assert words[0, 1:].eq(0).all()
    # 3-bit: code 10 (the 11th) occupies bits 30..32 and straddles words 0 and 1
    codes = torch.zeros(1, 32, dtype=torch.long)
    codes[0, 10] = 0b111
    w = pack(codes, 3)
    assert int(w[0, 0]) & 0xFFFFFFFF == 0b11 << 30
    assert int(w[0, 1]) == 0b1
    assert torch.equal(unpack(w, 3, 32), codes)


def test_packed_size_matches_bits():
    assert packed_width(576, 4) * 32 == 576 * 4
    assert packed_width(576, 3) * 32 == 576 * 3
    assert packed_width(33, 2) == 4  # two chunks of 32 codes, 2 words each
