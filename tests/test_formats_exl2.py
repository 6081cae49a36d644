"""EXL2 layouts: mixed-width packing, q_groups parsing, group map, permutation, scales, validation."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cupyq.formats import (
    EXL2_BITS,
    Exl2Group,
    Exl2Layout,
    check_exl2,
    decode_scales,
    encode_scale_codes,
    make_group_map,
    pack_q_weight,
    parse_q_groups,
    perm_from_invperm,
    unpack_q_weight,
)
from cupyq.formats.common import unit_rows

# Irregular mixed widths: several group sizes per width, a 2-bit group of 16 rows, a partial last group.
MIXED_BITS = [8, 8, 6, 5, 5, 4, 4, 4, 3, 2, 2]
MIXED_ROWS = [32, 64, 48, 32, 64, 8, 24, 128, 96, 16, 20]
MIXED_QROWS = [8, 16, 9, 5, 10, 1, 3, 16, 9, 1, 2]  # the last 2-bit group is padded to 32 rows = 2 words


def oracle_unpack_group(q_weight, bits, qrow_start, rows):
    """Per element: a column's words from qrow_start on, read as one little-endian integer."""
    w = q_weight.view(np.uint32)
    out = np.zeros((rows, w.shape[1]), dtype=np.uint8)
    nwords = -(-rows * bits // 32)
    for n in range(w.shape[1]):
        stream = sum(int(w[qrow_start + j, n]) << (32 * j) for j in range(nwords))
        for t in range(rows):
            out[t, n] = (stream >> (bits * t)) & ((1 << bits) - 1)
    return out


def oracle_group_map(pairs, num_qrows):
    """The group map exactly as the original loader builds it, one row at a time."""
    out = []
    groups = len(pairs) // 2
    for i in range(groups):
        bits, start = pairs[2 * i], pairs[2 * i + 1]
        end = pairs[2 * i + 3] if i < groups - 1 else num_qrows
        rows = (end - start) * 32 // bits
        for j in range(rows):
            out += [i, rows - j]
    return np.array(out, dtype=np.int16)


def random_q(rng, bits_list, rows_list, cols):
    return np.concatenate([rng.integers(0, 1 << b, size=(r, cols)) for b, r in zip(bits_list, rows_list)])


def make_layer(rng, bits_list, rows_list, cols=32):
    """A random, valid EXL2 layer: (tensors dict, sorted q)."""
    q = random_q(rng, bits_list, rows_list, cols)
    q_weight, q_groups = pack_q_weight(q, bits_list, rows_list)
    k = sum(rows_list)
    codes = rng.integers(0, 16, size=(len(bits_list), cols))
    tensors = {
        "q_weight": q_weight,
        "q_invperm": rng.permutation(k).astype(np.int32),
        "q_scale": encode_scale_codes(codes),
        "q_scale_max": (rng.random(len(bits_list)) * 0.1 + 0.01).astype(np.float16),
        "q_groups": q_groups,
    }
    return tensors, q


def test_pack_q_weight_mixed_widths_layout():
    rng = np.random.default_rng(0)
    q = random_q(rng, MIXED_BITS, MIXED_ROWS, 5)
    q_weight, q_groups = pack_q_weight(q, MIXED_BITS, MIXED_ROWS)
    starts = np.concatenate([[0], np.cumsum(MIXED_QROWS)[:-1]])
    assert q_weight.dtype == np.int32 and q_weight.shape == (sum(MIXED_QROWS), 5)
    assert q_groups.dtype == np.int16
    np.testing.assert_array_equal(q_groups, np.stack([MIXED_BITS, starts], axis=1).reshape(-1))
    row = 0
    for b, r, s in zip(MIXED_BITS, MIXED_ROWS, starts):
        np.testing.assert_array_equal(oracle_unpack_group(q_weight, b, s, r), q[row : row + r])
        row += r
    # padding rows of the partial last group hold the zero point 2**(bits-1)
    np.testing.assert_array_equal(oracle_unpack_group(q_weight, 2, starts[-1], 32)[20:], 2)


def test_parse_q_groups_mixed_widths():
    rng = np.random.default_rng(1)
    q = random_q(rng, MIXED_BITS, MIXED_ROWS, 8)
    q_weight, q_groups = pack_q_weight(q, MIXED_BITS, MIXED_ROWS)
    groups = parse_q_groups(q_groups, q_weight.shape[0], sum(MIXED_ROWS))
    expected, qrow, row = [], 0, 0
    for b, r, nq in zip(MIXED_BITS, MIXED_ROWS, MIXED_QROWS):
        expected.append(Exl2Group(b, qrow, nq, row, r))
        qrow, row = qrow + nq, row + r
    assert groups == expected
    np.testing.assert_array_equal(unpack_q_weight(q_weight, groups), q)


@pytest.mark.parametrize("bits", EXL2_BITS)
def test_single_width_round_trip(bits):
    rng = np.random.default_rng(10 + bits)
    rows = [64, 64, 32 + unit_rows(bits)]
    q = random_q(rng, [bits] * 3, rows, 16)
    q_weight, q_groups = pack_q_weight(q, [bits] * 3, rows)
    assert q_weight.shape == (sum(rows) * bits // 32, 16)
    groups = parse_q_groups(q_groups, q_weight.shape[0], sum(rows))
    unpacked = unpack_q_weight(q_weight, groups)
    assert unpacked.dtype == np.uint8
    np.testing.assert_array_equal(unpacked, q)
    repacked, regroups = pack_q_weight(unpacked, [g.bits for g in groups], [g.rows for g in groups])
    np.testing.assert_array_equal(repacked, q_weight)
    np.testing.assert_array_equal(regroups, q_groups)


def test_group_map_matches_original_algorithm():
    rng = np.random.default_rng(2)
    q = random_q(rng, MIXED_BITS, MIXED_ROWS, 8)
    q_weight, q_groups = pack_q_weight(q, MIXED_BITS, MIXED_ROWS)
    group_map = make_group_map(q_groups, q_weight.shape[0])
    assert group_map.dtype == np.int16
    expected = oracle_group_map(q_groups.tolist(), q_weight.shape[0])
    np.testing.assert_array_equal(group_map, expected)
    # the partial last group counts its full capacity of 32 rows, so the map is longer than 2K
    assert group_map.shape == (2 * (sum(MIXED_ROWS) + 12),)
    # row + rows_left is the first row of the next group
    first_rows = np.concatenate([[0], np.cumsum(MIXED_ROWS)])
    assert group_map[2 * 32 + 1] == 64 and group_map[2 * 95 + 1] == 1 and group_map[2 * 96] == 2
    assert group_map[2 * first_rows[-2]] == len(MIXED_BITS) - 1


def test_perm_from_invperm():
    rng = np.random.default_rng(3)
    perm = rng.permutation(1000)
    invperm = np.argsort(perm).astype(np.int32)
    got = perm_from_invperm(invperm)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, perm)
    np.testing.assert_array_equal(perm_from_invperm(invperm.astype(np.int64)), perm)
    np.testing.assert_array_equal(invperm[got], np.arange(1000))


def test_perm_from_invperm_large_k_in_int16():
    rng = np.random.default_rng(4)
    invperm = rng.permutation(40000).astype(np.int32)
    wrapped = invperm.astype(np.int16)  # values above 32767 wrap negative, as in a narrowed checkpoint tensor
    assert wrapped.min() < 0
    expected = np.argsort(invperm).astype(np.int32)
    np.testing.assert_array_equal(perm_from_invperm(wrapped), expected)
    np.testing.assert_array_equal(perm_from_invperm(invperm.astype(np.uint16)), expected)


@pytest.mark.parametrize(
    "invperm, match",
    [
        (np.array([0, 1, 1, 3], np.int32), r"q_invperm: not a permutation of 0..3: some values repeat"),
        (np.array([0, 1, 2, 4], np.int32), r"q_invperm: not a permutation of 0..3: values range over \[0, 4\]"),
        (np.array([-1, 0, 1, 2], np.int64), r"q_invperm: not a permutation of 0..3: values range over \[-1, 2\]"),
    ],
)
def test_perm_from_invperm_rejects_non_permutations(invperm, match):
    with pytest.raises(ValueError, match=match):
        perm_from_invperm(invperm)


def test_scale_codes():
    codes = np.array([[0, 1, 2, 3, 4, 5, 6, 15], [15, 14, 13, 12, 11, 10, 9, 0]])
    q_scale = encode_scale_codes(codes)
    assert q_scale.dtype == np.int32 and q_scale.shape == (2, 1)
    assert q_scale.view(np.uint32)[:, 0].tolist() == [0xF6543210, 0x09ABCDEF]
    q_scale_max = np.array([0.5, 0.0625], dtype=np.float16)
    scales = decode_scales(q_scale, q_scale_max)
    assert scales.dtype == np.float32 and scales.shape == (2, 8)
    np.testing.assert_array_equal(scales, (codes + 1.0) ** 2 * q_scale_max.astype(np.float32)[:, None] / 256)
    assert scales[0, 7] == 0.5 and scales[1, 7] == 0.0625 / 256


def test_scale_codes_random_round_trip():
    rng = np.random.default_rng(5)
    codes = rng.integers(0, 16, size=(6, 64))
    q_scale_max = (rng.random(6) * 0.1).astype(np.float32)
    scales = decode_scales(encode_scale_codes(codes), q_scale_max)
    np.testing.assert_allclose(scales, (codes + 1.0) ** 2 * q_scale_max[:, None] / 256, rtol=1e-7)


def test_check_exl2_accepts_valid_layer_and_does_not_mutate():
    rng = np.random.default_rng(6)
    t, _ = make_layer(rng, MIXED_BITS, MIXED_ROWS, cols=16)
    before = {k: v.copy() for k, v in t.items()}
    layout = check_exl2(**t)
    assert isinstance(layout, Exl2Layout)
    assert layout.in_features == sum(MIXED_ROWS) and layout.out_features == 16
    assert [g.rows for g in layout.groups] == MIXED_ROWS
    assert check_exl2(t["q_weight"], t["q_invperm"].astype(np.int16), t["q_scale"],
                      t["q_scale_max"].astype(np.float32), t["q_groups"].astype(np.int32)) == layout
    for k, v in t.items():
        np.testing.assert_array_equal(v, before[k])


def test_check_exl2_accepts_torch_tensors():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    t, _ = make_layer(rng, [6, 4], [32, 64])
    layout = check_exl2(**{k: torch.from_numpy(v) for k, v in t.items()})
    assert layout.in_features == 96 and len(layout.groups) == 2
    bad = dict(t, q_invperm=np.zeros(96, np.int32))
    with pytest.raises(ValueError, match="q_invperm: not a permutation"):
        check_exl2(**{k: torch.from_numpy(v) for k, v in bad.items()})


def _bad_layers():
    rng = np.random.default_rng(8)
    t, _ = make_layer(rng, [8, 4, 4], [32, 32, 64], cols=32)
    q_groups = t["q_groups"]
    ascending = q_groups.copy()
    ascending[[0, 2]] = [4, 8]  # (4, 0), (8, 8): widths go up
    seven = q_groups.copy()
    seven[2] = 7
    zero_start = q_groups.copy()
    zero_start[1] = 1
    not_increasing = q_groups.copy()
    not_increasing[3] = 0
    invperm_dup = t["q_invperm"].copy()
    invperm_dup[0] = invperm_dup[1]
    three_bit = dict(t, q_groups=np.array([3, 0, 3, 4, 3, 12], np.int16))  # group 0 spans 4 words of 3-bit rows
    return [
        (dict(t, q_groups=ascending), ValueError, r"q_groups: widths must be in descending order .* group 1 has width 8 after 4"),
        (dict(t, q_groups=seven), ValueError, r"q_groups: group 1 has width 7, expected one of \(8, 6, 5, 4, 3, 2\)"),
        (dict(t, q_groups=zero_start), ValueError, "q_groups: the first group must start at packed row 0, got 1"),
        (dict(t, q_groups=not_increasing), ValueError, "q_groups: group 0 starts at packed row 0, not before group 1's start 0"),
        (three_bit, ValueError, r"q_groups: group 0 \(3-bit\) spans 4 packed rows, not a multiple of 3"),
        (dict(t, q_invperm=np.arange(160, dtype=np.int32)), ValueError, "q_groups: the groups hold 128 rows but q_invperm has 160"),
        (dict(t, q_invperm=np.arange(64, dtype=np.int32)), ValueError, "q_groups: the groups hold 128 rows but q_invperm has 64"),
        (dict(t, q_invperm=invperm_dup), ValueError, "q_invperm: not a permutation of 0..127: some values repeat"),
        (dict(t, q_invperm=t["q_invperm"] + 1), ValueError, r"q_invperm: not a permutation of 0..127: values range over \[1, 128\]"),
        (dict(t, q_weight=t["q_weight"].astype(np.float32)), TypeError, "q_weight: expected dtype int32, got float32"),
        (dict(t, q_invperm=t["q_invperm"].astype(np.float64)), TypeError, "q_invperm: expected dtype int16, uint16, int32 or int64, got float64"),
        (dict(t, q_scale=t["q_scale"].astype(np.int64)), TypeError, "q_scale: expected dtype int32, got int64"),
        (dict(t, q_scale_max=t["q_scale_max"].astype(np.int32)), TypeError, "q_scale_max: expected dtype float16 or float32, got int32"),
        (dict(t, q_groups=q_groups.astype(np.int64)), TypeError, "q_groups: expected dtype int16 or int32, got int64"),
        (dict(t, q_scale=t["q_scale"][:, :3]), ValueError, r"q_scale: expected shape \(3, 4\), got \(3, 3\)"),
        (dict(t, q_scale_max=t["q_scale_max"][:2]), ValueError, r"q_scale_max: expected shape \(3,\), got \(2,\)"),
        (dict(t, q_scale=t["q_scale"][:2]), ValueError, r"q_scale: expected shape \(3, 4\), got \(2, 4\)"),
        (dict(t, q_groups=q_groups[:4]), ValueError, r"q_groups: expected shape \(6,\), got \(4,\)"),
        (dict(t, q_weight=t["q_weight"][:, :30]), ValueError, "q_weight: expected a column count that is a multiple of 8, got 30"),
        (dict(t, q_invperm=np.arange(65536, dtype=np.int32)), ValueError, "q_invperm: expected 1..65535 rows, got 65536"),
        (dict(t, q_weight=t["q_weight"][0]), ValueError, "q_weight: expected a 2-D array"),
    ]


@pytest.mark.parametrize("tensors, exc, match", _bad_layers())
def test_check_exl2_rejects_malformed_input(tensors, exc, match):
    with pytest.raises(exc, match=match):
        check_exl2(**tensors)


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: pack_q_weight(np.ones((64, 8), np.int32), [4, 8], [32, 32]), ValueError, "group_bits: widths must be in descending order"),
        (lambda: pack_q_weight(np.ones((64, 8), np.int32), [7], [64]), ValueError, r"group_bits: group 0 has width 7"),
        (lambda: pack_q_weight(np.ones((64, 8), np.int32), [4, 4], [20, 44]), ValueError, "group_rows: group 0 .4-bit. has 20 rows; every group but the last needs a multiple of 8 rows"),
        (lambda: pack_q_weight(np.ones((64, 8), np.int32), [4, 4], [32, 40]), ValueError, "group_rows: the groups hold 72 rows, q has 64"),
        (lambda: pack_q_weight(np.full((64, 8), 16), [8, 4], [32, 32]), ValueError, r"q: rows 32..63 are 4-bit, values must lie in \[0, 16\), got range \[16, 16\]"),
        (lambda: pack_q_weight(np.ones((64, 8), np.float32), [4], [64]), TypeError, "q: expected dtype int8"),
        (lambda: encode_scale_codes(np.ones((2, 12), np.int32)), ValueError, "codes: expected a column count that is a multiple of 8, got 12"),
        (lambda: encode_scale_codes(np.full((2, 8), 16)), ValueError, r"codes: values must lie in \[0, 16\)"),
        (lambda: decode_scales(np.ones((2, 1), np.int32), np.ones(3, np.float16)), ValueError, r"q_scale_max: expected shape \(2,\), got \(3,\)"),
        (lambda: unpack_q_weight(np.ones((4, 8), np.int32), [Exl2Group(4, 0, 8, 0, 64)]), ValueError, "q_weight: group 0 needs packed rows up to 8, got 4 rows"),
        (lambda: make_group_map(np.array([4, 0, 6, 8], np.int16), 16), ValueError, "q_groups: widths must be in descending order"),
    ],
)
def test_format_function_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@st.composite
def mixed_layouts(draw):
    widths = sorted(draw(st.lists(st.sampled_from(EXL2_BITS), min_size=1, max_size=6)), reverse=True)
    rows = [unit_rows(b) * draw(st.integers(1, 4)) for b in widths[:-1]]
    rows.append(draw(st.integers(1, 3 * unit_rows(widths[-1]))))
    return widths, rows


@settings(max_examples=30)
@given(layout=mixed_layouts(), cols=st.sampled_from([8, 16, 24]), seed=st.integers(0, 2**32 - 1))
def test_property_exl2_round_trip(layout, cols, seed):
    widths, rows = layout
    rng = np.random.default_rng(seed)
    t, q = make_layer(rng, widths, rows, cols)
    result = check_exl2(**t)
    assert [(g.bits, g.rows) for g in result.groups] == list(zip(widths, rows))
    np.testing.assert_array_equal(unpack_q_weight(t["q_weight"], result.groups), q)
    np.testing.assert_array_equal(make_group_map(t["q_groups"], t["q_weight"].shape[0]),
                                  oracle_group_map(t["q_groups"].tolist(), t["q_weight"].shape[0]))
    np.testing.assert_array_equal(perm_from_invperm(t["q_invperm"]), np.argsort(t["q_invperm"]))


@pytest.mark.gpu
def test_cupy_matches_numpy():
    cupy = pytest.importorskip("cupy")
    rng = np.random.default_rng(9)
    t, q = make_layer(rng, MIXED_BITS, MIXED_ROWS, cols=64)
    g = {k: cupy.asarray(v) for k, v in t.items()}
    layout = check_exl2(**g)
    assert layout == check_exl2(**t)
    q_weight, q_groups = pack_q_weight(cupy.asarray(q), MIXED_BITS, MIXED_ROWS)
    assert isinstance(q_weight, cupy.ndarray)
    np.testing.assert_array_equal(q_weight.get(), t["q_weight"])
    np.testing.assert_array_equal(q_groups.get(), t["q_groups"])
    np.testing.assert_array_equal(unpack_q_weight(g["q_weight"], layout.groups).get(), q)
    np.testing.assert_array_equal(make_group_map(g["q_groups"], q_weight.shape[0]).get(),
                                  make_group_map(t["q_groups"], q_weight.shape[0]))
    np.testing.assert_array_equal(perm_from_invperm(g["q_invperm"]).get(), perm_from_invperm(t["q_invperm"]))
    np.testing.assert_array_equal(decode_scales(g["q_scale"], g["q_scale_max"]).get(),
                                  decode_scales(t["q_scale"], t["q_scale_max"]))
