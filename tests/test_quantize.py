"""Round-to-nearest quantizer: the checkpoint tensors it writes dequantise (cupyq.reference) back close
to the input, with the layout properties GPTQ and EXL2 files have.

Error bounds: for Gaussian weights a round-to-nearest grid with step s has an rms error of about
s / sqrt(12). With a group of g Gaussian rows the group's max abs is about sigma * sqrt(2 ln g) and
the symmetric step is 2 * amax / (2**b - 1), which gives the expected relative errors in the table
below (4-bit g128 ~ 0.1, 8-bit ~ 0.006). The asserted bounds leave ~20 % room above the measured
values of these seeded inputs and also assert a floor, so a test that quantised nothing would fail.
"""

import warnings

import numpy as np
import pytest

from cupyq import reference
from cupyq.formats import exl2 as fexl2
from cupyq.formats import gptq as fgptq
from cupyq.quantize import exl2_group_plan, quantize_awq, quantize_exl2, quantize_gptq, relative_error

K, N = 1024, 256


def gaussian(k=K, n=N, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal((k, n)).astype(dtype)


def dq_gptq(t, bits, checkpoint_format="gptq"):
    return reference.dequantize_gptq(
        t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits=bits, checkpoint_format=checkpoint_format
    )


def dq_exl2(t, n):
    w = reference.dequantize_exl2(t["q_weight"], t["q_invperm"], t["q_scale"], t["q_scale_max"], t["q_groups"])
    return w[:, :n]


# (label, kwargs, expected-error window [low, high])
GPTQ_CASES = [
    ("gptq 2b g128 sym", dict(bits=2, group_size=128), (0.45, 0.62)),
    ("gptq 3b g128 sym", dict(bits=3, group_size=128), (0.20, 0.28)),
    ("gptq 4b g128 sym", dict(bits=4, group_size=128), (0.09, 0.13)),
    ("gptq 4b g128 asym", dict(bits=4, group_size=128, sym=False), (0.08, 0.12)),
    ("gptq 4b g128 act v2", dict(bits=4, group_size=128, act_order=True, checkpoint_format="gptq_v2"), (0.09, 0.13)),
    ("gptq 4b g32 sym", dict(bits=4, group_size=32), (0.08, 0.11)),
    ("gptq 4b g-1 sym", dict(bits=4, group_size=-1), (0.11, 0.16)),
    ("gptq 4b g96 asym act", dict(bits=4, group_size=96, sym=False, act_order=True), (0.08, 0.115)),
    ("gptq 8b g128 sym", dict(bits=8, group_size=128), (0.0052, 0.0078)),
    ("gptq 8b g128 asym", dict(bits=8, group_size=128, sym=False), (0.0047, 0.0071)),
]

EXL2_CASES = [
    ("exl2 [4] g32", dict(bits=(4,), proportions=(1.0,)), (0.075, 0.11)),
    ("exl2 [8,4] 25/75", dict(bits=(8, 4), proportions=(0.25, 0.75), group_sizes={8: 32, 4: 128}), (0.075, 0.105)),
    ("exl2 [6,5] 50/50", dict(bits=(6, 5), proportions=(0.5, 0.5)), (0.029, 0.044)),
    ("exl2 [5,4,3] 20/30/50", dict(bits=(5, 4, 3), proportions=(0.2, 0.3, 0.5), group_sizes={5: 64, 4: 32, 3: 128}),
     (0.115, 0.17)),
    ("exl2 [3,2] 50/50", dict(bits=(3, 2), proportions=(0.5, 0.5), group_sizes={3: 32, 2: 16}), (0.23, 0.34)),
    ("exl2 all six", dict(bits=(8, 6, 5, 4, 3, 2), proportions=(0.1, 0.1, 0.15, 0.2, 0.2, 0.25),
                          group_sizes={8: 32, 6: 64, 5: 96, 4: 128, 3: 32, 2: 48}), (0.125, 0.185)),
]


def test_error_table():
    """Relative Frobenius error on Gaussian weights per configuration (printed with pytest -s)."""
    w = gaussian()
    rows, failures = [], []
    for label, kw, (low, high) in GPTQ_CASES:
        err = relative_error(w, dq_gptq(quantize_gptq(w, **kw), kw["bits"], kw.get("checkpoint_format", "gptq")))
        rows.append((label, err, low, high))
    for label, kw, (low, high) in EXL2_CASES:
        t = quantize_exl2(w, **kw)
        err = relative_error(w, dq_exl2(t, N))
        bpw = 32 * t["q_weight"].shape[0] / K
        rows.append((f"{label} ({bpw:.2f} bpw)", err, low, high))
    print(f"\nround-to-nearest error, Gaussian weight [{K}, {N}]")
    print(f"{'configuration':40s} {'rel. error':>10s}   bound")
    for label, err, low, high in rows:
        print(f"{label:40s} {err:10.4f}   [{low}, {high}]")
        if not low <= err <= high:
            failures.append(f"{label}: {err:.4f} not in [{low}, {high}]")
    assert not failures, failures


# ---------------------------------------------------------------------------------------------- GPTQ


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [32, 128, 160, -1])
def test_gptq_error_within_half_step(bits, sym, group_size):
    """Every element is within half a quantisation step of its input (the grid covers the group's
    range, scales are rounded up to float16, so nothing is clipped by more than s/2)."""
    w = gaussian(512, 64, seed=bits * 10 + group_size % 7) * 0.02
    t = quantize_gptq(w, bits=bits, group_size=group_size, sym=sym)
    w_dq = dq_gptq(t, bits)
    step = t["scales"].astype(np.float32)[t["g_idx"]]
    assert np.all(np.abs(w_dq - w) <= 0.5 * step * (1 + 1e-5) + 1e-9)
    assert relative_error(w, w_dq) > 0


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_tensor_shapes_and_dtypes(bits):
    w = gaussian(320, 96, seed=1)
    t = quantize_gptq(w, bits=bits, group_size=128, bias=np.linspace(-1, 1, 96))
    groups = 3  # 320 rows in groups of 128: 128, 128, 64
    assert t["qweight"].dtype == np.int32 and t["qweight"].shape == (320 * bits // 32, 96)
    assert t["qzeros"].dtype == np.int32 and t["qzeros"].shape == (groups, 96 * bits // 32)
    assert t["scales"].dtype == np.float16 and t["scales"].shape == (groups, 96)
    assert t["g_idx"].dtype == np.int32 and np.array_equal(t["g_idx"], np.arange(320) // 128)
    assert t["bias"].dtype == np.float16 and np.allclose(t["bias"], np.linspace(-1, 1, 96), atol=1e-3)
    layout = fgptq.check_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits)
    assert (layout.in_features, layout.out_features, layout.groups) == (320, 96, groups)
    assert np.array_equal(t["g_idx"], fgptq.default_g_idx(320, 128, xp=np))


def test_gptq_sym_v1_zero_words():
    """Symmetric 4-bit v1 checkpoints store zero - 1 = 7 in every nibble (0x77777777); v2 stores 8."""
    w = gaussian(256, 64, seed=2)
    v1 = quantize_gptq(w, bits=4, group_size=64)
    v2 = quantize_gptq(w, bits=4, group_size=64, checkpoint_format="gptq_v2")
    assert np.all(v1["qzeros"].view(np.uint32) == 0x77777777)
    assert np.all(v2["qzeros"].view(np.uint32) == 0x88888888)
    assert np.array_equal(v1["qweight"], v2["qweight"]) and np.array_equal(v1["scales"], v2["scales"])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_v1_and_v2_dequantise_identically(bits, sym):
    # A positive shift makes many asymmetric groups contain no negative weight, so their zero is 0:
    # the case v1 stores as all ones.
    shifted = np.arange(256) < 128
    w = gaussian(256, 64, seed=3) + np.float32(4.0) * shifted[:, None]
    # Act-order keeps the shifted rows in groups of their own when they are the most important.
    importance = shifted + np.random.default_rng(3).random(256)
    kw = dict(bits=bits, group_size=32, sym=sym, act_order=True, importance=importance)
    v1 = quantize_gptq(w, **kw)
    v2 = quantize_gptq(w, checkpoint_format="gptq_v2", **kw)
    z1 = fgptq.unpack_qzeros(v1["qzeros"], bits, 64, checkpoint_format="gptq", xp=np)
    z2 = fgptq.unpack_qzeros(v2["qzeros"], bits, 64, checkpoint_format="gptq_v2", xp=np)
    assert np.array_equal(z1, z2)
    if not sym:
        assert np.any(z1 == 0), "the shifted rows should produce zero points of 0"
        assert not np.array_equal(v1["qzeros"], v2["qzeros"])
    np.testing.assert_array_equal(dq_gptq(v1, bits, "gptq"), dq_gptq(v2, bits, "gptq_v2"))


def test_gptq_act_order_g_idx_follows_importance():
    k, gs = 512, 64
    importance = np.random.default_rng(4).random(k)
    t = quantize_gptq(gaussian(k, 64, seed=4), bits=4, group_size=gs, act_order=True, importance=importance)
    g_idx = t["g_idx"]
    rank = np.empty(k, dtype=np.int64)
    rank[np.argsort(-importance, kind="stable")] = np.arange(k)
    assert np.array_equal(g_idx, rank // gs)
    assert np.array_equal(np.bincount(g_idx), np.full(k // gs, gs))
    assert np.any(np.diff(g_idx) < 0), "act-order g_idx should not be monotonic"
    # The most important rows form group 0, the least important the last group.
    order = np.argsort(-importance)
    assert np.all(g_idx[order[:gs]] == 0) and np.all(g_idx[order[-gs:]] == k // gs - 1)
    # More important rows never sit in a later group.
    assert np.all(np.diff(g_idx[order]) >= 0)


def test_gptq_act_order_partial_last_group():
    k, gs = 352, 128  # groups of 128, 128, 96
    t = quantize_gptq(gaussian(k, 64, seed=5), bits=4, group_size=gs, act_order=True)
    assert np.array_equal(np.bincount(t["g_idx"]), [128, 128, 96])
    assert t["scales"].shape == (3, 64)


def test_gptq_act_order_random_importance_is_seeded():
    w = gaussian(256, 32, seed=6)
    a = quantize_gptq(w, group_size=32, act_order=True)
    b = quantize_gptq(w, group_size=32, act_order=True)
    c = quantize_gptq(w, group_size=32, act_order=True, seed=1)
    assert np.array_equal(a["g_idx"], b["g_idx"]) and np.array_equal(a["qweight"], b["qweight"])
    assert not np.array_equal(a["g_idx"], c["g_idx"])


def test_gptq_importance_ignored_without_act_order():
    w = gaussian(256, 32, seed=7)
    t = quantize_gptq(w, group_size=64, importance=np.random.default_rng(0).random(256))
    assert np.array_equal(t["g_idx"], np.arange(256) // 64)


def test_gptq_constant_group_and_input_untouched():
    w = gaussian(128, 32, seed=8)
    w[:32] = 0.0  # an all-zero group must not divide by zero
    w[32:64, :8] = 0.25  # a constant (non-zero) block
    before = w.copy()
    for sym in (True, False):
        t = quantize_gptq(w, bits=4, group_size=32, sym=sym)
        w_dq = dq_gptq(t, 4)
        assert np.all(np.isfinite(w_dq))
        assert np.all(w_dq[:32] == 0)
        np.testing.assert_allclose(w_dq[32:64, :8], 0.25, rtol=0.07)
    assert np.array_equal(w, before)


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_gptq_accepts_other_float_dtypes(dtype):
    w = gaussian(128, 32, seed=9, dtype=dtype)
    t = quantize_gptq(w, bits=4, group_size=32)
    assert relative_error(w, dq_gptq(t, 4)) < 0.12


def test_gptq_accepts_torch_tensor():
    torch = pytest.importorskip("torch")
    w = torch.from_numpy(gaussian(128, 32, seed=10)).to(torch.bfloat16)
    t = quantize_gptq(w, bits=8, group_size=64)
    assert relative_error(w.float().numpy(), dq_gptq(t, 8)) < 0.01


@pytest.mark.parametrize(
    "kwargs, weight, exc, match",
    [
        (dict(bits=5), gaussian(64, 32), ValueError, "bits"),
        (dict(group_size=0), gaussian(64, 32), ValueError, "group_size"),
        (dict(group_size=True), gaussian(64, 32), ValueError, "group_size"),
        (dict(checkpoint_format="awq"), gaussian(64, 32), ValueError, "checkpoint_format"),
        (dict(bits=3), gaussian(48, 32), ValueError, "in_features"),
        (dict(bits=4), gaussian(64, 12), ValueError, "out_features"),
        (dict(), np.ones((64,), np.float32), ValueError, "2-D"),
        (dict(), np.ones((64, 32), np.int32), TypeError, "floating"),
        (dict(), np.full((64, 32), np.nan, np.float32), ValueError, "NaN"),
        (dict(act_order=True, importance=np.ones(10)), gaussian(64, 32), ValueError, "importance"),
        (dict(bias=np.ones(31)), gaussian(64, 32), ValueError, "bias"),
        (dict(), gaussian(64, 32) * 1e6, ValueError, "float16"),
    ],
)
def test_gptq_rejects_bad_input(kwargs, weight, exc, match):
    with pytest.raises(exc, match=match):
        quantize_gptq(weight, **kwargs)


# ---------------------------------------------------------------------------------------------- EXL2


@pytest.mark.parametrize(
    "k, bits, proportions, group_sizes, expected",
    [
        (1024, (4,), (1.0,), None, [(4, 32)] * 32),
        (1024, (8, 4), (0.25, 0.75), {8: 32, 4: 128}, [(8, 32)] * 8 + [(4, 128)] * 6),
        (320, (6, 5), (0.7, 0.3), None, [(6, 32)] * 7 + [(5, 32)] * 3),
        (100, (8, 2), (0.5, 0.5), {8: 64, 2: 16}, [(8, 64)] + [(2, 16)] * 2 + [(2, 4)]),
        (256, (8, 4, 3), (0.6, 0.3, 0.1), {8: 128, 4: 128, 3: 32}, [(8, 128)] * 2),
        (200, (5, 4, 3), (0.2, 0.3, 0.5), {5: 64, 4: 32, 3: 128}, [(5, 64), (4, 32), (4, 32), (3, 72)]),
    ],
)
def test_exl2_group_plan(k, bits, proportions, group_sizes, expected):
    group_bits, group_rows = exl2_group_plan(k, bits, proportions, group_sizes)
    assert list(zip(group_bits, group_rows)) == expected
    assert sum(group_rows) == k


@pytest.mark.parametrize("label, kw, bounds", EXL2_CASES, ids=[c[0] for c in EXL2_CASES])
def test_exl2_layout(label, kw, bounds):
    k, n = 1024, 200  # N not a multiple of 32: packed tensors are padded to 224 columns
    importance = np.random.default_rng(11).random(k)
    w = gaussian(k, n, seed=11)
    t = quantize_exl2(w, importance=importance, bias=np.arange(n) / n, **kw)
    n_pad = 224
    group_bits, group_rows = exl2_group_plan(k, kw["bits"], kw["proportions"], kw.get("group_sizes"))
    groups = len(group_bits)

    assert t["q_weight"].dtype == np.int32 and t["q_weight"].shape[1] == n_pad
    assert t["q_invperm"].dtype == np.int32 and t["q_invperm"].shape == (k,)
    assert t["q_scale"].dtype == np.int32 and t["q_scale"].shape == (groups, n_pad // 8)
    assert t["q_scale_max"].dtype == np.float16 and t["q_scale_max"].shape == (groups,)
    assert t["q_groups"].dtype == np.int16 and t["q_groups"].shape == (2 * groups,)
    assert t["bias"].dtype == np.float16 and t["bias"].shape == (n,)
    layout = fexl2.check_exl2(t["q_weight"], t["q_invperm"], t["q_scale"], t["q_scale_max"], t["q_groups"])
    assert (layout.in_features, layout.out_features, len(layout.groups)) == (k, n_pad, groups)

    # q_groups: (width, first packed row) per group, widths descending, packed rows = rows * bits / 32.
    pairs = t["q_groups"].reshape(-1, 2).astype(np.int64)
    assert list(pairs[:, 0]) == group_bits
    assert np.all(np.diff(pairs[:, 0]) <= 0)
    qrows = [-(-r * b // 32) for b, r in zip(group_bits, group_rows)]
    assert list(pairs[:, 1]) == list(np.concatenate(([0], np.cumsum(qrows)[:-1])))
    assert t["q_weight"].shape[0] == sum(qrows)
    parsed = fexl2.parse_q_groups(t["q_groups"], t["q_weight"].shape[0], k)
    assert [(g.bits, g.rows) for g in parsed] == list(zip(group_bits, group_rows))
    # Group boundaries on multiples of 32 rows (16 inside the 2-bit tail).
    starts = np.cumsum([0] + group_rows[:-1])
    for b, s in zip(group_bits, starts):
        assert s % (16 if b == 2 else 32) == 0

    # Rows sorted by descending importance: the widest width goes to the most important rows.
    perm = fexl2.perm_from_invperm(t["q_invperm"], xp=np)
    assert np.array_equal(np.sort(t["q_invperm"]), np.arange(k))
    assert np.all(np.diff(importance[perm]) <= 0)

    # Dequantised: close to w, padded columns exactly zero; the widest rows are the most accurate.
    w_full = reference.dequantize_exl2(t["q_weight"], t["q_invperm"], t["q_scale"], t["q_scale_max"], t["q_groups"])
    assert w_full.shape == (k, n_pad)
    assert np.all(w_full[:, n:] == 0)
    low, high = bounds
    assert low * 0.8 <= relative_error(w, w_full[:, :n]) <= high * 1.1
    if len(set(group_bits)) > 1:
        first = perm[: group_rows[0]]
        last = perm[-group_rows[-1] :]
        assert relative_error(w[first], w_full[first, :n]) < relative_error(w[last], w_full[last, :n])


def test_exl2_scales_and_codes():
    """q_scale_max is the group's largest max-abs step 2 * max|w| / (2**b - 1) rounded up to float16,
    and each column's code gives the smallest round-to-nearest error of the 16 possible scales."""
    k, n, bits = 256, 64, 4
    rng = np.random.default_rng(12)
    w = gaussian(k, n, seed=12) * rng.uniform(0.05, 2.0, size=n).astype(np.float32)
    w[:, 7] *= 0  # an all-zero column
    t = quantize_exl2(w, bits=(bits,), proportions=(1.0,), importance=np.zeros(k))
    assert np.array_equal(t["q_invperm"], np.arange(k))  # constant importance keeps the row order
    blocks = w.reshape(k // 32, 32, n).astype(np.float64)
    step = 2 * np.abs(blocks).max(axis=(1, 2)) / (2**bits - 1)
    qsm = t["q_scale_max"].astype(np.float64)
    assert np.all(qsm >= step) and np.all(qsm <= step * (1 + 2.0**-10))

    scales = fexl2.decode_scales(t["q_scale"], t["q_scale_max"], xp=np).astype(np.float64)
    w_dq = dq_exl2(t, n).reshape(k // 32, 32, n).astype(np.float64)
    chosen_err = np.square(w_dq - blocks).sum(axis=1)  # [G, N]
    for code in range(16):
        s = (code + 1) ** 2 * qsm[:, None, None] / 256
        alt = np.clip(np.rint(blocks / s), -8, 7) * s
        alt_err = np.square(alt - blocks).sum(axis=1)
        assert np.all(chosen_err <= alt_err * (1 + 1e-6) + 1e-12), code
    assert np.all(w_dq[:, :, 7] == 0)
    assert len(np.unique(np.rint(np.sqrt(scales * 256 / qsm[:, None])))) > 4  # codes really vary


def test_exl2_padded_columns_hold_the_zero_level():
    w = gaussian(64, 40, seed=13)
    t = quantize_exl2(w, bits=(6,), proportions=(1.0,))
    groups = fexl2.parse_q_groups(t["q_groups"], t["q_weight"].shape[0], 64)
    q = fexl2.unpack_q_weight(t["q_weight"], groups, xp=np)
    assert q.shape == (64, 64)
    assert np.all(q[:, 40:] == 32)
    assert np.any(q[:, :40] != 32)


def test_exl2_random_importance_is_seeded_and_input_untouched():
    w = gaussian(256, 64, seed=14)
    before = w.copy()
    a = quantize_exl2(w, bits=(8, 4), proportions=(0.5, 0.5))
    b = quantize_exl2(w, bits=(8, 4), proportions=(0.5, 0.5))
    c = quantize_exl2(w, bits=(8, 4), proportions=(0.5, 0.5), seed=3)
    assert all(np.array_equal(a[key], b[key]) for key in a)
    assert not np.array_equal(a["q_invperm"], c["q_invperm"])
    assert np.array_equal(w, before)


def test_exl2_zero_rows_and_partial_last_group():
    k = 200  # last (3-bit) group has 200 - 128 = 72 rows
    w = gaussian(k, 32, seed=15)
    w[:, 5] = 0.0
    t = quantize_exl2(w, bits=(4, 3), proportions=(0.5, 0.5), group_sizes={4: 64, 3: 128}, importance=np.zeros(k))
    w_dq = dq_exl2(t, 32)
    assert np.all(w_dq[:, 5] == 0)
    assert relative_error(w, w_dq) < 0.25


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(bits=(4, 8), proportions=(0.5, 0.5)), ValueError, "descending"),
        (dict(bits=(4, 4), proportions=(0.5, 0.5)), ValueError, "descending"),
        (dict(bits=(7,), proportions=(1.0,)), ValueError, "bits"),
        (dict(bits=(8, 4), proportions=(0.5,)), ValueError, "proportions"),
        (dict(bits=(8, 4), proportions=(0.5, 0.6)), ValueError, "proportions"),
        (dict(bits=(8, 4), proportions=(1.0, 0.0)), ValueError, "proportions"),
        (dict(bits=(4,), group_sizes={4: 48}), ValueError, r"group_sizes\[4\]"),
        (dict(bits=(2,), group_sizes={2: 24}), ValueError, r"group_sizes\[2\]"),
        (dict(bits=(4,), group_sizes=[32]), TypeError, "group_sizes"),
        (dict(importance=np.ones(3)), ValueError, "importance"),
        (dict(importance=np.full(64, np.inf)), ValueError, "importance"),
        (dict(bias=np.ones((2, 32))), ValueError, "bias"),
    ],
)
def test_exl2_rejects_bad_input(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        quantize_exl2(gaussian(64, 32, seed=16), **kwargs)


def test_exl2_rejects_too_many_rows():
    with pytest.raises(ValueError, match="65535"):
        quantize_exl2(np.ones((65536, 1), np.float32))


# ---------------------------------------------------------------------------------------------- relative_error


def test_relative_error():
    w = gaussian(64, 32, seed=17)
    assert relative_error(w, w) == 0.0
    assert relative_error(w, 0.9 * w) == pytest.approx(0.1, rel=1e-6)
    noise = gaussian(64, 32, seed=18)
    expected = np.linalg.norm(noise.astype(np.float64)) / np.linalg.norm(w.astype(np.float64))
    assert relative_error(w, w + noise) == pytest.approx(expected, rel=1e-6)
    assert relative_error(np.zeros(3), np.zeros(3)) == 0.0
    assert relative_error(np.zeros(3), np.ones(3)) == float("inf")
    with pytest.raises(ValueError, match="w_dq"):
        relative_error(w, w[:, :5])


@pytest.mark.parametrize("scale", [1e-200, 1e200, 1e-170])
def test_relative_error_of_tiny_and_huge_values(scale):
    w = np.random.default_rng(19).standard_normal(40) * scale
    assert relative_error(w, np.zeros_like(w)) == 1.0
    approx = w * (1 + 0.01 * np.random.default_rng(20).standard_normal(40))
    rw, ra = w / scale, approx / scale  # the same numbers at an ordinary scale, exact powers aside
    expected = np.linalg.norm(rw - ra) / np.linalg.norm(rw)
    assert relative_error(w, approx) == pytest.approx(expected, rel=1e-9)


def test_relative_error_matches_the_float64_formula():
    w = gaussian(48, 16, seed=21)
    approx = gaussian(48, 16, seed=22).astype(np.float16)
    a, b = w.astype(np.float64), approx.astype(np.float64)
    assert relative_error(w, approx) == pytest.approx(np.linalg.norm(a - b) / np.linalg.norm(a), rel=1e-12)
    ints = np.random.default_rng(23).integers(-5, 5, size=30)
    assert relative_error(ints, ints + 1) == pytest.approx(np.sqrt(30) / np.linalg.norm(ints), rel=1e-12)


@pytest.mark.parametrize(
    "w, w_dq, name",
    [
        (np.array([1 + 1j, 2j]), np.array([1 + 0j, 0j]), "w"),
        (np.ones(2), np.array([1 + 0j, 0j]), "w_dq"),
        (None, None, "w"),
        (np.ones(2), None, "w_dq"),
        (np.array(["a", "b"], dtype=object), np.ones(2), "w"),
        (np.ones(2), np.array(["1", "2"]), "w_dq"),
    ],
)
def test_relative_error_refuses_non_real_input(w, w_dq, name):
    with pytest.raises(TypeError, match=rf"^{name}: expected a real"):
        relative_error(w, w_dq)


# ---------------------------------------------------------------------------------------------- float16 range


def _quantizers():
    return [
        ("gptq", lambda w: quantize_gptq(w, bits=4, group_size=128)),
        ("gptq-asym", lambda w: quantize_gptq(w, bits=4, group_size=128, sym=False)),
        ("exl2", lambda w: quantize_exl2(w, bits=(8, 4), proportions=(0.5, 0.5))),
        ("awq", lambda w: quantize_awq(w, group_size=128)),
    ]


@pytest.mark.parametrize("label, quantize", _quantizers(), ids=[q[0] for q in _quantizers()])
def test_tiny_weights_warn_that_their_scales_underflow(label, quantize):
    w = gaussian(256, 64, seed=30) * np.float32(1e-9)
    w[:, :8] = 0.0  # all-zero groups are exact and do not count
    with pytest.warns(RuntimeWarning, match=r"weight \[256, 64\]: \d+ of \d+ group scales .*below the float16 scale "
                      r"range \(smallest scale 2\*\*-24\).*quantize \(partly\) to zero.*rescale") as rec:
        quantize(w)
    assert len([r for r in rec if issubclass(r.category, RuntimeWarning)]) == 1


def test_tiny_weight_warning_counts_the_groups_that_underflow():
    w = gaussian(256, 64, seed=31)
    w[:128, :10] *= np.float32(1e-9)  # 10 (group, column) scales of the first group
    w[128:, 20:30] = 0.0  # all zero: scale 1.0, no warning for these
    with pytest.warns(RuntimeWarning, match=r"weight \[256, 64\]: 10 of 128 group scales"):
        g = quantize_gptq(w, bits=4, group_size=128)
    np.testing.assert_array_equal(g["scales"][1, 20:30], np.float16(1.0))
    np.testing.assert_array_equal(dq_gptq(g, 4)[128:, 20:30], 0.0)


@pytest.mark.parametrize("label, quantize", _quantizers(), ids=[q[0] for q in _quantizers()])
def test_ordinary_and_zero_groups_do_not_warn(label, quantize):
    w = gaussian(256, 64, seed=32)
    w[:, :8] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize(w)


@pytest.mark.parametrize("label, quantize", _quantizers(), ids=[q[0] for q in _quantizers()])
def test_weights_whose_dequantised_values_exceed_float16_are_refused(label, quantize):
    # scales stay below 65504, but scale * (q - zero) reaches a few times 65504
    w = gaussian(256, 64, seed=33) * np.float32(1e5)
    with pytest.raises(ValueError, match=r"weight: magnitudes too large for float16 \(largest dequantised value "
                       r"[0-9.e+]+ > 65504"):
        quantize(w)


def test_weights_just_inside_float16_dequantise_finitely():
    w = gaussian(256, 64, seed=34)
    w *= np.float32(60000.0) / np.abs(w).max()
    g = quantize_gptq(w, bits=4, group_size=128)
    assert np.isfinite(dq_gptq(g, 4).astype(np.float16)).all()
    assert relative_error(w, dq_gptq(g, 4)) < 0.15


@pytest.mark.parametrize("kind", ["numpy", "torch"])
@pytest.mark.parametrize("label, quantize", _quantizers(), ids=[q[0] for q in _quantizers()])
def test_float64_weights_beyond_float32_name_their_magnitude(label, quantize, kind):
    w = gaussian(256, 64, seed=35).astype(np.float64)
    w[3, 5] = -1e39
    if kind == "torch":
        w = pytest.importorskip("torch").from_numpy(w)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow warning from a cast
        with pytest.raises(ValueError, match=r"weight: magnitudes too large for float16 \(largest \|weight\| 1e\+39"):
            quantize(w)


# ---------------------------------------------------------------------------------------------- argument types


@pytest.mark.parametrize("in_features", [-5, 0, 64.0, "64", True, None])
def test_exl2_group_plan_rejects_bad_in_features(in_features):
    with pytest.raises(ValueError, match=r"in_features: expected a positive integer"):
        exl2_group_plan(in_features)


@pytest.mark.parametrize("name", ["sym", "act_order"])
@pytest.mark.parametrize("value", ["no", 0, 1, None, "False"])
def test_gptq_boolean_arguments_must_be_bools(name, value):
    with pytest.raises(TypeError, match=rf"^{name}: expected True or False"):
        quantize_gptq(gaussian(64, 32, seed=36), group_size=16, **{name: value})


def test_gptq_accepts_numpy_bools():
    w = gaussian(64, 32, seed=37)
    a = quantize_gptq(w, group_size=16, sym=np.bool_(False), act_order=np.bool_(True))
    b = quantize_gptq(w, group_size=16, sym=False, act_order=True)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.gpu
def test_gpu_dequantises_the_largest_accepted_weights_as_the_reference():
    import cupyq

    w = gaussian(256, 64, seed=38)
    w *= np.float32(60000.0) / np.abs(w).max()
    g = quantize_gptq(w, bits=4, group_size=128)
    qm = cupyq.QMatrix.from_gptq(g["qweight"], g["qzeros"], g["scales"], g["g_idx"], bits=4, device=0)
    w16 = qm.dequantize()
    w16 = w16.get() if hasattr(w16, "get") else np.asarray(w16)
    assert np.isfinite(w16).all()
    ref = dq_gptq(g, 4)
    np.testing.assert_allclose(w16.astype(np.float32), ref, rtol=2**-10, atol=0)
