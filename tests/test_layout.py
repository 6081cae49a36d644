"""The device layout: padding plan, fragment packing, and a bit-level NumPy model of the kernels' decode."""

import numpy as np
import pytest

from cupyq import layout as L


def _decode_like_kernel(lay):
    """Follow the kernel's decode (masks, fp16 magic numbers, A-fragment positions) lane by lane and return the
    dequantised matrix [Kp, Npad] in sorted padded order as float32 (fp16 arithmetic reproduced exactly)."""
    kp, npad = lay.padded_rows, lay.padded_cols
    t16 = npad // 16
    out = np.full((kp, npad), np.nan, dtype=np.float32)
    zs = lay.zs
    s_all = (zs & 0xFFFF).astype(np.uint16).view(np.float16)
    zc_all = (zs >> 16).astype(np.uint16).view(np.float16)
    lanes = np.arange(32)
    n_lo = lanes // 4

    def halves(u):  # uint32 [...] -> two float16 lanes
        u = np.asarray(u, dtype=np.uint32)
        return (u & 0xFFFF).astype(np.uint16).view(np.float16), (u >> 16).astype(np.uint16).view(np.float16)

    c8 = lay.chunks8
    w8 = lay.w8.reshape(t16, c8, 2, 32, 4) if c8 else None
    w4 = lay.w4.reshape(t16, lay.chunks4, 32, 4) if lay.chunks4 else None
    for t in range(t16):
        for c in range(c8 + lay.chunks4):
            g = lay.tile_group[c * 4 + lanes % 4]  # each lane's rows of the chunk form one 16-row tile
            for j in range(4):
                nl, nh = t * 16 + n_lo, t * 16 + n_lo + 8
                slo, shi = s_all[g, nl], s_all[g, nh]
                zlo, zhi = zc_all[g, nl], zc_all[g, nh]
                if c < c8:
                    v = w8[t, c, j // 2, :, :]
                    w0, w1 = v[:, 2 * (j % 2)], v[:, 2 * (j % 2) + 1]
                    zhi = (np.float16(960.0) - zhi).astype(np.float16)

                    def pair(w, sel_hi):
                        b = (w >> (16 * sel_hi)) & 0xFFFF
                        lo = (0x6400 | (b & 0xFF)).astype(np.uint16).view(np.float16)
                        hi = (0x6400 | (b >> 8)).astype(np.uint16).view(np.float16)
                        return lo, hi

                    pairs = [pair(w0, 0), pair(w0, 1), pair(w1, 0), pair(w1, 1)]
                    d = []
                    for p, (lo, hi) in enumerate(pairs):
                        z = zlo if p % 2 == 0 else zhi
                        d.append(((lo - z).astype(np.float16), (hi - z).astype(np.float16)))
                else:
                    w = w4[t, c - c8, :, j].astype(np.uint32)
                    w8s = w >> 8
                    d = []
                    for p, (src, mask) in enumerate(
                        [(w, 0x000F000F), (w, 0x00F000F0), (w8s, 0x000F000F), (w8s, 0x00F000F0)]
                    ):
                        lo, hi = halves((src & mask) | 0x64006400)
                        if p % 2 == 0:
                            d.append(((lo - zlo).astype(np.float16), (hi - zlo).astype(np.float16)))
                        else:
                            sx = np.float16(1 / 16)
                            d.append(((lo * sx + zhi).astype(np.float16), (hi * sx + zhi).astype(np.float16)))
                for p in range(4):
                    s = slo if p % 2 == 0 else shi
                    n = nl if p % 2 == 0 else nh
                    k = c * 64 + (lanes % 4) * 16 + 8 * (p // 2) + 2 * j
                    out[k, n] = (d[p][0] * s).astype(np.float16)
                    out[k + 1, n] = (d[p][1] * s).astype(np.float16)
    return out


def _random_case(rng, k, n, group_rows, bits_of_row, perm=None):
    q = np.stack([rng.integers(0, 2 ** b, size=n) for b in bits_of_row]).astype(np.uint8)
    groups = np.repeat(np.arange(len(group_rows)), group_rows)
    g = len(group_rows)
    scales = rng.uniform(0.5, 2.0, size=(g, n)).astype(np.float32) * 1e-2
    zeros = np.stack([rng.integers(0, 2 ** bits_of_row[np.flatnonzero(groups == i)[0]], size=n) for i in range(g)])
    storage8 = np.array([b > 4 for b in bits_of_row])
    return q, groups, storage8, scales, zeros


@pytest.mark.parametrize(
    "group_rows,bits",
    [
        ([128] * 4, [4] * 512),  # plain 4-bit, groups of 128
        ([40, 24, 64, 100], [4] * 228),  # uneven groups: padding inside and at the end
        ([64, 32, 96, 64], [8] * 64 + [6] * 32 + [4] * 96 + [2] * 64),  # 8-bit storage then 4-bit storage
        ([32] * 3, [5] * 96),  # only 8-bit storage
    ],
)
def test_kernel_decode_matches_values(group_rows, bits):
    rng = np.random.default_rng(len(bits) * 7 + len(group_rows))
    k, n = sum(group_rows), 40
    assert len(bits) == k
    q, groups, storage8, scales, zeros = _random_case(rng, k, n, group_rows, bits)
    lay = L.build_layout(q, None, groups, storage8, scales, zeros, np)
    dq = _decode_like_kernel(lay)
    plan = L.plan_rows(groups, storage8)
    expect = (scales.astype(np.float16).astype(np.float32)[groups] * (q.astype(np.float32) - zeros[groups]))
    got = dq[plan.position, :n]
    np.testing.assert_allclose(got, expect, rtol=2 ** -10, atol=0)
    # padding rows map to no source row; padding columns dequantise to zero
    src = lay.row_src if lay.row_src is not None else np.arange(k)
    assert (src[np.setdiff1d(np.arange(lay.padded_rows), plan.position)] == -1).all()
    assert np.all(dq[:, n:] == 0)


def test_unpack_layout_round_trip():
    rng = np.random.default_rng(3)
    group_rows = [32, 48, 64]
    bits = [8] * 32 + [5] * 48 + [3] * 64
    q, groups, storage8, scales, zeros = _random_case(rng, 144, 32, group_rows, bits)
    perm = rng.permutation(144)
    lay = L.build_layout(q, perm, groups, storage8, scales, zeros, np)
    q_pad, s, z = L.unpack_layout(lay)
    plan = L.plan_rows(groups, storage8)
    np.testing.assert_array_equal(q_pad[plan.position, :32], q)
    np.testing.assert_array_equal(z[plan.position, :32], zeros[groups])
    np.testing.assert_array_equal(lay.row_src[plan.position], perm)


def test_plan_rows_rejects_8bit_after_4bit():
    with pytest.raises(ValueError, match="8-bit"):
        L.plan_rows(np.zeros(64, int), np.array([False] * 32 + [True] * 32))


def test_plan_rows_identity_for_aligned_groups():
    plan = L.plan_rows(np.repeat(np.arange(4), 64), np.zeros(256, bool))
    assert plan.padded_rows == 256
    np.testing.assert_array_equal(plan.position, np.arange(256))


from hypothesis import given, settings
from hypothesis import strategies as st


@st.composite
def _layer_plans(draw):
    """Random groups (descending widths, any sizes), columns and an optional permutation."""
    widths = sorted(draw(st.lists(st.sampled_from([2, 3, 4, 5, 6, 8]), min_size=1, max_size=4)), reverse=True)
    group_rows = draw(st.lists(st.integers(1, 80), min_size=len(widths), max_size=len(widths)))
    bits = [b for b, r in zip(widths, group_rows) for _ in range(r)]
    n = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2 ** 16))
    permute = draw(st.booleans())
    return group_rows, bits, n, seed, permute


@settings(max_examples=25, deadline=None)
@given(_layer_plans())
def test_kernel_decode_property(plan):
    group_rows, bits, n, seed, permute = plan
    rng = np.random.default_rng(seed)
    k = sum(group_rows)
    q, groups, storage8, scales, zeros = _random_case(rng, k, n, group_rows, bits)
    perm = rng.permutation(k) if permute else None
    lay = L.build_layout(q, perm, groups, storage8, scales, zeros, np)
    assert lay.padded_rows % L.STEP_ROWS == 0 and lay.padded_cols % 16 == 0
    dq = _decode_like_kernel(lay)
    pos = L.plan_rows(groups, storage8).position
    expect = scales.astype(np.float16).astype(np.float32)[groups] * (q.astype(np.float32) - zeros[groups])
    np.testing.assert_allclose(dq[pos, :n], expect, rtol=2 ** -10, atol=0)
    src = lay.row_src if lay.row_src is not None else np.arange(lay.padded_rows)
    np.testing.assert_array_equal(src[pos], perm if permute else np.arange(k))
