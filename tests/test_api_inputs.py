"""QMatrix's front-end checks: copies of the caller's arrays, the one bias rule (builders and checkpoint loaders),
EXL2 layers narrower than their padded q_weight, dequantize's dtypes, gemm's out= and x dtypes on the CPU path,
the dispatch rules on CPU matrices, GPTQ group counts, and the exllamav2 drop-in's width arguments.

Layers are quantized fresh from random weights; numbers are compared with the float32 NumPy reference
(cupyq.reference). GPU tests (marked ``gpu``) check the same widths and dtypes on the kernels.
"""

from __future__ import annotations

import json
import warnings
from types import SimpleNamespace

import numpy as np
import pytest

import cupyq
from cupyq import reference, rules
from cupyq.checkpoint import CheckpointError, open_checkpoint, save_exl2
from cupyq.explain import layer_shape
from cupyq.formats import gptq as fgptq
from cupyq.quantize import quantize_awq, quantize_exl2, quantize_gptq

torch = pytest.importorskip("torch")

from cupyq import exllamav2 as ex  # noqa: E402

K, N = 128, 64


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "no GPU kernel ran"
        yield


@pytest.fixture(autouse=True)
def _exllamav2_state():
    saved = (list(ex.LAYERS), ex.FIXED_BYTES)
    yield
    ex.LAYERS[:] = saved[0]
    ex.FIXED_BYTES = saved[1]


def _gptq(seed, bias=None, group_size=32):
    rng = np.random.default_rng(seed)
    t = quantize_gptq(rng.standard_normal((K, N), dtype=np.float32), bits=4, group_size=group_size)
    return t, rng


def _from_gptq(t, bias=None, **kw):
    return cupyq.QMatrix.from_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bias, bits=4, **kw)


def _exl2(seed, k=64, n=40, bias=True):
    """An EXL2 layer of true width n (q_weight padded to a multiple of 32 columns) and its float32 weight."""
    rng = np.random.default_rng(seed)
    b = rng.standard_normal(n).astype(np.float32) if bias else None
    t = quantize_exl2(rng.standard_normal((k, n), dtype=np.float32), bits=(6, 4), proportions=(0.5, 0.5), bias=b,
                      seed=seed)
    w = reference.dequantize_exl2(t["q_weight"], t["q_invperm"], t["q_scale"], t["q_scale_max"], t["q_groups"])
    return t, w, rng


def _exl2_parts(t):
    return [t[k] for k in ("q_weight", "q_invperm", "q_scale", "q_scale_max", "q_groups")]


# ------------------------------------------------------------------------------------------------ copies
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_from_awq_keeps_no_view_of_the_callers_arrays(kind):
    rng = np.random.default_rng(3)
    a = quantize_awq(rng.standard_normal((K, N), dtype=np.float32), group_size=32)
    t = a if kind == "numpy" else {k: torch.from_numpy(v) for k, v in a.items()}
    qm = cupyq.QMatrix.from_awq(t["qweight"], t["qzeros"], t["scales"], group_size=32)
    x = rng.standard_normal((2, K), dtype=np.float32)
    y0 = cupyq.gemm(x, qm).copy()
    a["qweight"][:] = rng.integers(-2**31, 2**31 - 1, a["qweight"].shape, dtype=np.int64).astype(np.int32)
    a["qzeros"][:] ^= 0x11111111
    np.testing.assert_array_equal(cupyq.gemm(x, qm), y0)
    expected = reference.matmul(x, qm.reference_weight())
    np.testing.assert_allclose(y0, expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ bias
BAD_BIASES = {
    "2-D": (lambda rng: rng.standard_normal((2, N // 2)).astype(np.float16), ValueError, r"bias: expected shape \(64,\), got \(2, 32\)"),
    "column": (lambda rng: rng.standard_normal((N, 1)).astype(np.float32), ValueError, r"bias: expected shape \(64,\), got \(64, 1\)"),
    "short": (lambda rng: rng.standard_normal(N // 2).astype(np.float32), ValueError, r"bias: expected shape \(64,\), got \(32,\)"),
    "nan": (lambda rng: np.where(np.arange(N) == 5, np.nan, rng.standard_normal(N)).astype(np.float16), ValueError,
            r"bias: expected finite values, got 1 NaN/Inf, the first at index \(5,\)"),
    "inf": (lambda rng: np.full(N, np.inf, np.float32), ValueError, r"bias: expected finite values"),
    "beyond fp16": (lambda rng: np.where(np.arange(N) == 7, -1e6, rng.standard_normal(N)).astype(np.float32),
                    ValueError, r"bias: expected magnitudes of at most 65504 .* got -1e\+06 at index 7"),
    "complex": (lambda rng: (1 + 5j) * np.ones(N, np.complex64), TypeError, r"bias: expected dtype .*float32.*, got complex64"),
    "int": (lambda rng: np.arange(N), TypeError, r"bias: expected dtype float16, bfloat16, float32 or float64, got int64"),
    "bool": (lambda rng: np.ones(N, bool), TypeError, r"bias: expected dtype .*, got bool"),
    "torch int": (lambda rng: torch.arange(N, dtype=torch.int32), TypeError, r"bias: expected dtype .*, got int32"),
    "str": (lambda rng: "abc", TypeError, r"bias: expected a float array \[64\] .*got str 'abc'"),
    "list of ints": (lambda rng: list(range(N)), TypeError, r"bias: expected a float array \[64\] .*got list"),
    "object": (lambda rng: object(), TypeError, r"bias: expected a float array \[64\] .*got object"),
}


@pytest.mark.parametrize("case", list(BAD_BIASES))
@pytest.mark.parametrize("fmt", ["gptq", "awq", "exl2"])
def test_bad_bias_is_refused_by_every_builder(case, fmt):
    make, exc, match = BAD_BIASES[case]
    rng = np.random.default_rng(11)
    bias = make(rng)
    w = rng.standard_normal((K, N), dtype=np.float32)
    with pytest.raises(exc, match=match):
        if fmt == "gptq":
            g = quantize_gptq(w, bits=4, group_size=32)
            cupyq.QMatrix.from_gptq(g["qweight"], g["qzeros"], g["scales"], g["g_idx"], bias)
        elif fmt == "awq":
            a = quantize_awq(w, group_size=32)
            cupyq.QMatrix.from_awq(a["qweight"], a["qzeros"], a["scales"], bias, group_size=32)
        else:
            e = quantize_exl2(w)
            cupyq.QMatrix.from_exl2(*_exl2_parts(e), bias)


@pytest.mark.parametrize("form", ["float16", "float32", "float64", "torch bfloat16", "list of floats"])
def test_good_bias_forms_give_the_reference_product(form):
    t, rng = _gptq(12)
    b = (rng.standard_normal(N) * 100).astype(np.float32)
    b[3] = 65504.0 if form != "torch bfloat16" else 65280.0  # the float16 maximum is allowed (bf16 rounds it up)
    bias = {"float16": b.astype(np.float16), "float32": b, "float64": b.astype(np.float64),
            "torch bfloat16": torch.from_numpy(b).to(torch.bfloat16), "list of floats": [float(v) for v in b]}[form]
    qm = _from_gptq(t, bias)
    expected_bias = reference.to_numpy(bias).astype(np.float32) if form != "list of floats" else b
    assert qm.bias.dtype == np.float32
    np.testing.assert_array_equal(qm.bias, expected_bias)
    x = rng.standard_normal((3, K), dtype=np.float32)
    np.testing.assert_allclose(cupyq.gemm(x, qm), reference.matmul(x, qm.reference_weight(), expected_bias),
                               rtol=1e-5, atol=1e-3)


def _write_gptq_checkpoint(path, bias):
    from safetensors.numpy import save_file

    t, _ = _gptq(13, group_size=64)
    save_file({**{f"l.{k}": v for k, v in t.items()}, "l.bias": bias}, str(path / "model.safetensors"))
    (path / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 64, "desc_act": False}))
    return t


@pytest.mark.parametrize("value, match", [(1e6, r"bias: expected magnitudes of at most 65504 .* got 1e\+06 at index 0"),
                                          (np.nan, r"bias: expected finite values")])
def test_checkpoint_bias_is_checked_before_any_float16_cast(tmp_path, value, match):
    bias = np.random.default_rng(14).standard_normal(N).astype(np.float32)
    bias[0] = value
    _write_gptq_checkpoint(tmp_path, bias)
    before = (tmp_path / "model.safetensors").read_bytes()
    ckpt = open_checkpoint(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "overflow encountered in cast" on the way
        for load in (ckpt.load_layer, ckpt.qmatrix):
            with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'l\.bias': " + match):
                load("l")
    assert (tmp_path / "model.safetensors").read_bytes() == before


def test_checkpoint_float32_bias_within_range_loads(tmp_path):
    rng = np.random.default_rng(15)
    bias = (rng.standard_normal(N) * 1000).astype(np.float32)
    t = _write_gptq_checkpoint(tmp_path, bias)
    ckpt = open_checkpoint(tmp_path)
    got = ckpt.load_layer("l")["bias"]
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, bias.astype(np.float16))
    qm = ckpt.qmatrix("l")
    x = rng.standard_normal((2, K), dtype=np.float32)
    w = reference.dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits=4)
    np.testing.assert_allclose(cupyq.gemm(x, qm), reference.matmul(x, w, bias.astype(np.float16)), rtol=1e-5, atol=1e-2)


# ------------------------------------------------------------------------------------------------ EXL2 width
@pytest.mark.parametrize("n", [40, 33, 63])
def test_exl2_takes_the_bias_of_the_quantizers_output(n):
    t, w, rng = _exl2(20 + n, n=n)
    assert t["q_weight"].shape[1] == 64 and t["bias"].shape == (n,)
    qm = cupyq.QMatrix.from_exl2(*_exl2_parts(t), t["bias"])
    assert qm.out_features == n and qm.shape == (64, n)
    x = rng.standard_normal((3, 64), dtype=np.float32)
    y = cupyq.gemm(x, qm)
    assert y.shape == (3, n)
    np.testing.assert_allclose(y, reference.matmul(x, w[:, :n], t["bias"]), rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(qm.reference_weight(), w[:, :n])
    assert qm.dequantize().shape == (64, n)
    np.testing.assert_array_equal(qm.dequantize(), w[:, :n].astype(np.float16))


def test_exl2_out_features_keyword():
    t, w, rng = _exl2(21, n=40)
    x = rng.standard_normal((2, 64), dtype=np.float32)
    narrow = cupyq.QMatrix.from_exl2(*_exl2_parts(t), out_features=40)
    assert narrow.out_features == 40
    np.testing.assert_allclose(cupyq.gemm(x, narrow), reference.matmul(x, w[:, :40]), rtol=1e-5, atol=1e-4)
    assert cupyq.QMatrix.from_exl2(*_exl2_parts(t)).out_features == 64  # no bias, no keyword: the stored width
    padded_bias = np.concatenate([t["bias"], np.zeros(24, np.float16)])
    assert cupyq.QMatrix.from_exl2(*_exl2_parts(t), padded_bias).out_features == 64
    with pytest.raises(ValueError, match=r"bias: expected shape \(40,\), got \(64,\)"):
        cupyq.QMatrix.from_exl2(*_exl2_parts(t), padded_bias, out_features=40)
    for bad in (32, 65, 0, "40", True, 40.0):
        with pytest.raises(ValueError, match=r"out_features: expected 33\.\.64 \(q_weight's 64 columns"):
            cupyq.QMatrix.from_exl2(*_exl2_parts(t), out_features=bad)
    with pytest.raises(ValueError, match=r"bias: expected shape \(64,\), got \(20,\)"):  # beyond the padding
        cupyq.QMatrix.from_exl2(*_exl2_parts(t), t["bias"][:20])


def test_exl2_checkpoint_with_unpadded_bias_has_the_true_width(tmp_path):
    t, w, rng = _exl2(22, n=40)
    save_exl2(tmp_path, {"layer": t})
    ckpt = open_checkpoint(tmp_path)
    loaded = ckpt.load_layer("layer")  # the tensors at the stored width, the bias zero-padded
    np.testing.assert_array_equal(loaded["bias"], np.concatenate([t["bias"], np.zeros(24, np.float16)]))
    qm = ckpt.qmatrix("layer")
    direct = cupyq.QMatrix.from_exl2(*_exl2_parts(t), t["bias"])
    assert qm.out_features == direct.out_features == 40
    x = rng.standard_normal((2, 64), dtype=np.float32)
    np.testing.assert_array_equal(cupyq.gemm(x, qm), cupyq.gemm(x, direct))
    np.testing.assert_allclose(cupyq.gemm(x, qm), reference.matmul(x, w[:, :40], t["bias"]), rtol=1e-5, atol=1e-4)


def test_verify_passes_an_exl2_layer_of_a_width_below_its_padding(tmp_path, capsys):
    from cupyq import cli

    t, _, _ = _exl2(24, n=40)
    save_exl2(tmp_path, {"layer": t})
    code = cli.main(["verify", str(tmp_path), "--cpu", "--m", "2", "--json"])
    payload = json.loads(capsys.readouterr().out)
    assert code == 0 and payload["passed"]
    assert [0 < row["max_rel_error"] < 1e-3 for row in payload["layers"]] == [True]


class _Exl2Weight:
    """A TGI-style EXL2 weight object (q_scale_max already divided by 256)."""

    def __init__(self, t):
        self.q_weight, self.q_invperm, self.q_scale, self.q_groups = (
            torch.from_numpy(t[k]) for k in ("q_weight", "q_invperm", "q_scale", "q_groups"))
        self.q_scale_max = torch.from_numpy(t["q_scale_max"]) / 256


def test_exllamav2_quant_linear_exl2_forward_has_the_bias_width():
    t, w, rng = _exl2(23, n=40)
    layer = ex.QuantLinear(_Exl2Weight(t), torch.from_numpy(t["bias"]))
    assert (layer.outfeatures, layer.padding) == (64, 24) and "outfeatures=40" in layer.extra_repr()
    x = torch.from_numpy(rng.standard_normal((2, 64)).astype(np.float32)).to(torch.float16)
    y = layer(x)
    assert y.shape == (2, 40) and y.dtype == torch.float16
    expected = reference.matmul(x.numpy(), w[:, :40], t["bias"])
    np.testing.assert_allclose(y.float().numpy(), expected, rtol=2e-3, atol=2e-2)
    assert ex.QuantLinear(_Exl2Weight(t), None)(x).shape == (2, 64)  # no bias: the stored width


# ------------------------------------------------------------------------------------------------ dequantize
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_cpu_dequantize_dtypes(kind):
    t, _ = _gptq(30)
    tt = t if kind == "numpy" else {k: torch.from_numpy(v) for k, v in t.items()}
    qm = _from_gptq(tt)
    w = qm.reference_weight()
    for dt in ("float16", np.float16, np.dtype("float16"), torch.float16, "torch.float16"):
        got = qm.dequantize(dt)
        got = got.numpy() if kind == "torch" else got
        assert got.dtype == np.float16
        np.testing.assert_array_equal(got, w.astype(np.float16))
    for dt in ("bfloat16", torch.bfloat16):
        got = qm.dequantize(dt)
        if kind == "torch":
            assert got.dtype == torch.bfloat16
            np.testing.assert_array_equal(got.float().numpy(), torch.from_numpy(w).to(torch.bfloat16).float().numpy())
        else:  # NumPy has no bfloat16: the bit pattern, as the GPU class gives CuPy callers
            assert got.dtype == np.int16
            np.testing.assert_array_equal(got, cupyq.arrays.to_bf16_bits(w))
    for bad in ("float32", np.float32, torch.float32, "int8", "nonsense", None):
        with pytest.raises(ValueError, match=r"dtype: expected one of float16, bfloat16 .*got"):
            qm.dequantize(bad)


# ------------------------------------------------------------------------------------------------ gemm
def test_cpu_gemm_out_of_another_kind_is_a_type_error():
    t, rng = _gptq(40)
    qm = _from_gptq(t)
    x = rng.standard_normal((4, K), dtype=np.float32)
    cases = [
        (x, [[0.0] * N] * 4, r"out: expected an array of x's kind \(a NumPy array\), got list"),
        (x, object(), r"out: expected an array of x's kind \(a NumPy array\), got object"),
        (x, torch.empty(4, N), r"out: expected an array of x's kind \(a NumPy array\), got a torch tensor"),
        (torch.from_numpy(x), np.empty((4, N), np.float32),
         r"out: expected an array of x's kind \(a torch tensor\), got a NumPy array"),
    ]
    for xi, out, match in cases:
        with pytest.raises(TypeError, match=match):
            cupyq.gemm(xi, qm, out=out)
    out = np.full((4, N), np.nan, np.float32)
    assert cupyq.gemm(x, qm, out=out) is out
    np.testing.assert_allclose(out, reference.matmul(x, qm.reference_weight()), rtol=1e-5, atol=1e-4)


def test_cpu_gemm_x_dtypes_are_the_same_for_torch_and_numpy():
    t, rng = _gptq(41)
    qm = _from_gptq(t)
    x = rng.standard_normal((1, K), dtype=np.float32)
    for bad in (x.astype(np.longdouble), x.astype(np.int32), torch.from_numpy(x).to(torch.float8_e4m3fn),
                torch.from_numpy(x).to(torch.int64)):
        with pytest.raises(TypeError, match=r"x: expected a floating dtype \(float16, bfloat16, float32, float64\), got"):
            cupyq.gemm(bad, qm)
    w = qm.reference_weight()
    for dt in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        xt = torch.from_numpy(x).to(dt)
        y = cupyq.gemm(xt, qm)
        assert y.dtype == dt
        np.testing.assert_allclose(y.double().numpy(), reference.matmul(xt, w), rtol=1e-2, atol=5e-2)


# ------------------------------------------------------------------------------------------------ rules
def _gptq_checkpoint_and_matrix(tmp_path, act_order):
    from cupyq.checkpoint import save_gptq

    rng = np.random.default_rng(50 + act_order)
    t = quantize_gptq(rng.standard_normal((512, 96), dtype=np.float32), bits=4, group_size=64, act_order=act_order)
    save_gptq(tmp_path, {"layer": t}, bits=4, group_size=64, desc_act=act_order, sym=True)
    return open_checkpoint(tmp_path), cupyq.QMatrix.from_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"])


def _layer_like(shape):
    return SimpleNamespace(in_features=shape.in_features, out_features=shape.out_features, layout=shape)


@pytest.mark.parametrize("act_order", [False, True])
def test_explain_answers_for_a_cpu_matrix_as_for_its_checkpoint_layer(tmp_path, act_order):
    ckpt, qm = _gptq_checkpoint_and_matrix(tmp_path, act_order)
    want = layer_shape(ckpt, "layer")
    got = qm.layout_shape()
    for field in ("in_features", "out_features", "padded_rows", "padded_cols", "chunks8", "chunks4"):
        assert getattr(got, field) == getattr(want, field), field
    np.testing.assert_array_equal(got.tile_group, want.tile_group)
    for cc in ((8, 0), (9, 0)):
        for m in (1, 12, 16, 64, 200):
            for ctype in ("__half", "__nv_bfloat16"):
                assert rules.explain(qm, m, ctype, cc) == rules.explain(_layer_like(want), m, ctype, cc)


def test_explain_exl2_and_awq_cpu_matrices(tmp_path):
    t, _, _ = _exl2(51, k=256, n=40)
    save_exl2(tmp_path, {"layer": t})
    qm = cupyq.QMatrix.from_exl2(*_exl2_parts(t), t["bias"])
    want = layer_shape(open_checkpoint(tmp_path), "layer")
    got = qm.layout_shape()
    assert (got.chunks8, got.chunks4, got.padded_rows) == (want.chunks8, want.chunks4, want.padded_rows)
    assert (got.out_features, got.padded_cols) == (40, 48)  # the true width
    for m in (1, 16, 100):
        assert rules.explain(qm, m, "__half", (9, 0)) == rules.explain(_layer_like(got), m, "__half", (9, 0))
    a = quantize_awq(np.random.default_rng(52).standard_normal((K, N), dtype=np.float32), group_size=32)
    qa = cupyq.QMatrix.from_awq(a["qweight"], a["qzeros"], a["scales"], group_size=32)
    assert rules.explain(qa, 1, "__half", (8, 0))[0] == "qgemv"
    assert rules.explain(qa, 12, "__half", (8, 0))[0] == "qgemv2"


def test_choose_kernel_refuses_a_cpu_matrix():
    t, _ = _gptq(53)
    qm = _from_gptq(t)
    for call in (lambda: rules.choose_kernel(qm, 1, "__half"), lambda: rules.choose_kernel(qm, 16, "__half"),
                 lambda: rules.wgmma_supported(qm), lambda: rules.dense_threshold(qm)):
        with pytest.raises(ValueError, match=r"qm: the matrix lives on the CPU and runs the float32 reference, no "
                                             r"kernel; rules\.explain"):
            call()


# ------------------------------------------------------------------------------------------------ GPTQ groups
def test_check_gptq_names_the_tensor_with_the_wrong_group_count():
    t, _ = _gptq(60)  # 4 groups
    q, z, s, g = t["qweight"], t["qzeros"], t["scales"], t["g_idx"]
    with pytest.raises(ValueError, match=r"qzeros: expected shape \(4, 8\), got \(3, 8\): g_idx .* gives 4 groups"):
        fgptq.check_gptq(q, z[:-1], s, g, 4)
    with pytest.raises(ValueError, match=r"scales: expected shape \(4, 64\), got \(3, 64\): g_idx .* gives 4 groups"):
        fgptq.check_gptq(q, z, s[:-1], g, 4)
    with pytest.raises(ValueError, match=r"qzeros: expected shape \(4, 8\), got \(5, 8\): group_size 32 over 128"):
        cupyq.QMatrix.from_gptq(q, np.concatenate([z, z[:1]]), s, None, group_size=32)
    with pytest.raises(ValueError, match=r"qzeros: 3 rows \(groups\), but scales has 4; the two must agree"):
        fgptq.check_gptq(q, z[:-1], s, None, 4)
    with pytest.raises(ValueError, match=r"qzeros: expected shape \(4, 8\), got \(3, 8\)"):
        cupyq.QMatrix.from_gptq(q, z[:-1], s, g)


# ------------------------------------------------------------------------------------------------ exllamav2 ext
def test_ext_gemm_q4_width_must_be_an_integer():
    t, rng = _gptq(70)
    qm = ex.ext_make_q_matrix({k: torch.from_numpy(v) for k, v in t.items()})
    x = torch.from_numpy(rng.standard_normal((1, K)).astype(np.float32)).to(torch.float16)
    for bad in ("x", "64", 64.0, None, True):
        with pytest.raises(TypeError, match=r"q4_width: expected an integer \(the output width, at least "
                                            r"out_features=64\), got"):
            ex.ext_gemm_half_q_half(x, qm, bad)
    y = ex.ext_gemm_half_q_half(x, qm, np.int64(64))
    np.testing.assert_allclose(y.float().numpy(), reference.matmul(x, qm.reference_weight()), rtol=2e-3, atol=2e-2)


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 12, 40, 200])
def test_gpu_exl2_true_width_matches_the_reference(m):
    import cupy

    t, w, rng = _exl2(80 + m, k=256, n=40)
    qm = cupyq.QMatrix.from_exl2(*_exl2_parts(t), t["bias"], device=0)
    assert qm.out_features == 40 and qm.layout.out_features == 40
    x = rng.standard_normal((m, 256)).astype(np.float16)
    y = cupy.asnumpy(cupyq.gemm(cupy.asarray(x), qm)).astype(np.float32)
    assert y.shape == (m, 40)
    ref = reference.matmul(x, w[:, :40], t["bias"])
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 2e-3
    d = cupy.asnumpy(qm.dequantize("float16")).astype(np.float32)
    assert d.shape == (256, 40)
    np.testing.assert_allclose(d, w[:, :40], rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_gpu_dequantize_refuses_other_dtypes_and_bias_beyond_fp16():
    t, rng = _gptq(90)
    qm = _from_gptq({k: torch.from_numpy(v).cuda() for k, v in t.items()})
    assert qm.is_cuda and qm.dequantize(torch.bfloat16).dtype == torch.bfloat16
    for bad in ("float32", "int8", "nonsense"):
        with pytest.raises(ValueError, match=r"dtype: expected one of float16, bfloat16"):
            qm.dequantize(bad)
        with pytest.raises(ValueError, match=r"dtype: expected one of float16, bfloat16"):
            qm.dequantize_cupy(bad)
    bias = np.full(N, 1e6, np.float32)
    with pytest.raises(ValueError, match=r"bias: expected magnitudes of at most 65504"):
        _from_gptq(t, bias, device=0)
