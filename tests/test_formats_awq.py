"""cupyq.formats.awq: the AutoAWQ GEMM packing, validation and the conversion to the device layout.

The expected words are built in the tests straight from the layout description: word ``c`` of a row holds
output ``8c + ORDER[i]`` in bits ``4i .. 4i+3`` with ``ORDER = 0, 2, 4, 6, 1, 3, 5, 7``; zero points are
packed the same way and stored as they are.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from cupyq import layout as L
from cupyq.formats import awq as A

ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def pack_by_description(values):
    """int32 words [R, N/8] from 4-bit values [R, N], one Python int per word."""
    values = np.asarray(values, dtype=np.int64)
    r, n = values.shape
    out = np.zeros((r, n // 8), dtype=np.int64)
    for row in range(r):
        for c in range(n // 8):
            word = 0
            for i in range(8):
                word |= int(values[row, 8 * c + ORDER[i]]) << (4 * i)
            out[row, c] = word
    return out.astype(np.uint32).view(np.int32)


def test_order_constants():
    assert list(A.AWQ_PACK_ORDER) == ORDER
    # output j sits in nibble UNPACK[j]
    assert [ORDER.index(j) for j in range(8)] == list(A.AWQ_UNPACK_ORDER) == [0, 4, 1, 5, 2, 6, 3, 7]


def test_one_word_by_hand():
    # outputs 0..7 hold 1..8: nibbles in pack order hold 1, 3, 5, 7, 2, 4, 6, 8
    q = np.arange(1, 9, dtype=np.uint8).reshape(1, 8)
    word = A.pack_qweight(q, xp=np)
    assert word.dtype == np.int32 and word.shape == (1, 1)
    assert int(word.view(np.uint32)[0, 0]) == 0x86427531
    assert np.array_equal(A.unpack_qweight(word, xp=np), q)


@pytest.mark.parametrize("k, n", [(1, 8), (3, 16), (64, 40), (128, 256)])
def test_pack_matches_description_and_round_trips(k, n):
    rng = np.random.default_rng(k * 1000 + n)
    q = rng.integers(0, 16, size=(k, n)).astype(np.uint8)
    q[0, :8] = [15, 0, 15, 0, 15, 0, 15, 0]  # sign bit of the int32 word set
    q_before = q.copy()
    words = A.pack_qweight(q, xp=np)
    assert np.array_equal(words, pack_by_description(q))
    assert np.array_equal(q, q_before)
    back = A.unpack_qweight(words, xp=np)
    assert back.dtype == np.uint8 and np.array_equal(back, q)
    # uint32 words unpack the same
    assert np.array_equal(A.unpack_qweight(words.view(np.uint32), xp=np), q)


@given(
    rows=st.integers(1, 12),
    words=st.integers(1, 6),
    seed=st.integers(0, 2**32 - 1),
)
def test_round_trip_property(rows, words, seed):
    rng = np.random.default_rng(seed)
    z = rng.integers(0, 16, size=(rows, 8 * words))
    packed = A.pack_qzeros(z, xp=np)
    assert np.array_equal(packed, pack_by_description(z))
    assert np.array_equal(A.unpack_qzeros(packed, xp=np), z)
    w = rng.integers(-(2**31), 2**31, size=(rows, words), dtype=np.int64).astype(np.int32)
    assert np.array_equal(A.pack_qweight(A.unpack_qweight(w, xp=np), xp=np), w)


def test_zero_points_are_stored_as_they_are():
    # GPTQ v1 stores z - 1, so a zero of 0 wraps to 15 there; AWQ must keep 0 as 0 and 15 as 15.
    z = np.array([[0, 15, 0, 15, 1, 14, 8, 7]], dtype=np.uint8)
    packed = A.pack_qzeros(z, xp=np)
    assert np.array_equal(packed, pack_by_description(z))
    assert np.array_equal(A.unpack_qzeros(packed, xp=np), z)
    assert np.array_equal(A.unpack_qzeros(np.zeros((2, 3), np.int32), xp=np), np.zeros((2, 24), np.uint8))


@pytest.mark.parametrize(
    "call, exc, fragment",
    [
        (lambda: A.pack_qweight(np.zeros((4, 12), np.uint8)), ValueError, "q: .*multiple of 8.*12"),
        (lambda: A.pack_qweight(np.full((4, 8), 16, np.int32)), ValueError, r"q: .*\[0, 16\).*\[16, 16\]"),
        (lambda: A.pack_qweight(np.zeros((4, 8), np.float32)), TypeError, "q: expected dtype"),
        (lambda: A.pack_qzeros(np.full((1, 8), -1, np.int32)), ValueError, "zeros: "),
        (lambda: A.pack_qzeros(np.zeros(8, np.int32)), ValueError, "zeros: expected a 2-D"),
        (lambda: A.unpack_qweight(np.zeros((4, 2), np.int64)), TypeError, "qweight: expected dtype int32"),
        (lambda: A.unpack_qzeros(np.zeros((4, 2), np.float16)), TypeError, "qzeros: expected dtype int32"),
    ],
)
def test_pack_unpack_errors_name_the_tensor(call, exc, fragment):
    with pytest.raises(exc, match=fragment):
        call()


def _layer(k=128, n=64, gs=32, seed=0):
    rng = np.random.default_rng(seed)
    g = k // gs
    return dict(
        qweight=A.pack_qweight(rng.integers(0, 16, (k, n))),
        qzeros=A.pack_qzeros(rng.integers(0, 16, (g, n))),
        scales=rng.uniform(0.01, 0.02, (g, n)).astype(np.float16),
    )


def test_check_awq_layout():
    t = _layer(128, 64, 32)
    assert A.check_awq(t["qweight"], t["qzeros"], t["scales"], 32) == (128, 64, 4, 32, 4)
    one = _layer(128, 64, 128)
    assert A.check_awq(one["qweight"], one["qzeros"], one["scales"], -1) == (128, 64, 1, 128, 4)


def test_check_awq_accepts_torch():
    torch = pytest.importorskip("torch")
    t = {k: torch.from_numpy(v) for k, v in _layer().items()}
    assert A.check_awq(t["qweight"], t["qzeros"], t["scales"], 32).out_features == 64


def _bad(**changes):
    t = _layer(128, 64, 32)
    gs = changes.pop("group_size", 32)
    t.update(changes)
    return t, gs


@pytest.mark.parametrize(
    "changes, exc, fragment",
    [
        (dict(qweight=np.zeros((128, 8), np.int64)), TypeError, "qweight: expected dtype int32, got int64"),
        (dict(qweight=np.zeros((128, 8), np.float16)), TypeError, "qweight: expected dtype int32"),
        (dict(qweight=np.zeros(128, np.int32)), ValueError, "qweight: expected a 2-D"),
        (dict(qweight=np.zeros((0, 8), np.int32)), ValueError, "qweight: expected a non-empty"),
        (dict(qzeros=np.zeros((4, 8), np.uint8)), TypeError, "qzeros: expected dtype int32"),
        (dict(qzeros=np.zeros((3, 8), np.int32)), ValueError, r"qzeros: expected shape \(4, 8\), got \(3, 8\)"),
        (dict(qzeros=np.zeros((4, 9), np.int32)), ValueError, "qzeros: expected shape"),
        (dict(scales=np.zeros((4, 64), np.int32)), TypeError, "scales: expected dtype"),
        (dict(scales=np.zeros((4, 60), np.float16)), ValueError, r"scales: expected shape \(4, 64\)"),
        (dict(scales=np.zeros((4, 64, 1), np.float16)), ValueError, "scales: expected a 2-D"),
        (dict(group_size=48), ValueError, "group_size: .*divide.*128.*48"),
        (dict(group_size=0), ValueError, "group_size: expected -1 or a positive"),
        (dict(group_size=True), ValueError, "group_size: expected -1 or a positive"),
        (dict(group_size=64), ValueError, r"qzeros: expected shape \(2, 8\)"),
    ],
)
def test_check_awq_errors_name_the_tensor(changes, exc, fragment):
    t, gs = _bad(**changes)
    with pytest.raises(exc, match=fragment):
        A.check_awq(t["qweight"], t["qzeros"], t["scales"], gs)


def test_awq_rows_feed_the_device_layout():
    """The conversion the GPU matrix uses, run with NumPy: the packed device layout holds (q - z) * s of the
    checkpoint for every row (checked through layout.unpack_layout), padding rows read nothing."""
    rng = np.random.default_rng(5)
    k, n, gs = 96, 40, 32
    q = rng.integers(0, 16, (k, n))
    z = rng.integers(0, 16, (k // gs, n))
    z[0, :4] = [0, 15, 0, 15]
    s = rng.uniform(0.01, 0.02, (k // gs, n)).astype(np.float16)
    t = dict(qweight=pack_by_description(q), qzeros=pack_by_description(z), scales=s)
    before = {name: a.copy() for name, a in t.items()}
    rows = A.awq_rows(t["qweight"], t["qzeros"], t["scales"], gs, xp=np)
    assert np.array_equal(rows.q, q) and np.array_equal(rows.zeros, z)
    assert np.array_equal(rows.row_group, np.arange(k) // gs) and not rows.storage8.any()
    lay = L.build_layout(rows.q, None, rows.row_group, rows.storage8, rows.scales, rows.zeros, np)
    q_pad, s_pad, z_pad = L.unpack_layout(lay)
    src = np.arange(k) if lay.row_src is None else np.asarray(lay.row_src)
    real = src >= 0
    w_layout = np.zeros((k, lay.padded_cols), np.float32)
    w_layout[src[real]] = (q_pad[real].astype(np.float32) - z_pad[real]) * s_pad[real]
    expected = (q - np.repeat(z, gs, axis=0)) * np.repeat(s.astype(np.float32), gs, axis=0)
    assert np.array_equal(w_layout[:, :n], expected.astype(np.float32))
    for name, a in t.items():
        assert np.array_equal(a, before[name]), name


@pytest.mark.gpu
def test_cupy_matches_numpy():
    import cupy

    rng = np.random.default_rng(9)
    q = rng.integers(0, 16, (64, 48)).astype(np.uint8)
    words = A.pack_qweight(cupy.asarray(q), xp=cupy)
    assert isinstance(words, cupy.ndarray) and words.dtype == cupy.int32
    assert np.array_equal(words.get(), pack_by_description(q))
    assert np.array_equal(A.unpack_qweight(words).get(), q)
    assert np.array_equal(A.unpack_qzeros(cupy.asarray(pack_by_description(q))).get(), q)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_scales_rejected(bad):
    rng = np.random.default_rng(41)
    qweight = A.pack_qweight(rng.integers(0, 16, size=(64, 16)))
    qzeros = A.pack_qzeros(rng.integers(0, 16, size=(2, 16)))
    scales = rng.uniform(0.5, 1.5, size=(2, 16)).astype(np.float16)
    scales[1, 3] = bad
    before = scales.copy()
    with pytest.raises(ValueError, match=r"scales: expected finite values"):
        A.check_awq(qweight, qzeros, scales, 32)
    assert np.array_equal(scales, before, equal_nan=True)
