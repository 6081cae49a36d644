"""GPTQ layouts: qweight/qzeros packing (v1 and v2 zeros), g_idx, validation."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cupyq.formats import (
    GPTQ_BITS,
    GPTQLayout,
    check_gptq,
    default_g_idx,
    pack_qweight,
    pack_qzeros,
    unpack_qweight,
    unpack_qzeros,
)


def oracle_unpack_rows(words, bits, rows):
    """Per element: 2/4/8-bit as 32/bits fields per word; 3-bit as a 96-bit stream per 32 rows."""
    w = words.view(np.uint32)
    out = np.zeros((rows, w.shape[1]), dtype=np.uint8)
    mask = (1 << bits) - 1
    for n in range(w.shape[1]):
        for k in range(rows):
            if bits == 3:
                unit = k // 32
                stream = int(w[3 * unit, n]) | int(w[3 * unit + 1, n]) << 32 | int(w[3 * unit + 2, n]) << 64
                out[k, n] = (stream >> (3 * (k % 32))) & mask
            else:
                per_word = 32 // bits
                out[k, n] = (int(w[k // per_word, n]) >> (bits * (k % per_word))) & mask
    return out


def random_layer(rng, bits, k, n, groups, fmt="gptq"):
    q = rng.integers(0, 1 << bits, size=(k, n))
    zeros = rng.integers(0, 1 << bits, size=(groups, n))
    scales = (rng.random((groups, n)) * 0.02 + 0.001).astype(np.float16)
    return pack_qweight(q, bits), pack_qzeros(zeros, bits, checkpoint_format=fmt), scales, q, zeros


@pytest.mark.parametrize("bits", GPTQ_BITS)
def test_qweight_round_trip_and_oracle(bits):
    rng = np.random.default_rng(bits)
    q = rng.integers(0, 1 << bits, size=(64, 6)).astype(np.int32)
    qweight = pack_qweight(q, bits)
    assert qweight.dtype == np.int32 and qweight.shape == (64 * bits // 32, 6)
    np.testing.assert_array_equal(oracle_unpack_rows(qweight, bits, 64), q)
    unpacked = unpack_qweight(qweight, bits)
    assert unpacked.dtype == np.uint8 and unpacked.shape == (64, 6)
    np.testing.assert_array_equal(unpacked, q)


@pytest.mark.parametrize("bits", GPTQ_BITS)
def test_unpack_qweight_of_random_words(bits):
    rng = np.random.default_rng(10 + bits)
    rows = 3 * bits if bits == 3 else 5
    qweight = rng.integers(-(2**31), 2**31, size=(rows, 4)).astype(np.int32)
    k = rows * 32 // bits
    np.testing.assert_array_equal(unpack_qweight(qweight, bits), oracle_unpack_rows(qweight, bits, k))
    np.testing.assert_array_equal(pack_qweight(unpack_qweight(qweight, bits), bits), qweight)


def test_four_bit_nibble_order():
    q = np.arange(8, dtype=np.int32)[:, None] + 1  # rows 0..7 hold 1..8
    assert pack_qweight(q, 4).view(np.uint32)[0, 0] == 0x87654321


@pytest.mark.parametrize("bits", GPTQ_BITS)
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_qzeros_round_trip(bits, fmt):
    rng = np.random.default_rng(20 + bits)
    n = 64
    zeros = rng.integers(0, 1 << bits, size=(5, n))
    zeros[0, :4] = [0, (1 << bits) - 1, 0, 1 << (bits - 1)]  # the extremes are always present
    qzeros = pack_qzeros(zeros, bits, checkpoint_format=fmt)
    assert qzeros.dtype == np.int32 and qzeros.shape == (5, n * bits // 32)
    np.testing.assert_array_equal(unpack_qzeros(qzeros, bits, n, checkpoint_format=fmt), zeros)
    stored = oracle_unpack_rows(np.ascontiguousarray(qzeros.T), bits, n).T
    mask = (1 << bits) - 1
    expected_stored = (zeros - 1) & mask if fmt == "gptq" else zeros
    np.testing.assert_array_equal(stored, expected_stored)


def test_v1_true_zero_0_is_stored_as_15_without_carry():
    zeros = np.array([[0, 8, 8, 8, 8, 8, 8, 8, 15, 1, 0, 0, 0, 0, 0, 0]])
    qzeros = pack_qzeros(zeros, 4)
    # v1 stores z - 1 per nibble: 0 -> F, 8 -> 7, 15 -> E, 1 -> 0; no borrow into the neighbour nibble
    assert qzeros.view(np.uint32)[0].tolist() == [0x7777777F, 0xFFFFFF0E]
    np.testing.assert_array_equal(unpack_qzeros(qzeros, 4, 16), zeros)
    # the same words read as v2 are the stored values themselves
    np.testing.assert_array_equal(unpack_qzeros(qzeros, 4, 16, checkpoint_format="gptq_v2"), (zeros - 1) & 15)


def test_v2_true_zero_15_and_0():
    zeros = np.array([[15, 0, 15, 0, 8, 8, 8, 8]])
    qzeros = pack_qzeros(zeros, 4, checkpoint_format="gptq_v2")
    assert qzeros.view(np.uint32)[0, 0] == 0x88880F0F
    np.testing.assert_array_equal(unpack_qzeros(qzeros, 4, 8, checkpoint_format="gptq_v2"), zeros)
    # read as v1, every stored field is one below the true zero: stored 15 -> 0, stored 0 -> 1
    np.testing.assert_array_equal(unpack_qzeros(qzeros, 4, 8), [[0, 1, 0, 1, 9, 9, 9, 9]])


def test_v1_eight_bit_zero_wraps_per_field():
    zeros = np.array([[0, 255, 128, 1]])
    qzeros = pack_qzeros(zeros, 8)
    assert qzeros.view(np.uint32)[0, 0] == 0x007FFEFF
    np.testing.assert_array_equal(unpack_qzeros(qzeros, 8, 4), zeros)


def test_qzeros_three_bit_columns_are_a_stream():
    zeros = np.zeros((1, 32), dtype=np.int64)
    zeros[0, 10] = 0b110  # column 10 straddles words 0 and 1
    stored = pack_qzeros(zeros, 3, checkpoint_format="gptq_v2").view(np.uint32)[0]
    assert stored.tolist() == [1 << 31, 1, 0]


def test_unpack_does_not_mutate():
    rng = np.random.default_rng(3)
    qweight, qzeros, _, _, _ = random_layer(rng, 4, 64, 16, 2)
    before = (qweight.copy(), qzeros.copy())
    unpack_qweight(qweight, 4)
    unpack_qzeros(qzeros, 4, 16)
    np.testing.assert_array_equal(qweight, before[0])
    np.testing.assert_array_equal(qzeros, before[1])


def test_default_g_idx():
    np.testing.assert_array_equal(default_g_idx(10, 4), [0, 0, 0, 0, 1, 1, 1, 1, 2, 2])
    g = default_g_idx(300, -1)
    assert g.dtype == np.int32 and g.shape == (300,) and not g.any()
    assert default_g_idx(256, 128).dtype == np.int32
    with pytest.raises(ValueError, match="group_size: expected a positive size or -1, got 0"):
        default_g_idx(10, 0)


@pytest.mark.parametrize("bits", GPTQ_BITS)
def test_check_gptq_accepts_valid_layers(bits):
    rng = np.random.default_rng(30 + bits)
    qweight, qzeros, scales, _, _ = random_layer(rng, bits, 128, 64, 4)
    g_idx = rng.permutation(default_g_idx(128, 32))
    assert check_gptq(qweight, qzeros, scales, g_idx, bits) == GPTQLayout(128, 64, 4, bits)
    assert check_gptq(qweight, qzeros, scales.astype(np.float32), None, bits).groups == 4
    assert check_gptq(qweight, qzeros, scales, g_idx.astype(np.int64), bits).in_features == 128


def test_check_gptq_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    qweight, qzeros, scales, _, _ = random_layer(rng, 4, 64, 32, 2)
    layout = check_gptq(torch.from_numpy(qweight), torch.from_numpy(qzeros),
                        torch.from_numpy(scales).to(torch.bfloat16), torch.from_numpy(default_g_idx(64, 32)), 4)
    assert layout == GPTQLayout(64, 32, 2, 4)
    with pytest.raises(TypeError, match="qzeros: expected dtype int32, got float32"):
        check_gptq(torch.from_numpy(qweight), torch.from_numpy(qzeros).float(), torch.from_numpy(scales), None, 4)


def _bad_cases():
    rng = np.random.default_rng(99)
    qweight, qzeros, scales, _, _ = random_layer(rng, 4, 256, 64, 2)
    q3, z3, s3, _, _ = random_layer(rng, 3, 64, 64, 2)
    g = default_g_idx(256, 128)
    g_bad_hi = g.copy()
    g_bad_hi[7] = 2
    g_bad_lo = g.copy()
    g_bad_lo[3] = -1
    return [
        ((qweight.astype(np.float32), qzeros, scales, g, 4), TypeError, "qweight: expected dtype int32, got float32"),
        ((qweight, qzeros.astype(np.int64), scales, g, 4), TypeError, "qzeros: expected dtype int32, got int64"),
        ((qweight, qzeros, scales.astype(np.int32), g, 4), TypeError, "scales: expected dtype float16, float32, bfloat16 or float64, got int32"),
        ((qweight, qzeros, scales, g.astype(np.float32), 4), TypeError, "g_idx: expected dtype int32 or int64, got float32"),
        ((qweight, qzeros[:, :7], scales, g, 4), ValueError, r"qzeros: expected shape \(2, 8\), got \(2, 7\)"),
        ((qweight, qzeros, scales[:, :63], g, 4), ValueError, r"scales: expected shape \(2, 64\), got \(2, 63\)"),
        ((qweight, qzeros, scales[:1], g, 4), ValueError, r"scales: expected shape \(2, 64\), got \(1, 64\)"),
        ((qweight, qzeros, scales, g[:255], 4), ValueError, r"g_idx: expected shape \(256,\), got \(255,\)"),
        ((qweight, qzeros, scales, g_bad_hi, 4), ValueError, r"g_idx: values must lie in \[0, 2\) .* got range \[0, 2\]"),
        ((qweight, qzeros, scales, g_bad_lo, 4), ValueError, r"g_idx: values must lie in \[0, 2\) .* got range \[-1, 1\]"),
        ((qweight, qzeros, scales, g, 5), ValueError, r"bits: expected one of \(2, 3, 4, 8\), got 5"),
        ((qweight[0], qzeros, scales, g, 4), ValueError, "qweight: expected a 2-D array"),
        ((q3[:4], z3, s3, None, 3), ValueError, "qweight: 3-bit rows come in units of 3 words, got 4 rows"),
        ((qweight, qzeros[:0], scales[:0], None, 4), ValueError, "qzeros: expected at least one group"),
    ]


@pytest.mark.parametrize("args, exc, match", _bad_cases())
def test_check_gptq_rejects_malformed_input(args, exc, match):
    with pytest.raises(exc, match=match):
        check_gptq(*args)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: unpack_qweight(np.ones((4, 8), np.float16), 4), TypeError, "qweight: expected dtype int32 or uint32, got float16"),
        (lambda: unpack_qweight(np.ones((4, 8), np.int32), 3), ValueError, "qweight: 3-bit rows come in units of 3 words"),
        (lambda: pack_qweight(np.ones((12, 8), np.int32), 4), ValueError, "q: 4-bit GPTQ packing needs a multiple of 8 rows, got 12"),
        (lambda: pack_qweight(np.full((8, 8), 16), 4), ValueError, r"q: values must lie in \[0, 16\)"),
        (lambda: unpack_qzeros(np.ones((2, 8), np.int32), 4, 72), ValueError, r"qzeros: expected shape \(\*, 9\), got \(2, 8\)"),
        (lambda: unpack_qzeros(np.ones((2, 8), np.int32), 4, 64, checkpoint_format="v3"), ValueError, "checkpoint_format: expected one of"),
        (lambda: pack_qzeros(np.full((2, 8), 16), 4), ValueError, r"zeros: values must lie in \[0, 16\)"),
        (lambda: pack_qzeros(np.ones((2, 8), np.float32), 4), TypeError, "zeros: expected dtype int8"),
    ],
)
def test_pack_unpack_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@settings(max_examples=30)
@given(
    bits=st.sampled_from(GPTQ_BITS),
    k_units=st.integers(1, 4),
    n=st.integers(1, 40),
    groups=st.integers(1, 5),
    fmt=st.sampled_from(["gptq", "gptq_v2"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_gptq_round_trip(bits, k_units, n, groups, fmt, seed):
    rng = np.random.default_rng(seed)
    k = k_units * (32 if bits == 3 else 32 // bits)
    qweight, qzeros, scales, q, zeros = random_layer(rng, bits, k, n, groups, fmt)
    np.testing.assert_array_equal(unpack_qweight(qweight, bits), q)
    np.testing.assert_array_equal(unpack_qzeros(qzeros, bits, n, checkpoint_format=fmt), zeros)
    g_idx = rng.integers(0, groups, size=k).astype(np.int32)
    assert check_gptq(qweight, qzeros, scales, g_idx, bits) == GPTQLayout(k, n, groups, bits)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", GPTQ_BITS)
def test_cupy_matches_numpy(bits):
    cupy = pytest.importorskip("cupy")
    rng = np.random.default_rng(40 + bits)
    qweight, qzeros, scales, q, zeros = random_layer(rng, bits, 256, 96, 3)
    for fmt in ("gptq", "gptq_v2"):
        got = pack_qzeros(cupy.asarray(zeros), bits, checkpoint_format=fmt)
        np.testing.assert_array_equal(got.get(), pack_qzeros(zeros, bits, checkpoint_format=fmt))
        np.testing.assert_array_equal(unpack_qzeros(got, bits, 96, checkpoint_format=fmt).get(), zeros)
    np.testing.assert_array_equal(pack_qweight(cupy.asarray(q), bits).get(), qweight)
    np.testing.assert_array_equal(unpack_qweight(cupy.asarray(qweight), bits).get(), q)
    g = default_g_idx(256, 128, xp=cupy)
    assert isinstance(g, cupy.ndarray)
    np.testing.assert_array_equal(g.get(), default_g_idx(256, 128))
    layout = check_gptq(cupy.asarray(qweight), cupy.asarray(qzeros), cupy.asarray(scales), g % 3, bits)
    assert layout == GPTQLayout(256, 96, 3, bits)


# ------------------------------------------------------------------------------------- group size without g_idx


@pytest.mark.parametrize(
    "k, groups, expected",
    [(4096, 1, -1), (96, 48, 2), (64, 32, 2), (256, 128, 2), (300, 150, 2), (64, 64, 1), (200, 100, 2)],
)
def test_check_group_size_infers_only_a_size_the_shapes_fix(k, groups, expected):
    from cupyq.formats.gptq import check_group_size

    assert check_group_size(k, groups) == expected
    if expected != -1:
        assert -(-k // expected) == groups


@pytest.mark.parametrize("k, groups, lo, hi", [(200, 2, 100, 199), (4096, 32, 128, 132), (96, 3, 32, 47),
                                               (256, 5, 52, 63)])
def test_check_group_size_refuses_to_guess(k, groups, lo, hi):
    from cupyq.formats.gptq import check_group_size

    with pytest.raises(ValueError, match=rf"^group_size: not given and g_idx is absent, and {k} rows in {groups} "
                       rf"groups fit group sizes {lo}\.\.{hi}: pass group_size= \(or g_idx\)$"):
        check_group_size(k, groups)
    for size in (lo, hi):  # every size of the range is a valid setting
        assert check_group_size(k, groups, size) == size
    for size in (lo - 1, hi + 1):
        with pytest.raises(ValueError, match=rf"group_size: {size} over {k} input rows needs"):
            check_group_size(k, groups, size)


def test_check_group_size_without_any_fitting_size():
    from cupyq.formats.gptq import check_group_size

    with pytest.raises(ValueError, match=r"group_size: no group size splits 96 input rows into 50 groups"):
        check_group_size(96, 50)


def test_layer_without_g_idx_needs_its_group_size_when_several_fit():
    import cupyq
    from cupyq import reference
    from cupyq.quantize import quantize_gptq

    w = np.random.default_rng(60).standard_normal((200 // 8 * 8, 32)).astype(np.float32)
    g = quantize_gptq(w, bits=4, group_size=128)  # 2 groups: 128 + 72 rows
    t = (g["qweight"], g["qzeros"], g["scales"])
    true_w = reference.dequantize_gptq(*t, g["g_idx"], bits=4)
    x = np.random.default_rng(61).standard_normal((3, 200)).astype(np.float32)
    message = r"group_size: not given and g_idx is absent, and 200 rows in 2 groups fit group sizes 100\.\.199"
    with pytest.raises(ValueError, match=message):
        reference.dequantize_gptq(*t, None, bits=4)
    with pytest.raises(ValueError, match=message):
        reference.matmul_gptq(x, *t, None, bits=4)
    with pytest.raises(ValueError, match=message):
        cupyq.QMatrix.from_gptq(*t, None, bits=4)
    np.testing.assert_array_equal(reference.dequantize_gptq(*t, None, bits=4, group_size=128), true_w)
    qm = cupyq.QMatrix.from_gptq(*t, None, bits=4, group_size=128)
    assert qm.group_sizes == {4: 128}
    np.testing.assert_array_equal(qm.reference_weight(), true_w)
    np.testing.assert_allclose(cupyq.gemm(x, qm), x @ true_w, rtol=1e-5, atol=1e-4)


def test_layer_without_g_idx_infers_a_size_the_shapes_fix():
    from cupyq import reference
    from cupyq.quantize import quantize_gptq

    w = np.random.default_rng(62).standard_normal((64, 32)).astype(np.float32)
    for size in (2, -1):  # 32 groups of 64 rows: only 2 fits; one group: -1
        g = quantize_gptq(w, bits=4, group_size=size)
        t = (g["qweight"], g["qzeros"], g["scales"])
        np.testing.assert_array_equal(reference.dequantize_gptq(*t, None, bits=4),
                                      reference.dequantize_gptq(*t, g["g_idx"], bits=4))


@pytest.mark.parametrize("act_order", [False, True])
def test_qmatrix_group_size_of_a_layer_with_g_idx_comes_from_g_idx(act_order):
    import cupyq
    from cupyq.quantize import quantize_gptq

    w = np.random.default_rng(63).standard_normal((200, 32)).astype(np.float32)
    g = quantize_gptq(w, bits=4, group_size=128, act_order=act_order, seed=63)  # groups of 128 and 72 rows
    qm = cupyq.QMatrix.from_gptq(g["qweight"], g["qzeros"], g["scales"], g["g_idx"], bits=4)
    assert qm.group_sizes == {4: 128} and qm.group_size == 128 and qm.act_order == act_order
    one = quantize_gptq(w, bits=4, group_size=-1)
    assert cupyq.QMatrix.from_gptq(one["qweight"], one["qzeros"], one["scales"], one["g_idx"]).group_sizes == {4: -1}
