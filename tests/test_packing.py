"""Bit packing: exact round trips, the documented LSB-first byte layout, sizes and errors."""

from __future__ import annotations

import math

import pytest
import torch

from turboquant import pack_indices, packed_size, unpack_indices
from turboquant.packing import pack_key_codes, unpack_key_codes

BITS = (1, 2, 3, 4, 8)
DIMS = (1, 63, 64, 65, 127, 128, 256)


def reference_pack(indices: list[int], bits: int) -> list[int]:
    """Independent oracle: one little-endian integer holding index j at bits [j·b, (j+1)·b)."""
    stream = 0
    for j, v in enumerate(indices):
        stream |= v << (j * bits)
    n_bytes = math.ceil(len(indices) * bits / 8)
    return list(stream.to_bytes(n_bytes, "little"))


def random_indices(shape: tuple[int, ...], bits: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**bits, shape, generator=gen, dtype=torch.int64)


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("bits", BITS)
def test_round_trip_exact_with_batch_dims(bits: int, d: int) -> None:
    idx = random_indices((3, 5, d), bits, seed=1000 * bits + d)
    packed = pack_indices(idx, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (3, 5, packed_size(d, bits))
    assert packed.shape[-1] == math.ceil(d * bits / 8)
    out = unpack_indices(packed, bits, d)
    assert out.shape == idx.shape
    assert torch.equal(out.long(), idx)


@pytest.mark.parametrize("bits", BITS)
def test_layout_matches_independent_bit_stream(bits: int) -> None:
    """Every vector of a batch packs to the bytes of the LSB-first stream (the layout kernels rely on)."""
    d = 37
    idx = random_indices((6, d), bits, seed=bits)
    packed = pack_indices(idx, bits)
    for row_idx, row_packed in zip(idx.tolist(), packed.tolist(), strict=True):
        assert row_packed == reference_pack(row_idx, bits)


@pytest.mark.parametrize("bits", BITS)
def test_extreme_values_round_trip(bits: int) -> None:
    """All-zero and all-(2^b - 1) vectors, the values most likely to be masked wrongly."""
    top = 2**bits - 1
    idx = torch.tensor([[0] * 65, [top] * 65, [top, 0] * 32 + [top]])
    assert torch.equal(unpack_indices(pack_indices(idx, bits), bits, 65).long(), idx)
    assert pack_indices(idx, bits)[1].tolist() == reference_pack([top] * 65, bits)


@pytest.mark.parametrize(
    ("bits", "indices", "expected"),
    [
        (4, [1, 2], [0x21]),  # index 0 is the low nibble
        (4, [0xF, 0x0, 0x3], [0x0F, 0x03]),
        (2, [1, 2, 3, 0], [0b00_11_10_01]),
        (1, [1, 0, 0, 0, 0, 0, 0, 1, 1], [0x81, 0x01]),
        # 3-bit stream 101|110|111 (LSB first) -> bits 1,0,1,1,1,0,1,1 | 1 -> 0xDD, 0x01
        (3, [5, 3, 7], [0xDD, 0x01]),
        # 8 three-bit indices fill exactly 3 bytes; byte 0 = low 2 bits of 3 | 2 | 1, and so on
        (3, [1, 2, 3, 4, 5, 6, 7, 0], [0b11_010_001, 0b0_101_100_0, 0b000_111_11]),
        (8, [0, 255, 17], [0, 255, 17]),
    ],
)
def test_hand_computed_bytes(bits: int, indices: list[int], expected: list[int]) -> None:
    packed = pack_indices(torch.tensor(indices), bits)
    assert packed.tolist() == expected
    assert unpack_indices(packed, bits, len(indices)).tolist() == indices


def test_three_bit_is_dense() -> None:
    """3-bit vectors take ceil(3d/8) bytes, not a nibble or a byte per index."""
    for d, n_bytes in [(1, 1), (8, 3), (63, 24), (64, 24), (65, 25), (128, 48), (256, 96)]:
        assert packed_size(d, 3) == n_bytes
        assert pack_indices(torch.zeros(2, d, dtype=torch.int64), 3).shape == (2, n_bytes)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64])
def test_any_integer_dtype_packs_the_same(dtype: torch.dtype) -> None:
    idx = random_indices((4, 33), 3, seed=7)
    assert torch.equal(pack_indices(idx.to(dtype), 3), pack_indices(idx, 3))


def test_empty_batch() -> None:
    packed = pack_indices(torch.zeros(0, 64, dtype=torch.int64), 3)
    assert packed.shape == (0, 24) and packed.dtype == torch.uint8
    assert unpack_indices(packed, 3, 64).shape == (0, 64)


@pytest.mark.parametrize("bits", [0, 5, 6, 7, 16, -1])
def test_unsupported_bits_raise(bits: int) -> None:
    idx = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"\(1, 2, 3, 4, 8\)"):
        pack_indices(idx, bits)
    with pytest.raises(ValueError, match=r"\(1, 2, 3, 4, 8\)"):
        unpack_indices(torch.zeros(4, dtype=torch.uint8), bits, 4)
    with pytest.raises(ValueError, match=r"\(1, 2, 3, 4, 8\)"):
        packed_size(4, bits)


@pytest.mark.parametrize(("bits", "bad"), [(1, 2), (2, 4), (3, 8), (4, 16), (8, 256), (3, -1), (8, -1)])
def test_out_of_range_indices_raise(bits: int, bad: int) -> None:
    idx = torch.tensor([0, 1, bad, 0])
    with pytest.raises(ValueError, match=rf"\[0, {2**bits}\)"):
        pack_indices(idx, bits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64, torch.bool])
def test_non_integer_indices_raise(dtype: torch.dtype) -> None:
    with pytest.raises(ValueError, match="integer"):
        pack_indices(torch.zeros(8, dtype=dtype), 1)


@pytest.mark.parametrize(("bits", "d", "n_bytes"), [(4, 64, 31), (4, 64, 33), (3, 65, 24), (8, 10, 11), (1, 9, 1)])
def test_wrong_packed_length_raises(bits: int, d: int, n_bytes: int) -> None:
    with pytest.raises(ValueError, match=rf"need {packed_size(d, bits)}"):
        unpack_indices(torch.zeros(2, n_bytes, dtype=torch.uint8), bits, d)


def test_unpack_requires_uint8() -> None:
    with pytest.raises(ValueError, match="uint8"):
        unpack_indices(torch.zeros(2, 32, dtype=torch.int32), 4, 64)


@pytest.mark.parametrize("d", [0, -3])
def test_bad_length_raises(d: int) -> None:
    with pytest.raises(ValueError, match="positive integer"):
        packed_size(d, 4)


def test_key_codes_are_sign_magnitude_at_4_bits() -> None:
    from turboquant.codebook import get_codebook
    from turboquant.packing import from_key_codes, to_key_codes

    for bits in (1, 2, 3):  # the indices themselves
        idx = torch.arange(2**bits, dtype=torch.uint8)
        assert torch.equal(to_key_codes(idx, bits), idx) and torch.equal(from_key_codes(idx, bits), idx)
    idx = torch.arange(16, dtype=torch.uint8)
    codes = to_key_codes(idx, 4)
    assert torch.equal(from_key_codes(codes, 4), idx) and sorted(codes.tolist()) == list(range(16))
    cb = get_codebook(128, 4, "cpu")  # ascending, antisymmetric: bits 0-2 the rank of |c|, bit 3 its sign
    magnitudes = cb[8:]
    assert torch.equal(cb[idx.long()].abs(), magnitudes[(codes & 7).long()])
    assert torch.equal(cb[idx.long()] < 0, (codes & 8) > 0)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_key_rows_round_trip(bits: int) -> None:
    from turboquant.packing import pack_key_codes, pack_planar, unpack_key_codes

    gen = torch.Generator().manual_seed(bits)
    idx = torch.randint(0, 2**bits, (3, 5, 128), generator=gen).to(torch.uint8)
    rows = pack_key_codes(idx, bits)
    assert rows.dtype == torch.uint8 and rows.shape == (3, 5, 128 * bits // 8)
    assert torch.equal(unpack_key_codes(rows, bits, 128), idx)
    if bits < 4:  # the planar layout of the indices
        assert torch.equal(rows, pack_planar(idx, bits))


def test_key_rows_4_bit_layout() -> None:
    """At 4 bits the ranks stay in the planar nibbles and each 16-bit element's signs move: column 2e's to bit 7,
    2e + d/2's to bit 15, 2e + 1's to bit 3, 2e + 1 + d/2's to bit 11 (the decode kernel's lookup reads them there)."""
    from turboquant.packing import pack_key_codes, to_key_codes

    d = 64
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 16, (7, d), generator=gen).to(torch.uint8)
    codes = to_key_codes(idx, 4).long()
    rows = pack_key_codes(idx, 4).long()
    element = rows[:, 0::2] | rows[:, 1::2] << 8  # [7, d/4]
    e = torch.arange(d // 4)
    nibbles = ((2 * e, 7), (2 * e + d // 2, 15), (2 * e + 1, 3), (2 * e + 1 + d // 2, 11))  # (column, sign bit)
    for nibble, (col, sign_bit) in enumerate(nibbles):
        assert torch.equal((element >> (4 * nibble)) & 7, codes[:, col] & 7)
        assert torch.equal((element >> sign_bit) & 1, codes[:, col] >> 3)


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_key_rows_dequantize_as_their_unpacked_indices(d, bits):
    """TurboQuantMSE.dequantize_key_rows (4 bits: one table lookup per 16-bit element) equals dequantize_indices of
    unpack_key_codes bit for bit: random rows, at 4 bits also every 16-bit element value, and a slice of a buffer
    (as a cache reads its store) and a view at an odd byte offset."""
    from turboquant.quantizers import TurboQuantMSE

    q = TurboQuantMSE(d, bits)
    gen = torch.Generator().manual_seed(d + bits)
    idx = torch.randint(0, 2**bits, (2, 3, 40, d), generator=gen)
    rows = pack_key_codes(idx, bits)
    if bits == 4:  # every element value, d / 4 per row
        every = torch.arange(65536, dtype=torch.int32)
        every = torch.stack((every & 0xFF, every >> 8), -1).to(torch.uint8).reshape(-1, d // 2)
        rows = torch.cat((rows.reshape(-1, d // 2), every)).reshape(1, 1, -1, d // 2)
    norms = (torch.rand(rows.shape[:-1], generator=gen) * 10).half()

    def expect(r, n):
        return q.dequantize_indices(unpack_key_codes(r, bits, d), n)

    assert torch.equal(q.dequantize_key_rows(rows, norms), expect(rows, norms))
    part, pn = rows[:, :, 5:17], norms[:, :, 5:17]
    assert torch.equal(q.dequantize_key_rows(part, pn), expect(part, pn))
    odd = torch.cat((torch.zeros(*rows.shape[:-1], 1, dtype=torch.uint8), rows), -1)[..., 1:]
    assert torch.equal(q.dequantize_key_rows(odd, norms), expect(odd, norms))
