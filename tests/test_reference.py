"""The float32 reference against element-by-element evaluation of the formulas on known integers."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cupyq.formats import GPTQ_BITS, default_g_idx, encode_scale_codes, pack_q_weight, pack_qweight, pack_qzeros
from cupyq.reference import dequantize_exl2, dequantize_gptq, matmul, to_numpy


def gptq_case(rng, bits, k, n, groups, fmt="gptq", act_order=False):
    """Random integers and their packed tensors. Returns (tensors, q, zeros, scales, g_idx)."""
    q = rng.integers(0, 1 << bits, size=(k, n))
    zeros = rng.integers(0, 1 << bits, size=(groups, n))
    zeros[0, 0], zeros[-1, -1] = 0, (1 << bits) - 1  # true zero 0 (stored all ones in v1) and the maximum
    scales = (rng.random((groups, n)) * 0.05 + 0.001).astype(np.float16)
    g_idx = default_g_idx(k, -(-k // groups)) if groups > 1 else default_g_idx(k, -1)
    if act_order:
        g_idx = rng.permutation(g_idx)
    tensors = dict(qweight=pack_qweight(q, bits), qzeros=pack_qzeros(zeros, bits, checkpoint_format=fmt),
                   scales=scales, g_idx=g_idx)
    return tensors, q, zeros, scales, g_idx


def gptq_oracle(q, zeros, scales, g_idx):
    k, n = q.shape
    w = np.zeros((k, n), dtype=np.float32)
    for i in range(k):
        g = g_idx[i]
        for j in range(n):
            w[i, j] = np.float32(scales[g, j]) * np.float32(int(q[i, j]) - int(zeros[g, j]))
    return w


@pytest.mark.parametrize("bits", GPTQ_BITS)
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
@pytest.mark.parametrize("act_order", [False, True])
def test_dequantize_gptq_matches_elementwise_formula(bits, fmt, act_order):
    rng = np.random.default_rng(bits * 10 + act_order)
    t, q, zeros, scales, g_idx = gptq_case(rng, bits, 64, 24, 4, fmt, act_order)
    w = dequantize_gptq(**t, bits=bits, checkpoint_format=fmt)
    assert w.dtype == np.float32 and w.shape == (64, 24)
    np.testing.assert_array_equal(w, gptq_oracle(q, zeros, scales, g_idx))


def test_dequantize_gptq_single_group_and_default_g_idx():
    rng = np.random.default_rng(1)
    t, q, zeros, scales, g_idx = gptq_case(rng, 4, 96, 16, 1)
    expected = gptq_oracle(q, zeros, scales, g_idx)
    np.testing.assert_array_equal(dequantize_gptq(**t), expected)
    np.testing.assert_array_equal(dequantize_gptq(t["qweight"], t["qzeros"], t["scales"]), expected)
    t, q, zeros, scales, g_idx = gptq_case(rng, 4, 96, 16, 3)
    np.testing.assert_array_equal(dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], group_size=32),
                                  gptq_oracle(q, zeros, scales, g_idx))


def test_dequantize_gptq_v1_vs_v2_zero_conventions():
    rng = np.random.default_rng(2)
    t1, q, zeros, scales, g_idx = gptq_case(rng, 4, 32, 8, 1, "gptq")
    t2 = dict(t1, qzeros=pack_qzeros(zeros, 4, checkpoint_format="gptq_v2"))
    w1 = dequantize_gptq(**t1, checkpoint_format="gptq")
    np.testing.assert_array_equal(w1, dequantize_gptq(**t2, checkpoint_format="gptq_v2"))
    # a true zero of 0 (stored nibble 15 in v1) gives W = scale * q, not scale * (q - 16)
    np.testing.assert_array_equal(w1[:, 0], scales[0, 0].astype(np.float32) * q[:, 0])


def test_dequantize_gptq_needs_g_idx_or_group_size_when_groups_cannot_be_inferred():
    rng = np.random.default_rng(3)
    t, *_ = gptq_case(rng, 4, 96, 8, 50)
    with pytest.raises(ValueError, match=r"group_size: no group size splits 96 input rows into 50 groups"):
        dequantize_gptq(t["qweight"], t["qzeros"], t["scales"])
    with pytest.raises(ValueError, match="checkpoint_format"):
        dequantize_gptq(**t, checkpoint_format="awq")


def exl2_case(rng, bits_list, rows_list, n):
    q = np.concatenate([rng.integers(0, 1 << b, size=(r, n)) for b, r in zip(bits_list, rows_list)])
    q_weight, q_groups = pack_q_weight(q, bits_list, rows_list)
    codes = rng.integers(0, 16, size=(len(bits_list), n))
    codes[0, :2] = [0, 15]
    q_scale_max = (rng.random(len(bits_list)) * 0.1 + 0.01).astype(np.float16)
    invperm = rng.permutation(sum(rows_list)).astype(np.int32)
    tensors = dict(q_weight=q_weight, q_invperm=invperm, q_scale=encode_scale_codes(codes),
                   q_scale_max=q_scale_max, q_groups=q_groups)
    return tensors, q, codes


def exl2_oracle(q, codes, q_scale_max, invperm, bits_list, rows_list):
    group_of_row = np.repeat(np.arange(len(bits_list)), rows_list)
    k, n = q.shape
    w = np.zeros((k, n), dtype=np.float32)
    for i in range(k):
        j = invperm[i]  # sorted row holding original row i
        g = group_of_row[j]
        zero = 1 << (bits_list[g] - 1)
        for c in range(n):
            scale = np.float32((int(codes[g, c]) + 1) ** 2) * np.float32(q_scale_max[g]) / np.float32(256)
            w[i, c] = np.float32(int(q[j, c]) - zero) * scale
    return w


@pytest.mark.parametrize(
    "bits_list, rows_list",
    [
        ([4], [64]),
        ([8, 4], [32, 96]),
        ([6, 5], [48, 64]),
        ([3, 2], [64, 40]),
        ([8, 6, 5, 4, 3, 2], [32, 16, 32, 24, 32, 16]),
        ([8, 8, 5, 4, 4, 2], [4, 32, 64, 8, 32, 7]),
    ],
)
def test_dequantize_exl2_matches_elementwise_formula(bits_list, rows_list):
    rng = np.random.default_rng(sum(rows_list))
    t, q, codes = exl2_case(rng, bits_list, rows_list, 16)
    w = dequantize_exl2(**t)
    assert w.dtype == np.float32 and w.shape == (sum(rows_list), 16)
    expected = exl2_oracle(q, codes, t["q_scale_max"], t["q_invperm"], bits_list, rows_list)
    np.testing.assert_allclose(w, expected, rtol=2e-7, atol=0)  # float32, only the multiplication order differs


def test_dequantize_exl2_int16_invperm():
    rng = np.random.default_rng(4)
    t, q, codes = exl2_case(rng, [6, 4], [32, 64], 8)
    w = dequantize_exl2(**t)
    np.testing.assert_array_equal(dequantize_exl2(**dict(t, q_invperm=t["q_invperm"].astype(np.int16))), w)


def test_reference_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    t, *_ = gptq_case(rng, 4, 64, 16, 2, act_order=True)
    expected = dequantize_gptq(**t)
    got = dequantize_gptq(**{k: torch.from_numpy(v) for k, v in t.items()})
    assert isinstance(got, np.ndarray)
    np.testing.assert_array_equal(got, expected)
    scales_bf16 = torch.from_numpy(t["scales"].astype(np.float32)).to(torch.bfloat16)
    w_bf16 = dequantize_gptq(**dict(t, scales=scales_bf16))
    np.testing.assert_allclose(w_bf16, expected, rtol=2**-8)
    e, *_ = exl2_case(rng, [5, 3], [32, 64], 8)
    np.testing.assert_array_equal(dequantize_exl2(**{k: torch.from_numpy(v) for k, v in e.items()}),
                                  dequantize_exl2(**e))
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    y = matmul(x, expected)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, x.float().numpy() @ expected, rtol=1e-5, atol=1e-6)


def test_to_numpy():
    a = np.arange(3)
    assert to_numpy(a) is a and to_numpy(None) is None
    np.testing.assert_array_equal(to_numpy([1, 2]), [1, 2])


def test_matmul_is_float32_with_batch_dims_and_bias():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 3, 64)).astype(np.float16)
    w = rng.standard_normal((64, 24)).astype(np.float32)
    bias = rng.standard_normal(24).astype(np.float16)
    y = matmul(x, w, bias)
    assert y.dtype == np.float32 and y.shape == (2, 3, 24)
    exact = np.einsum("abk,kn->abn", x.astype(np.float64), w.astype(np.float64)) + bias.astype(np.float64)
    # float32 accumulation over K = 64 terms of size ~1: error ~ sqrt(64) * 2**-24 * |terms| << 1e-5
    np.testing.assert_allclose(y, exact, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(matmul(x, w, bias, compute_dtype=np.float64), exact, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(matmul(x[0, 0], w), exact[0, 0] - bias.astype(np.float64), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: matmul(np.ones((2, 63), np.float16), np.ones((64, 8), np.float32)), ValueError, r"x: expected last dimension 64 .* got shape \(2, 63\)"),
        (lambda: matmul(np.ones((2, 64), np.int32), np.ones((64, 8), np.float32)), TypeError, "x: expected dtype float16, float32, float64 or bfloat16, got int32"),
        (lambda: matmul(np.ones((2, 64)), np.ones((64, 8)), np.ones(7)), ValueError, r"bias: expected shape \(8,\), got \(7,\)"),
        (lambda: matmul(np.ones((2, 64)), np.ones(64)), ValueError, "w: expected a 2-D array"),
        (lambda: matmul(np.ones((2, 64)), np.ones((64, 8)), compute_dtype=np.float16), ValueError, "compute_dtype: expected float32 or float64"),
    ],
)
def test_matmul_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@settings(max_examples=20)
@given(
    bits=st.sampled_from(GPTQ_BITS),
    k_units=st.integers(1, 3),
    n=st.integers(1, 12),
    groups=st.integers(1, 4),
    fmt=st.sampled_from(["gptq", "gptq_v2"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_dequantize_gptq(bits, k_units, n, groups, fmt, seed):
    rng = np.random.default_rng(seed)
    k = k_units * 32
    t, q, zeros, scales, _ = gptq_case(rng, bits, k, n, groups, fmt)
    g_idx = rng.integers(0, groups, size=k).astype(np.int64)
    w = dequantize_gptq(**dict(t, g_idx=g_idx), bits=bits, checkpoint_format=fmt)
    expected = (q - zeros[g_idx]).astype(np.float32) * scales.astype(np.float32)[g_idx]
    np.testing.assert_array_equal(w, expected)


@pytest.mark.gpu
def test_reference_accepts_cupy_arrays():
    cupy = pytest.importorskip("cupy")
    rng = np.random.default_rng(7)
    t, *_ = gptq_case(rng, 4, 64, 16, 2, act_order=True)
    np.testing.assert_array_equal(dequantize_gptq(**{k: cupy.asarray(v) for k, v in t.items()}), dequantize_gptq(**t))
    e, *_ = exl2_case(rng, [8, 4], [32, 64], 16)
    np.testing.assert_array_equal(dequantize_exl2(**{k: cupy.asarray(v) for k, v in e.items()}), dequantize_exl2(**e))
