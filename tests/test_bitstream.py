"""Bit-stream packing: round trips for every width and bit-exact checks against a per-element oracle."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cupyq.formats.bitstream import (
    pack_bitstream,
    pack_bitstream_columns,
    unpack_bitstream,
    unpack_bitstream_columns,
)
from cupyq.formats.common import array_module, require_dtype, require_shape, unit_rows

WIDTHS = (2, 3, 4, 5, 6, 8)


def oracle_pack(values, bits):
    """Per column: one Python integer holding value i at bit bits*i, cut into 32-bit words."""
    rows, cols = values.shape
    nwords = rows * bits // 32
    out = np.zeros((nwords, cols), dtype=np.uint32)
    for n in range(cols):
        stream = 0
        for i in range(rows):
            stream |= int(values[i, n]) << (bits * i)
        for w in range(nwords):
            out[w, n] = (stream >> (32 * w)) & 0xFFFFFFFF
    return out.view(np.int32)


def oracle_unpack(words, bits, rows):
    w = words.view(np.uint32)
    out = np.zeros((rows, w.shape[1]), dtype=np.uint8)
    for n in range(w.shape[1]):
        stream = sum(int(w[j, n]) << (32 * j) for j in range(w.shape[0]))
        for i in range(rows):
            out[i, n] = (stream >> (bits * i)) & ((1 << bits) - 1)
    return out


def random_values(rng, rows, cols, bits, dtype=np.int64):
    return rng.integers(0, 1 << bits, size=(rows, cols)).astype(dtype)


@pytest.mark.parametrize("bits", WIDTHS)
def test_pack_matches_oracle(bits):
    rng = np.random.default_rng(bits)
    values = random_values(rng, 64, 5, bits)
    words = pack_bitstream(values, bits)
    assert words.dtype == np.int32 and words.shape == (64 * bits // 32, 5)
    np.testing.assert_array_equal(words, oracle_pack(values, bits))


@pytest.mark.parametrize("bits", WIDTHS)
def test_round_trip_both_ways(bits):
    rng = np.random.default_rng(100 + bits)
    values = random_values(rng, 96, 7, bits, dtype=np.uint8)
    words = pack_bitstream(values, bits)
    np.testing.assert_array_equal(unpack_bitstream(words, bits, 96), values)
    # every bit of a whole unit belongs to some value, so arbitrary words survive unpack -> pack
    words = rng.integers(-(2**31), 2**31, size=(3 * bits, 4)).astype(np.int32)
    rows = 3 * 32
    np.testing.assert_array_equal(pack_bitstream(unpack_bitstream(words, bits, rows), bits), words)


@pytest.mark.parametrize("bits", WIDTHS)
def test_unpack_matches_oracle_and_partial_rows(bits):
    rng = np.random.default_rng(200 + bits)
    words = rng.integers(-(2**31), 2**31, size=(2 * bits, 3)).astype(np.int32)
    expected = oracle_unpack(words, bits, 64)
    got = unpack_bitstream(words, bits, 64)
    assert got.dtype == np.uint8 and got.shape == (64, 3)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(unpack_bitstream(words, bits, 37), expected[:37])
    np.testing.assert_array_equal(unpack_bitstream(words[: bits + 1], bits, (bits + 1) * 32 // bits),
                                  expected[: (bits + 1) * 32 // bits])


def test_three_bit_row_ten_straddles_words():
    values = np.zeros((32, 1), dtype=np.int64)
    values[10, 0] = 0b101  # bits 30..32: bit 30 = 1, bit 31 = 0, bit 32 (word 1 bit 0) = 1
    values[21, 0] = 0b011  # bits 63..65: bit 63 (word 1 bit 31) = 1, bit 64 (word 2 bit 0) = 1, bit 65 = 0
    values[0, 0] = 0b111
    words = pack_bitstream(values, 3).view(np.uint32)[:, 0]
    assert words.tolist() == [0b111 | (1 << 30), 1 | (1 << 31), 1]
    np.testing.assert_array_equal(unpack_bitstream(words.view(np.int32)[:, None], 3, 32), values)


def test_five_and_six_bit_straddles():
    v5 = np.zeros((32, 1), dtype=np.int64)
    v5[6, 0] = 0b10111  # bits 30..34
    assert pack_bitstream(v5, 5).view(np.uint32)[:2, 0].tolist() == [0b11 << 30, 0b101]
    v6 = np.zeros((16, 1), dtype=np.int64)
    v6[5, 0] = 0b110101  # bits 30..35
    assert pack_bitstream(v6, 6).view(np.uint32)[:2, 0].tolist() == [0b01 << 30, 0b1101]


@pytest.mark.parametrize("bits", WIDTHS)
def test_columns_round_trip_with_partial_unit(bits):
    rng = np.random.default_rng(300 + bits)
    cols = 40  # not a multiple of 32: the last unit is partial
    values = random_values(rng, 3, cols, bits)
    words = pack_bitstream_columns(values, bits)
    assert words.shape == (3, -(-cols * bits // 32))
    np.testing.assert_array_equal(words.T, oracle_pack(np.vstack([values.T, np.zeros((-cols % 32, 3), int)]), bits)[: words.shape[1]])
    np.testing.assert_array_equal(unpack_bitstream_columns(words, bits, cols), values)


def test_inputs_are_not_mutated():
    rng = np.random.default_rng(7)
    values = random_values(rng, 32, 4, 3, dtype=np.uint32)
    before = values.copy()
    words = pack_bitstream(values, 3)
    words_before = words.copy()
    unpack_bitstream(words, 3, 32)
    np.testing.assert_array_equal(values, before)
    np.testing.assert_array_equal(words, words_before)


def test_non_contiguous_input():
    rng = np.random.default_rng(8)
    big = random_values(rng, 64, 10, 4)
    values = big[:, ::2]
    np.testing.assert_array_equal(pack_bitstream(values, 4), oracle_pack(np.ascontiguousarray(values), 4))


def test_unit_rows():
    assert [unit_rows(b) for b in WIDTHS] == [16, 32, 8, 32, 16, 4]


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: pack_bitstream(np.full((32, 2), 8), 3), ValueError, r"values: values must lie in \[0, 8\)"),
        (lambda: pack_bitstream(np.full((32, 2), -1), 3), ValueError, r"values: .*range \[-1, -1\]"),
        (lambda: pack_bitstream(np.ones((30, 2), dtype=np.int32), 3), ValueError, "values: 3-bit packing needs a multiple of 32 rows, got 30"),
        (lambda: pack_bitstream(np.ones((32, 2), dtype=np.float32), 3), TypeError, "values: expected dtype int8, .* got float32"),
        (lambda: pack_bitstream(np.ones(32, dtype=np.int32), 4), ValueError, "values: expected a 2-D array"),
        (lambda: pack_bitstream(np.ones((32, 2), dtype=np.int32), 9), ValueError, "bits: expected an integer in 1..8, got 9"),
        (lambda: unpack_bitstream(np.ones((3, 2), dtype=np.float32), 3, 32), TypeError, "words: expected dtype int32 or uint32, got float32"),
        (lambda: unpack_bitstream(np.ones((3, 2), dtype=np.int32), 3, 33), ValueError, "rows: 3 words of 3-bit values hold at most 32 rows, got 33"),
        (lambda: unpack_bitstream_columns(np.ones((2, 1), dtype=np.int32), 4, 9), ValueError, "columns: .* at most 8 columns, got 9"),
    ],
)
def test_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_common_messages():
    with pytest.raises(TypeError, match="^qzeros: expected dtype int32, got float16$"):
        require_dtype("qzeros", np.zeros(2, np.float16), "int32")
    with pytest.raises(ValueError, match=r"^scales: expected shape \(8, 4096\), got \(8, 4095\)$"):
        require_shape("scales", np.zeros((8, 4095)), (8, 4096))
    assert array_module(np.zeros(1)) is np
    assert array_module([1, 2]) is np


@settings(max_examples=40)
@given(
    bits=st.integers(1, 8),
    units=st.integers(1, 4),
    cols=st.integers(1, 6),
    seed=st.integers(0, 2**32 - 1),
    rows_cut=st.integers(0, 31),
)
def test_property_round_trip(bits, units, cols, seed, rows_cut):
    rng = np.random.default_rng(seed)
    rows = units * unit_rows(bits)
    values = random_values(rng, rows, cols, bits)
    words = pack_bitstream(values, bits)
    assert words.shape == (rows * bits // 32, cols)
    np.testing.assert_array_equal(words, oracle_pack(values, bits))
    keep = max(0, rows - rows_cut)
    np.testing.assert_array_equal(unpack_bitstream(words, bits, keep), values[:keep])


@pytest.mark.gpu
@pytest.mark.parametrize("bits", WIDTHS)
def test_cupy_matches_numpy(bits):
    cupy = pytest.importorskip("cupy")
    rng = np.random.default_rng(400 + bits)
    values = random_values(rng, 128, 33, bits, dtype=np.uint8)
    words = pack_bitstream(values, bits)
    words_gpu = pack_bitstream(cupy.asarray(values), bits)
    assert isinstance(words_gpu, cupy.ndarray)
    np.testing.assert_array_equal(words_gpu.get(), words)
    np.testing.assert_array_equal(unpack_bitstream(words_gpu, bits, 100).get(), values[:100])
    cols = pack_bitstream_columns(cupy.asarray(values[:5]), bits)
    np.testing.assert_array_equal(cols.get(), pack_bitstream_columns(values[:5], bits))
    np.testing.assert_array_equal(unpack_bitstream_columns(cols, bits, 33).get(), values[:5])
