"""Reliability of the in-memory formats: v1 zero encodings, group sizes, non-finite scales, input copies,
int16 permutations, integer checks and the bounded-memory CPU product.

The oracles are written here from the layout descriptions: GPTQ ``W[k, n] = s[g, n] * (q[k, n] - z[g, n])``,
``qweight`` row ``k`` at bit ``bits*k`` of its column, ``qzeros`` column ``n`` at bit ``bits*n`` of its row.
"""

import tracemalloc
import warnings

import numpy as np
import pytest

import cupyq
from cupyq import reference
from cupyq.formats import exl2 as fx
from cupyq.formats import gptq as fg
from cupyq.quantize import quantize_exl2

WORD_ONES = {2: 0x55555555, 4: 0x11111111, 8: 0x01010101}


# ------------------------------------------------------------------------------------------------ oracles
def pack_fields(values, bits, axis):
    """Pack 2/4/8-bit integers into uint32 words along ``axis`` (field i of a word at shift bits*i)."""
    per = 32 // bits
    v = np.moveaxis(np.asarray(values, dtype=np.uint64), axis, 0)
    rows = -(-v.shape[0] // per) * per
    v = np.concatenate([v, np.zeros((rows - v.shape[0],) + v.shape[1:], dtype=np.uint64)])
    v = v.reshape(rows // per, per, *v.shape[1:])
    words = np.zeros((rows // per,) + v.shape[2:], dtype=np.uint64)
    for i in range(per):
        words |= v[:, i] << np.uint64(bits * i)
    return np.moveaxis(words.astype(np.uint32), 0, axis)


def word_encoded_case(rng, bits, k, n, group_size):
    """A layer whose v1 qzeros were written by subtracting the per-field constant from each word.

    Returns (tensors, q, z, scales, g) with true zeros z (many of them 0).
    """
    groups = -(-k // group_size)
    q = rng.integers(0, 1 << bits, size=(k, n))
    z = rng.integers(0, 1 << bits, size=(groups, n))
    z[rng.random(z.shape) < 0.3] = 0  # zeros of 0 are what the two v1 encodings store differently
    scales = (rng.random((groups, n)) * 0.05 + 0.01).astype(np.float16)
    g = np.arange(k) // group_size
    v2_words = pack_fields(z, bits, axis=1)
    v1_words = (v2_words.astype(np.int64) - WORD_ONES[bits]) % (1 << 32)  # borrows cross fields
    tensors = dict(
        qweight=pack_fields(q, bits, axis=0).view(np.int32),
        qzeros=v1_words.astype(np.uint32).view(np.int32),
        scales=scales,
        g_idx=g.astype(np.int32),
    )
    return tensors, q, z, scales, g


def oracle(q, z, scales, g):
    return scales.astype(np.float32)[g] * (q.astype(np.float32) - z.astype(np.float32)[g])


# ------------------------------------------------------------------------------------------------ item 0
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_word_encoded_v1_zeros_decode_per_word(bits):
    rng = np.random.default_rng(100 + bits)
    t, q, z, scales, g = word_encoded_case(rng, bits, 128, 64, 32)
    before = {k: v.copy() for k, v in t.items()}
    expected = oracle(q, z, scales, g)
    w = reference.dequantize_gptq(**t, bits=bits, v1_encoding="word")
    np.testing.assert_array_equal(w, expected)
    np.testing.assert_array_equal(fg.unpack_qzeros(t["qzeros"], bits, 64, v1_encoding="word"), z)
    qm = cupyq.QMatrix.from_gptq(**t, bits=bits, v1_encoding="word", device="cpu")
    np.testing.assert_array_equal(qm.reference_weight(), expected)
    # per field, the neighbour of every zero of 0 reads one too low
    wrong = reference.dequantize_gptq(**t, bits=bits, v1_encoding="field")
    assert not np.array_equal(wrong, expected)
    for k, v in t.items():
        np.testing.assert_array_equal(v, before[k], err_msg=f"{k} was modified")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("encoding", ["field", "word"])
def test_pack_qzeros_round_trips_each_encoding(bits, encoding):
    rng = np.random.default_rng(bits)
    z = rng.integers(0, 1 << bits, size=(3, 40))
    z[:, ::3] = 0
    packed = fg.pack_qzeros(z, bits, checkpoint_format="gptq", v1_encoding=encoding)
    np.testing.assert_array_equal(fg.unpack_qzeros(packed, bits, 40, checkpoint_format="gptq", v1_encoding=encoding), z)
    if bits in WORD_ONES and encoding == "word":
        np.testing.assert_array_equal(packed.view(np.uint32), (pack_fields(z, bits, 1).astype(np.int64) - WORD_ONES[bits]) % (1 << 32))


def test_v1_encodings_agree_without_zeros_of_zero_and_3bit_is_per_field():
    rng = np.random.default_rng(7)
    z = rng.integers(1, 16, size=(2, 16))
    np.testing.assert_array_equal(fg.pack_qzeros(z, 4, v1_encoding="word"), fg.pack_qzeros(z, 4, v1_encoding="field"))
    z3 = rng.integers(0, 8, size=(2, 32))
    np.testing.assert_array_equal(fg.pack_qzeros(z3, 3, v1_encoding="word"), fg.pack_qzeros(z3, 3, v1_encoding="field"))


def test_bad_v1_encoding_is_named():
    t, *_ = word_encoded_case(np.random.default_rng(1), 4, 64, 16, 32)
    with pytest.raises(ValueError, match=r"v1_encoding: expected one of \('field', 'word'\), got 'words'"):
        reference.dequantize_gptq(**t, v1_encoding="words")
    with pytest.raises(ValueError, match=r"v1_encoding: expected one of .*got 'x'"):
        cupyq.QMatrix.from_gptq(**t, v1_encoding="x", device="cpu")
    with pytest.raises(ValueError, match=r"v1_encoding: expected one of .*got None"):
        fg.unpack_qzeros(t["qzeros"], 4, 16, v1_encoding=None)


def test_ambiguous_v1_zeros_counts_all_ones_fields():
    z = np.full((2, 16), 5)
    z[0, 3] = z[1, 9] = z[1, 15] = 0
    assert fg.ambiguous_v1_zeros(fg.pack_qzeros(z, 4), 4) == 3
    assert fg.ambiguous_v1_zeros(fg.pack_qzeros(np.full((2, 16), 8), 4), 4) == 0


# ------------------------------------------------------------------------------------------------ item 3
def act_order_case(rng, k=128, n=32, group_size=32):
    groups = k // group_size
    g = rng.permutation(np.arange(k) // group_size).astype(np.int32)
    q = rng.integers(0, 16, size=(k, n))
    z = rng.integers(1, 16, size=(groups, n))
    scales = (rng.random((groups, n)) * 0.05 + 0.01).astype(np.float16)
    t = dict(qweight=pack_fields(q, 4, 0).view(np.int32), qzeros=fg.pack_qzeros(z, 4), scales=scales)
    return t, q, z, scales, g


def test_group_size_keyword_without_g_idx():
    rng = np.random.default_rng(3)
    # 96 rows in 3 groups of 40, 40 and 16 rows: any of 32..47 gives 3 groups, so none is guessed
    k, n, gs = 96, 16, 40
    q = rng.integers(0, 16, size=(k, n))
    z = rng.integers(1, 16, size=(3, n))
    scales = (rng.random((3, n)) * 0.05 + 0.01).astype(np.float16)
    t = dict(qweight=pack_fields(q, 4, 0).view(np.int32), qzeros=fg.pack_qzeros(z, 4), scales=scales)
    expected = oracle(q, z, scales, np.arange(k) // gs)
    np.testing.assert_array_equal(reference.dequantize_gptq(**t, group_size=gs), expected)
    qm = cupyq.QMatrix.from_gptq(**t, group_size=gs, device="cpu")
    assert qm.group_size == gs
    np.testing.assert_array_equal(qm.reference_weight(), expected)
    with pytest.raises(ValueError, match=r"group_size: .*g_idx is absent.*fit group sizes 32\.\.47"):
        reference.dequantize_gptq(**t)


def test_group_size_inconsistent_with_shapes_is_an_error():
    t, *_ = act_order_case(np.random.default_rng(4))
    for fn in (lambda: reference.dequantize_gptq(**t, group_size=64),
               lambda: cupyq.QMatrix.from_gptq(**t, group_size=64, device="cpu")):
        with pytest.raises(ValueError, match=r"group_size: 64 over 128 input rows needs 2 groups, but scales/qzeros have 4"):
            fn()
    with pytest.raises(ValueError, match=r"group_size: expected -1 or a positive integer, got 0"):
        reference.dequantize_gptq(**t, group_size=0)


# ------------------------------------------------------------------------------------------------ item 4
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_gptq_scales_rejected(bad):
    t, *_ = act_order_case(np.random.default_rng(5))
    t["scales"] = t["scales"].copy()
    t["scales"][2, 7] = bad
    for fn in (lambda: fg.check_gptq(t["qweight"], t["qzeros"], t["scales"], None, 4),
               lambda: cupyq.QMatrix.from_gptq(**t, device="cpu"),
               lambda: reference.dequantize_gptq(**t)):
        with pytest.raises(ValueError, match=r"scales: expected finite values, got 1 NaN/Inf, the first at index \(2, 7\)"):
            fn()


def test_non_finite_exl2_scale_max_rejected():
    rng = np.random.default_rng(6)
    t = quantize_exl2(rng.standard_normal((128, 64)).astype(np.float32), bits=(4,), proportions=(1.0,))
    t = {k: v for k, v in t.items() if k != "q_perm"}
    t["q_scale_max"] = t["q_scale_max"].copy()
    t["q_scale_max"][1] = np.nan
    with pytest.raises(ValueError, match=r"q_scale_max: expected finite values, got 1 NaN/Inf, the first at index \(1,\)"):
        fx.check_exl2(t["q_weight"], t["q_invperm"], t["q_scale"], t["q_scale_max"], t["q_groups"])
    with pytest.raises(ValueError, match="q_scale_max: expected finite values"):
        cupyq.QMatrix.from_exl2(**t, device="cpu")


def test_non_finite_torch_scales_rejected():
    torch = pytest.importorskip("torch")
    t, *_ = act_order_case(np.random.default_rng(8))
    scales = torch.from_numpy(t["scales"].copy())
    scales[0, 1] = float("inf")
    with pytest.raises(ValueError, match=r"scales: expected finite values, got 1 NaN/Inf, the first at index \(0, 1\)"):
        fg.check_gptq(torch.from_numpy(t["qweight"]), torch.from_numpy(t["qzeros"]), scales, None, 4)


# ------------------------------------------------------------------------------------------------ item 5
def test_cpu_qmatrix_does_not_follow_later_changes_of_the_inputs():
    rng = np.random.default_rng(9)
    t, q, z, scales, g = word_encoded_case(rng, 4, 64, 32, 32)
    t = dict(t, qzeros=fg.pack_qzeros(z, 4, checkpoint_format="gptq_v2"))
    qm = cupyq.QMatrix.from_gptq(**t, checkpoint_format="gptq_v2", device="cpu")
    expected = oracle(q, z, scales, g)
    for a in t.values():
        a[...] = a[::-1].copy() if a.ndim == 1 else a[::-1]  # overwrite every input in place
    np.testing.assert_array_equal(qm.reference_weight(), expected)


def test_cpu_qmatrix_copies_torch_and_exl2_inputs():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(10)
    t = quantize_exl2(rng.standard_normal((128, 64)).astype(np.float32), bits=(4,), proportions=(1.0,))
    t = {k: torch.from_numpy(v.copy()) for k, v in t.items() if k != "q_perm"}
    qm = cupyq.QMatrix.from_exl2(**t, device="cpu")
    expected = qm.reference_weight()
    t["q_weight"].zero_()
    t["q_scale_max"].mul_(3)
    np.testing.assert_array_equal(qm.reference_weight(), expected)


# ------------------------------------------------------------------------------------------------ item 8
def test_int16_q_invperm_above_32767_read_as_unsigned():
    rng = np.random.default_rng(11)
    k, n = 32800, 8
    t = quantize_exl2(rng.standard_normal((k, n)).astype(np.float32), bits=(4,), proportions=(1.0,))
    inv32 = t["q_invperm"].astype(np.int32)
    assert inv32.max() > 32767
    inv16 = inv32.astype(np.uint16).view(np.int16)
    w32 = reference.dequantize_exl2(t["q_weight"], inv32, t["q_scale"], t["q_scale_max"], t["q_groups"])
    w16 = reference.dequantize_exl2(t["q_weight"], inv16, t["q_scale"], t["q_scale_max"], t["q_groups"])
    np.testing.assert_array_equal(w16, w32)
    np.testing.assert_array_equal(fx.perm_from_invperm(inv16), fx.perm_from_invperm(inv32))


# ------------------------------------------------------------------------------------------------ item 16
def test_bits_of_the_wrong_type_is_a_type_error():
    t, *_ = act_order_case(np.random.default_rng(12))
    with pytest.raises(TypeError, match=r"bits: expected an integer, one of \(2, 3, 4, 8\), got str '4'"):
        fg.check_gptq(t["qweight"], t["qzeros"], t["scales"], None, "4")
    with pytest.raises(TypeError, match=r"bits: expected an integer.*got float 4.0"):
        cupyq.QMatrix.from_gptq(**t, bits=4.0, device="cpu")
    with pytest.raises(ValueError, match=r"bits: expected one of \(2, 3, 4, 8\), got 5"):
        fg.check_gptq(t["qweight"], t["qzeros"], t["scales"], None, 5)


def test_parse_q_groups_rejects_non_integer_widths():
    with pytest.raises(ValueError, match=r"q_groups: expected integers, got 4.5"):
        fx.parse_q_groups(np.array([4.5, 0.0]), 8, 64)
    with pytest.raises(ValueError, match=r"q_groups: expected integers, got nan"):
        fx.parse_q_groups([4, float("nan")], 8, 64)
    assert fx.parse_q_groups(np.array([4.0, 0.0]), 8, 64)[0].bits == 4  # whole floats are still whole numbers


# ------------------------------------------------------------------------------------------------ item 19
def _product_tolerance(x, w):
    # float32 sums of K terms in two different orders differ by at most about 2 * K * eps * sum |x||w|.
    return 2 * x.shape[-1] * np.finfo(np.float32).eps * (np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64))


@pytest.mark.parametrize("block_rows", [None, 32, 96, 1000])
def test_chunked_gptq_product_equals_full_product(block_rows):
    rng = np.random.default_rng(13)
    t, q, z, scales, g = act_order_case(rng, k=256, n=48)
    t["g_idx"] = g
    bias = rng.standard_normal(48).astype(np.float16)
    x = rng.standard_normal((5, 256)).astype(np.float16)
    w = oracle(q, z, scales, g)
    full = x.astype(np.float32) @ w + bias.astype(np.float32)
    y = reference.matmul_gptq(x, **t, bias=bias, block_rows=block_rows)
    assert y.dtype == np.float32 and y.shape == (5, 48)
    assert np.all(np.abs(y - full) <= _product_tolerance(x, w) + 1e-6)


@pytest.mark.parametrize("block_rows", [None, 32, 64])
def test_chunked_exl2_product_equals_full_product(block_rows):
    rng = np.random.default_rng(14)
    t = quantize_exl2(rng.standard_normal((192, 40)).astype(np.float32), bits=(6, 4), proportions=(0.5, 0.5))
    t = {k: v for k, v in t.items() if k != "q_perm"}
    w = reference.dequantize_exl2(**t)
    x = rng.standard_normal((3, 2, 192)).astype(np.float32)
    y = reference.matmul_exl2(x, **t, block_rows=block_rows)
    assert y.shape == (3, 2, w.shape[1])
    assert np.all(np.abs(y - x @ w) <= _product_tolerance(x, w) + 1e-6)


def test_cpu_gemm_keeps_no_float32_weight_and_bounds_memory():
    rng = np.random.default_rng(15)
    k, n = 4096, 1024  # a float32 copy of W would be 16 MiB
    t, q, z, scales, g = act_order_case(rng, k=k, n=n, group_size=128)
    t["g_idx"] = g
    qm = cupyq.QMatrix.from_gptq(**t, device="cpu")
    x = rng.standard_normal((2, k)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        tracemalloc.start()
        y = qm.reference_product(x, block_rows=256)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        y2 = cupyq.gemm(x, qm)
    w = oracle(q, z, scales, g)
    assert np.all(np.abs(y - x @ w) <= _product_tolerance(x, w) + 1e-6)
    assert np.all(np.abs(y2 - x @ w) <= _product_tolerance(x, w) + 1e-6)
    # a block's temporaries are a few 64-bit arrays of 256 x 1024 (2 MiB each); a float32 W alone is 16 MiB
    assert peak < 12 << 20, f"peak {peak} bytes for 256-row blocks"
    assert not any(isinstance(v, np.ndarray) and v.shape == (k, n) and v.dtype == np.float32 for v in vars(qm).values())
    assert set(qm._cpu) == {"qweight", "qzeros", "scales", "g_idx"}


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_gpu_word_encoded_v1_zeros_and_group_size(bits):
    import cupy

    rng = np.random.default_rng(200 + bits)
    k, n, gs = 256, 128, 64
    t, q, z, scales, g = word_encoded_case(rng, bits, k, n, gs)
    del t["g_idx"]  # groups from group_size
    expected = oracle(q, z, scales, g)
    qm = cupyq.QMatrix.from_gptq(**t, bits=bits, v1_encoding="word", group_size=gs, device=0)
    w16 = cupy.asnumpy(qm.dequantize()).astype(np.float32)
    # one float16 rounding of each weight: relative 2**-11
    np.testing.assert_allclose(w16, expected, rtol=2.0**-11, atol=1e-7)
    x = cupy.asarray(rng.standard_normal((3, k)).astype(np.float16))
    y = cupy.full((3, n), cupy.nan, dtype=cupy.float16)  # poisoned: the kernel must write every element
    cupyq.gemm(x, qm, out=y)
    ref = cupy.asnumpy(x).astype(np.float32) @ expected
    err = np.linalg.norm(cupy.asnumpy(y).astype(np.float32) - ref) / np.linalg.norm(ref)
    assert err < 1e-2  # fp16 weights, activations and output: about 1e-3
