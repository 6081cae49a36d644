"""Golden vectors from the upstream exllamav2 runtime (see tests/data/README.md).

Three checks per case:
- the formats round-trip the stored tensors bit for bit;
- the fp16 evaluation of the dequant formula reproduces upstream's dequantised rows bit for bit, and the
  float32 reference is within the fp16 rounding bound of them;
- upstream's outputs ``c`` agree with ``a @ W (+ bias)`` computed in float32 from the reference.
"""

from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

from cupyq.formats import (
    check_exl2,
    check_gptq,
    make_group_map,
    pack_q_weight,
    pack_qweight,
    pack_qzeros,
    unpack_q_weight,
    unpack_qweight,
    unpack_qzeros,
)
from cupyq.formats.bitstream import unpack_bitstream_columns
from cupyq.reference import dequantize_exl2, dequantize_gptq, matmul

DATA = Path(__file__).parent / "data"
GPTQ_CASES = ("g128", "g128_act", "g32_bias", "gfull")
EXL2_CASES = ("b4_g32", "b8_4", "b6_5_bias", "b3_2")
M_VALUES = (1, 17, 51)
# Upstream accumulates in fp16; its own distance to the float32 result is about 1e-3 relative (1.7e-3 for
# b8_4, whose subnormal fp16 scales add error). 3e-3 leaves room for that and nothing more.
OUTPUT_RTOL = 3e-3
U16 = 2.0**-11  # unit roundoff of fp16 (round to nearest)
SUB16 = 2.0**-25  # half the spacing of fp16 subnormals: the absolute rounding error near zero


@lru_cache(maxsize=None)
def load_case(kind, case):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    tensors = safetensors_numpy.load_file(str(DATA / f"golden_{kind}.safetensors"))
    prefix = case + "."
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def gptq_tensors(t):
    return dict(qweight=t["qweight"], qzeros=t["qzeros"], scales=t["scales"], g_idx=t["g_idx"])


def exl2_tensors(t):
    return {k: t[k] for k in ("q_weight", "q_invperm", "q_scale", "q_scale_max", "q_groups")}


def output_distance(t, w):
    """Largest ||c - (a @ W + bias)|| / ||a @ W + bias|| over the stored inputs."""
    worst = 0.0
    for m in M_VALUES:
        expected = matmul(t[f"a_m{m}"], w, t.get("bias"))
        got = t[f"c_m{m}"].astype(np.float32)
        assert got.shape == expected.shape == (m, w.shape[1])
        worst = max(worst, float(np.linalg.norm(got - expected) / np.linalg.norm(expected)))
    return worst


# ---------------------------------------------------------------- GPTQ


@pytest.mark.parametrize("case", GPTQ_CASES)
def test_gptq_formats_round_trip(case):
    t = load_case("gptq", case)
    layout = check_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4)
    q = unpack_qweight(t["qweight"], 4)
    zeros = unpack_qzeros(t["qzeros"], 4, layout.out_features)
    np.testing.assert_array_equal(pack_qweight(q, 4), t["qweight"])
    np.testing.assert_array_equal(pack_qzeros(zeros, 4), t["qzeros"])


@pytest.mark.parametrize("case", GPTQ_CASES)
def test_gptq_fp16_formula_reproduces_upstream_rows(case):
    t = load_case("gptq", case)
    rows = t["w_dq_row_index"]
    q = unpack_qweight(t["qweight"], 4)[rows].astype(np.float16)
    g = t["g_idx"][rows]
    zeros = unpack_qzeros(t["qzeros"], 4, t["qweight"].shape[1])[g].astype(np.float16)
    # (q - z) is exact in fp16; upstream rounds once, when multiplying by the fp16 scale
    np.testing.assert_array_equal((q - zeros) * t["scales"][g], t["w_dq_rows"])


@pytest.mark.parametrize("case", GPTQ_CASES)
def test_gptq_reference_matches_upstream(case):
    t = load_case("gptq", case)
    w = dequantize_gptq(**gptq_tensors(t), bits=4, checkpoint_format="gptq")
    part = w[t["w_dq_row_index"]]
    diff = np.abs(part - t["w_dq_rows"].astype(np.float32))
    # the float32 value (q - z) * s is exact; upstream's fp16 value is its rounding: one half-ulp at most
    assert np.all(diff <= U16 * np.abs(part) + SUB16)
    assert diff.max() <= 1e-3
    assert output_distance(t, w) <= OUTPUT_RTOL
    # group_size -1 and trivial g_idx can also be read without g_idx (128 given: 128..146 all give 8 groups)
    if case in ("g128", "gfull"):
        size = {"g128": 128, "gfull": None}[case]
        np.testing.assert_array_equal(dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], group_size=size), w)


# ---------------------------------------------------------------- EXL2


def exl2_integers(t):
    """(layout, D = q - 2**(b-1) in sorted order, P = (code + 1)**2, group of each sorted row)."""
    layout = check_exl2(**exl2_tensors(t))
    q = unpack_q_weight(t["q_weight"], layout.groups).astype(np.int32)
    rows = [g.rows for g in layout.groups]
    zero = np.repeat([1 << (g.bits - 1) for g in layout.groups], rows)
    codes = unpack_bitstream_columns(t["q_scale"], 4, t["q_weight"].shape[1]).astype(np.int32)
    return layout, q - zero[:, None], (codes + 1) ** 2, np.repeat(np.arange(len(rows)), rows)


@pytest.mark.parametrize("case", EXL2_CASES)
def test_exl2_formats_round_trip(case):
    t = load_case("exl2", case)
    layout = check_exl2(**exl2_tensors(t))
    assert layout.in_features == 1024 and layout.out_features == 512
    widths = [g.bits for g in layout.groups]
    assert widths == sorted(widths, reverse=True)
    q = unpack_q_weight(t["q_weight"], layout.groups)
    q_weight, q_groups = pack_q_weight(q, widths, [g.rows for g in layout.groups])
    np.testing.assert_array_equal(q_weight, t["q_weight"])
    np.testing.assert_array_equal(q_groups, t["q_groups"])
    group_map = make_group_map(t["q_groups"], t["q_weight"].shape[0])
    assert group_map.shape == (2 * 1024,)
    assert group_map[0] == 0 and group_map[-2] == len(widths) - 1 and group_map[-1] == 1


@pytest.mark.parametrize("case", EXL2_CASES)
def test_exl2_fp16_formula_reproduces_upstream_rows(case):
    t = load_case("exl2", case)
    _, d, p, group = exl2_integers(t)
    scale_max16 = (t["q_scale_max"] / np.float16(256)).astype(np.float16)
    scales16 = p.astype(np.float16) * scale_max16[:, None]  # fp16 product, as upstream's dq_scale
    sorted_rows = t["q_invperm"][t["w_dq_row_index"]]
    w16 = d[sorted_rows].astype(np.float16) * scales16[group[sorted_rows]]
    np.testing.assert_array_equal(w16, t["w_dq_rows"])


@pytest.mark.parametrize("case", EXL2_CASES)
def test_exl2_reference_matches_upstream(case):
    t = load_case("exl2", case)
    w = dequantize_exl2(**exl2_tensors(t))
    _, d, p, group = exl2_integers(t)
    np.testing.assert_allclose(
        w, (d.astype(np.float32) * p[group] * t["q_scale_max"].astype(np.float32)[group, None] / 256)[t["q_invperm"]],
        rtol=2e-7,
    )
    sorted_rows = t["q_invperm"][t["w_dq_row_index"]]
    part = w[t["w_dq_row_index"]]
    diff = np.abs(part - t["w_dq_rows"].astype(np.float32))
    # Upstream rounds three times in fp16: q_scale_max/256, then P * that, then D * scale. Each rounding
    # errs by at most U16 relative or SUB16 absolute (subnormal results: small q_scale_max makes
    # q_scale_max/256 subnormal), and the absolute errors are multiplied by P and D downstream.
    d_abs, p_rows = np.abs(d[sorted_rows]), p[group[sorted_rows]]
    bound = 3.01 * U16 * np.abs(part) + (d_abs * (p_rows + 1) + 1) * SUB16
    assert np.all(diff <= bound)
    assert diff.max() <= 1e-3
    assert output_distance(t, w) <= OUTPUT_RTOL
