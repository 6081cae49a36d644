"""AWQ (AutoAWQ GEMM packing): reference dequantisation, quantize_awq, QMatrix.from_awq, checkpoints, CLI.

Every check is against a dequantiser written here from the layout description (the way AutoAWQ's own
``dequantize_gemm`` reads it): unpack each int32 column with shifts 0, 4, ..., 28, put the eight nibbles
back in output order with the reverse order 0, 4, 1, 5, 2, 6, 3, 7, then ``W = (q - z) * s`` with groups
of consecutive rows. Test tensors are packed here too, from the same description.
"""

import json

import numpy as np
import pytest

import cupyq
from cupyq import cli, reference
from cupyq.checkpoint import CheckpointError, open_checkpoint, read_quant_config, save_awq
from cupyq.quantize import quantize_awq, relative_error

PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i of word c holds output 8c + PACK_ORDER[i]
REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]  # output 8c + j is in nibble REVERSE_ORDER[j]


# ------------------------------------------------------------------------------------------------ test-side format


def pack_columns(values):
    """int32 [R, N/8] from 4-bit values [R, N]: nibble i of word c holds column 8c + PACK_ORDER[i]."""
    v = np.asarray(values, dtype=np.uint32)
    r, n = v.shape
    words = np.zeros((r, n // 8), dtype=np.uint32)
    for i, col in enumerate(PACK_ORDER):
        words |= v[:, col::8] << np.uint32(4 * i)
    return words.view(np.int32)


def unpack_columns(words):
    """[R, 8C] values from int32 [R, C], by shifts 0..28 then the reverse order."""
    u = np.asarray(words).view(np.uint32)
    nibbles = np.stack([(u >> np.uint32(s)) & 0xF for s in range(0, 32, 4)], axis=-1)  # [R, C, 8] nibble order
    return nibbles[:, :, REVERSE_ORDER].reshape(u.shape[0], -1).astype(np.int64)


def dequant_awq(qweight, qzeros, scales, group_size):
    q = unpack_columns(qweight)
    z = unpack_columns(qzeros)
    gs = q.shape[0] if group_size == -1 else group_size
    g = np.arange(q.shape[0]) // gs
    return ((q - z[g]) * np.asarray(scales, np.float32)[g]).astype(np.float32)


def random_awq(rng, k, n, group_size, *, bias=False):
    """Random AWQ tensors (fresh q, z, s) with the zero-point edge cases 0 and 15 present."""
    gs = k if group_size == -1 else group_size
    groups = k // gs
    q = rng.integers(0, 16, size=(k, n))
    z = rng.integers(0, 16, size=(groups, n))
    z[0, : min(n, 8)] = [0, 15, 0, 15, 0, 15, 0, 15][: min(n, 8)]
    t = dict(
        qweight=pack_columns(q),
        qzeros=pack_columns(z),
        scales=(rng.uniform(0.5, 1.5, size=(groups, n)) * 0.004).astype(np.float16),
    )
    if bias:
        t["bias"] = (rng.standard_normal(n) * 0.1).astype(np.float16)
    return t


def test_test_side_format_round_trips():
    rng = np.random.default_rng(0)
    q = rng.integers(0, 16, size=(5, 24))
    assert np.array_equal(unpack_columns(pack_columns(q)), q)
    # one word by hand: outputs 0..7 hold 1..8 -> nibbles 1, 3, 5, 7, 2, 4, 6, 8
    assert int(pack_columns(np.arange(1, 9).reshape(1, 8)).view(np.uint32)[0, 0]) == 0x86427531


# ------------------------------------------------------------------------------------------------ reference


@pytest.mark.parametrize("k, n, gs", [(128, 64, 32), (256, 40, 64), (256, 128, 128), (96, 8, -1)])
def test_reference_matches_independent_dequantiser(k, n, gs):
    rng = np.random.default_rng(k + n + gs)
    t = random_awq(rng, k, n, gs)
    before = {name: a.copy() for name, a in t.items()}
    w = reference.dequantize_awq(t["qweight"], t["qzeros"], t["scales"], group_size=gs)
    assert w.dtype == np.float32 and w.shape == (k, n)
    # (q - z) is an exact small integer and s an fp16 value: the product is exact in float32 on both sides
    assert np.array_equal(w, dequant_awq(t["qweight"], t["qzeros"], t["scales"], gs))
    for name, a in t.items():
        assert np.array_equal(a, before[name]), name


def test_reference_zero_point_zero_is_not_wrapped():
    # A stored zero of 0 means W = q * s (GPTQ v1 would read it as 1); a stored 15 means W = (q - 15) * s.
    q = np.full((32, 8), 7)
    z = np.array([[0, 15, 0, 15, 0, 15, 0, 15]])
    s = np.full((1, 8), 0.5, np.float16)
    w = reference.dequantize_awq(pack_columns(q), pack_columns(z), s, group_size=32)
    assert np.array_equal(w[0], np.array([3.5, -4.0] * 4, np.float32))


def test_reference_accepts_torch_and_bf16_scales():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    t = random_awq(rng, 64, 16, 32)
    s_bf16 = torch.from_numpy(t["scales"].astype(np.float32)).to(torch.bfloat16)
    w = reference.dequantize_awq(torch.from_numpy(t["qweight"]), torch.from_numpy(t["qzeros"]), s_bf16, group_size=32)
    assert np.array_equal(w, dequant_awq(t["qweight"], t["qzeros"], s_bf16.float().numpy(), 32))


@pytest.mark.parametrize(
    "change, exc, fragment",
    [
        (dict(qweight=np.zeros((128, 8), np.uint8)), TypeError, "qweight"),
        (dict(qzeros=np.zeros((3, 8), np.int32)), ValueError, "qzeros"),
        (dict(scales=np.zeros((4, 63), np.float16)), ValueError, "scales"),
        (dict(group_size=40), ValueError, "group_size"),
    ],
)
def test_reference_validation(change, exc, fragment):
    t = random_awq(np.random.default_rng(1), 128, 64, 32)
    gs = change.pop("group_size", 32)
    t.update(change)
    with pytest.raises(exc, match=fragment):
        reference.dequantize_awq(t["qweight"], t["qzeros"], t["scales"], group_size=gs)


# ------------------------------------------------------------------------------------------------ quantize_awq


@pytest.mark.parametrize("gs", [32, 64, 128, -1])
def test_quantize_awq_round_to_nearest(gs):
    rng = np.random.default_rng(gs + 7)
    k, n = 256, 48
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.05
    w_before = w.copy()
    t = quantize_awq(w, group_size=gs, bias=rng.standard_normal(n))
    groups = 1 if gs == -1 else k // gs
    assert t["qweight"].dtype == np.int32 and t["qweight"].shape == (k, n // 8)
    assert t["qzeros"].dtype == np.int32 and t["qzeros"].shape == (groups, n // 8)
    assert t["scales"].dtype == np.float16 and t["scales"].shape == (groups, n)
    assert t["bias"].dtype == np.float16 and t["bias"].shape == (n,)
    assert np.array_equal(w, w_before)
    dq = dequant_awq(t["qweight"], t["qzeros"], t["scales"], gs)
    rows = k if gs == -1 else gs
    step = np.repeat(t["scales"].astype(np.float32), rows, axis=0)
    # Nearest level of a grid covering [min, max] of the group, whose zero point is itself rounded to an
    # integer: the grid may be shifted by up to half a step, so a weight at the end is off by at most one step.
    assert np.all(np.abs(dq - w) <= step * (1 + 1e-3))
    z = unpack_columns(t["qzeros"])
    assert z.min() >= 0 and z.max() <= 15
    assert relative_error(w, dq) < (0.1 if gs != -1 else 0.15)


@pytest.mark.parametrize(
    "shape, kwargs, fragment",
    [
        ((128, 12), {}, "out_features 12 must be a multiple of 8"),
        ((100, 16), dict(group_size=32), "group_size.*divide.*100"),
        ((128, 16), dict(group_size=0), "group_size"),
    ],
)
def test_quantize_awq_rejects(shape, kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        quantize_awq(np.ones(shape, np.float32), **kwargs)


# ------------------------------------------------------------------------------------------------ QMatrix (CPU)


def test_qmatrix_from_awq_cpu():
    rng = np.random.default_rng(11)
    t = random_awq(rng, 256, 64, 64, bias=True)
    before = {name: a.copy() for name, a in t.items()}
    qm = cupyq.QMatrix.from_awq(t["qweight"], t["qzeros"], t["scales"], t["bias"], group_size=64)
    assert (qm.format, qm.in_features, qm.out_features, qm.shape) == ("awq", 256, 64, (256, 64))
    assert (qm.bits, qm.group_size, qm.act_order, qm.checkpoint_format) == ((4,), 64, False, None)
    assert qm.bits_per_weight == 4.0 and not qm.is_cuda and "awq" in repr(qm)
    w = dequant_awq(t["qweight"], t["qzeros"], t["scales"], 64)
    assert np.array_equal(qm.reference_weight(), w)
    assert np.array_equal(qm.dequantize(), w.astype(np.float16))
    assert np.array_equal(qm.bias, t["bias"].astype(np.float32))
    x = rng.standard_normal((7, 256)).astype(np.float32)
    y = cupyq.gemm(x, qm)  # the reference path (it warns once per process that no GPU kernel ran)
    ref = x.astype(np.float64) @ w.astype(np.float64) + t["bias"].astype(np.float64)
    assert np.allclose(y, ref, rtol=1e-5, atol=1e-5)
    for name, a in t.items():
        assert np.array_equal(a, before[name]), name


def test_qmatrix_from_awq_torch_cpu():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(12)
    t = random_awq(rng, 128, 32, -1)
    tt = {k: torch.from_numpy(v) for k, v in t.items()}
    qm = cupyq.QMatrix.from_awq(tt["qweight"], tt["qzeros"], tt["scales"], group_size=-1)
    assert qm.group_size == -1 and qm.device_id is None
    w = qm.dequantize()
    assert isinstance(w, torch.Tensor)
    assert np.array_equal(w.numpy(), dequant_awq(t["qweight"], t["qzeros"], t["scales"], -1).astype(np.float16))


def test_qmatrix_from_awq_validation():
    t = random_awq(np.random.default_rng(13), 128, 64, 32)
    with pytest.raises(ValueError, match="group_size"):
        cupyq.QMatrix.from_awq(t["qweight"], t["qzeros"], t["scales"], group_size=48)
    with pytest.raises(ValueError, match="qzeros"):
        cupyq.QMatrix.from_awq(t["qweight"], t["qzeros"], t["scales"], group_size=64)
    with pytest.raises(TypeError, match="qweight"):
        cupyq.QMatrix.from_awq(t["qweight"].astype(np.int64), t["qzeros"], t["scales"], group_size=32)
    with pytest.raises(ValueError, match="bias"):
        cupyq.QMatrix.from_awq(t["qweight"], t["qzeros"], t["scales"], np.zeros(63, np.float16), group_size=32)
    with pytest.raises(TypeError):
        cupyq.QMatrix.from_awq(t["qweight"], t["qzeros"], t["scales"])  # group_size is required


# ------------------------------------------------------------------------------------------------ QMatrix (GPU)

REL_TOL = 4e-3  # fp16 weights and outputs (2**-11 relative each), fp32 accumulation: ~1e-3 in the norm


def _check_gpu_gemm(qm, w, bias, m, rng, dtype="float16"):
    import torch

    x = torch.from_numpy(rng.standard_normal((m, w.shape[0])).astype(np.float32)).cuda()
    x = x.to(torch.bfloat16 if dtype == "bfloat16" else torch.float16)
    out = torch.full((m, w.shape[1]), float("nan"), dtype=x.dtype, device="cuda")  # poison
    y = cupyq.gemm(x, qm, out=out)
    assert y.data_ptr() == out.data_ptr()
    ref = x.float().cpu().numpy().astype(np.float64) @ w.astype(np.float64)
    if bias is not None:
        ref += bias.astype(np.float64)
    got = y.float().cpu().numpy().astype(np.float64)
    assert np.isfinite(got).all(), "unwritten output (NaN poison) or overflow"
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


@pytest.mark.gpu
@pytest.mark.parametrize("gs", [32, 64, 128])
@pytest.mark.parametrize("m", [1, 7, 16, 33, 64, 300])
def test_gpu_gemm_matches_reference(gs, m):
    pytest.importorskip("torch")
    rng = np.random.default_rng(1000 * gs + m)
    k, n = 768, 264  # n a multiple of 8 but not of 16: the padded column tile is exercised
    t = random_awq(rng, k, n, gs, bias=True)
    before = {name: a.copy() for name, a in t.items()}
    qm = cupyq.QMatrix.from_awq(t["qweight"], t["qzeros"], t["scales"], t["bias"], group_size=gs, device=0)
    assert qm.is_cuda and qm.format == "awq"
    w = dequant_awq(t["qweight"], t["qzeros"], t["scales"], gs)
    err = _check_gpu_gemm(qm, w, t["bias"].astype(np.float32), m, rng)
    assert err < REL_TOL, err
    for name, a in t.items():
        assert np.array_equal(a, before[name]), name


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 33])
def test_gpu_torch_inputs_bf16_and_dequantize(m):
    import torch

    rng = np.random.default_rng(77 + m)
    t = random_awq(rng, 512, 128, 128)
    tt = {k: torch.from_numpy(v).cuda() for k, v in t.items()}
    qm = cupyq.QMatrix.from_awq(tt["qweight"], tt["qzeros"], tt["scales"], group_size=128)
    assert qm.device_id == 0
    w = dequant_awq(t["qweight"], t["qzeros"], t["scales"], 128)
    # bf16 weights and outputs round to 2**-9 relative: the bound of the GPTQ bf16 tests
    assert _check_gpu_gemm(qm, w, None, m, rng, dtype="bfloat16") < 1.5e-2
    w16 = qm.dequantize()
    assert isinstance(w16, torch.Tensor) and w16.dtype == torch.float16 and w16.shape == w.shape
    # fp16 scales are exact; (q - z) * s is rounded to fp16 (relative 2**-11), allow one more rounding
    np.testing.assert_allclose(w16.cpu().numpy().astype(np.float32), w, rtol=2**-10, atol=2**-24)


@pytest.mark.gpu
def test_gpu_layout_is_the_gptq_layout():
    """An AWQ matrix and the GPTQ matrix of the same integers (v2 zeros, no act-order) have identical device
    layouts, so they run the same kernels at the same speed."""
    from cupyq.formats import gptq as G

    rng = np.random.default_rng(21)
    k, n, gs = 512, 256, 128
    q = rng.integers(0, 16, (k, n))
    z = rng.integers(0, 16, (k // gs, n))
    s = (rng.uniform(0.5, 1.5, (k // gs, n)) * 0.004).astype(np.float16)
    awq = cupyq.QMatrix.from_awq(pack_columns(q), pack_columns(z), s, group_size=gs, device=0)
    gptq = cupyq.QMatrix.from_gptq(G.pack_qweight(q, 4), G.pack_qzeros(z, 4, checkpoint_format="gptq_v2"), s,
                                   bits=4, group_size=gs, checkpoint_format="gptq_v2", device=0)
    a, b = awq.layout, gptq.layout
    for field in ("in_features", "out_features", "padded_rows", "padded_cols", "chunks8", "chunks4"):
        assert getattr(a, field) == getattr(b, field), field
    for field in ("w4", "tile_group", "zs"):
        assert np.array_equal(getattr(a, field).get(), getattr(b, field).get()), field
    assert (a.row_src is None) == (b.row_src is None)


# ------------------------------------------------------------------------------------------------ checkpoints


def _write_safetensors(path, tensors):
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def _awq_dir(tmp_path, *, style="hf", version="gemm", keep=None, extra_config=None, group_size=64):
    """A hand-written AWQ directory: two quantized layers, an fp16 lm_head; config in ``style``."""
    rng = np.random.default_rng(31)
    layers = {
        "model.layers.0.self_attn.q_proj": random_awq(rng, 128, 128, group_size, bias=True),
        "model.layers.0.mlp.down_proj": random_awq(rng, 256, 128, group_size),
    }
    tensors = {f"{name}.{part}": a for name, t in layers.items() for part, a in t.items()}
    tensors["lm_head.weight"] = rng.standard_normal((64, 128)).astype(np.float16)
    _write_safetensors(tmp_path / "model.safetensors", tensors)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128}
    if style == "hf":
        config["quantization_config"] = {
            "quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": version,
            "modules_to_not_convert": keep, "backend": "autoawq", "do_fuse": False, **(extra_config or {}),
        }
    else:
        (tmp_path / "quant_config.json").write_text(json.dumps(
            {"zero_point": True, "q_group_size": group_size, "w_bit": 4, "version": version.upper(),
             **(extra_config or {})}))
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path, layers


@pytest.mark.parametrize("style", ["hf", "autoawq"])
def test_open_hand_written_directory(tmp_path, style):
    path, layers = _awq_dir(tmp_path, style=style)
    ckpt = open_checkpoint(path)
    qc = ckpt.quant_config
    assert (qc.quant_method, qc.bits, qc.group_size, qc.sym, qc.version) == ("awq", 4, 64, False, "gemm")
    assert qc.source.name == ("config.json" if style == "hf" else "quant_config.json")
    assert sorted(ckpt.quantized_layers) == sorted(layers)
    assert ckpt.layers["lm_head"].format == "fp16"
    for name, t in layers.items():
        info = ckpt.layer_info(name)
        k = t["qweight"].shape[0]
        assert (info.format, info.in_features, info.out_features, info.bits) == ("awq", k, 128, (4,))
        assert (info.group_size, info.act_order, info.checkpoint_format) == (64, False, None)
        assert info.bits_per_weight == pytest.approx(8 * (t["qweight"].nbytes + t["qzeros"].nbytes + t["scales"].nbytes) / (k * 128))
        loaded = ckpt.load_layer(name)
        assert set(loaded) == set(t)
        for part, a in t.items():
            assert np.array_equal(loaded[part], a), part
        w = dequant_awq(t["qweight"], t["qzeros"], t["scales"], 64)
        assert np.array_equal(ckpt.dequantize(name), w)
        qm = ckpt.qmatrix(name)
        assert qm.format == "awq" and np.array_equal(qm.reference_weight(), w)
    assert "lm_head.weight" in ckpt.extra_tensor_names()


def test_group_size_inferred_and_fp32_scales_cast(tmp_path):
    rng = np.random.default_rng(41)
    t = random_awq(rng, 128, 16, 32)
    t["scales"] = t["scales"].astype(np.float32)
    _write_safetensors(tmp_path / "model.safetensors", {f"layer.{k}": v for k, v in t.items()})
    (tmp_path / "quant_config.json").write_text(json.dumps({"w_bit": 4, "zero_point": True, "version": "GEMM"}))
    ckpt = open_checkpoint(tmp_path)
    assert ckpt.layers["layer"].group_size == 32
    assert ckpt.load_layer("layer")["scales"].dtype == np.float16


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_wide_scales_beyond_float16_refused_naming_the_value(tmp_path, dtype):
    import torch
    from safetensors.torch import save_file

    rng = np.random.default_rng(43)
    t = random_awq(rng, 128, 16, 64)
    scales = torch.from_numpy(t["scales"].astype(np.float32)).to(getattr(torch, dtype))
    scales[1, 3] = 1.0e5
    tensors = {"layer.qweight": torch.from_numpy(t["qweight"]), "layer.qzeros": torch.from_numpy(t["qzeros"]),
               "layer.scales": scales}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "quant_config.json").write_text(json.dumps({"w_bit": 4, "q_group_size": 64, "version": "GEMM"}))
    ckpt = open_checkpoint(tmp_path)
    for read in (ckpt.load_layer, ckpt.dequantize, ckpt.qmatrix):
        with pytest.raises(CheckpointError, match="'layer.scales': scales: expected magnitudes of at most 65504") as exc:
            read("layer")
        assert "at index (1, 3)" in str(exc.value) and "NaN" not in str(exc.value)
    # in range, the wide scales read as their float16 rounding
    scales[1, 3] = 0.5
    save_file(tensors, str(tmp_path / "model.safetensors"))
    ckpt = open_checkpoint(tmp_path)
    s16 = scales.float().numpy().astype(np.float16)
    assert np.array_equal(ckpt.dequantize("layer"), dequant_awq(t["qweight"], t["qzeros"], s16, 64))


@pytest.mark.parametrize("style", ["hf", "autoawq"])
@pytest.mark.parametrize("version", ["gemv", "gemv_fast", "exllama", "ipex", "marlin"])
def test_other_versions_refused_by_name(tmp_path, style, version):
    path, _ = _awq_dir(tmp_path, style=style, version=version)
    shown = version if style == "hf" else version.upper()
    with pytest.raises(CheckpointError, match=f"AWQ version '{shown}' is not supported") as exc:
        open_checkpoint(path)
    assert ("config.json" if style == "hf" else "quant_config.json") in str(exc.value)


@pytest.mark.parametrize("backend", ["llm-awq", "LLM-AWQ"])
def test_llm_awq_backend_refused_by_name(tmp_path, backend):
    # transformers reads backend 'llm-awq' with llm-awq's own layer, not the GEMM packing, even under version gemm
    path, _ = _awq_dir(tmp_path, extra_config={"backend": backend})
    with pytest.raises(CheckpointError, match=f"config.json: quantization config key 'backend': '{backend}'.*not "
                                              "supported") as exc:
        open_checkpoint(path)
    assert "GEMM" in str(exc.value)


@pytest.mark.parametrize("backend", ["autoawq", "auto", None])
def test_loading_backends_are_hints(tmp_path, backend):
    path, layers = _awq_dir(tmp_path, extra_config={"backend": backend})
    ckpt = open_checkpoint(path)
    name, t = next(iter(layers.items()))
    assert np.array_equal(ckpt.dequantize(name), dequant_awq(t["qweight"], t["qzeros"], t["scales"], 64))


def test_version_defaults_to_gemm_and_gptqmodel_format_key(tmp_path):
    (tmp_path / "quant_config.json").write_text(json.dumps({"quant_method": "awq", "bits": 4, "group_size": 128}))
    assert read_quant_config(tmp_path).version == "gemm"
    (tmp_path / "quant_config.json").write_text(json.dumps(
        {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "format": "gemm", "sym": False}))
    assert read_quant_config(tmp_path).version == "gemm"
    (tmp_path / "quant_config.json").write_text(json.dumps({"quant_method": "awq", "bits": 4, "format": "gemv"}))
    with pytest.raises(CheckpointError, match="'format'.*AWQ version 'gemv'"):
        read_quant_config(tmp_path)


@pytest.mark.parametrize(
    "content, fragment",
    [
        ({"quant_method": "awq", "bits": 8, "group_size": 128}, "'bits': AWQ GEMM checkpoints are 4-bit, got 8"),
        ({"w_bit": 3, "q_group_size": 128}, "'w_bit'"),
        ({"quant_method": "awq", "group_size": 128}, "'bits': missing"),
        ({"quant_method": "awq", "bits": 4, "w_bit": 8}, "'bits' is 4 but 'w_bit' is 8"),
        ({"quant_method": "awq", "bits": 4, "group_size": 0}, "'group_size'"),
        ({"w_bit": 4, "q_group_size": "128"}, "'q_group_size'"),
        ({"quant_method": "awq", "bits": 4, "zero_point": "yes"}, "'zero_point'"),
        ({"quant_method": "awq", "bits": 4, "modules_to_not_convert": "lm_head"}, "'modules_to_not_convert'"),
        ({"quant_method": "awq", "bits": 4, "version": 2}, "AWQ version 2"),
    ],
)
def test_bad_awq_config_names_file_and_key(tmp_path, content, fragment):
    (tmp_path / "quant_config.json").write_text(json.dumps(content))
    with pytest.raises(CheckpointError) as exc:
        read_quant_config(tmp_path)
    assert "quant_config.json" in str(exc.value) and fragment in str(exc.value)


def test_modules_to_not_convert(tmp_path):
    path, _ = _awq_dir(tmp_path, keep=["lm_head", "vision_tower"])
    ckpt = open_checkpoint(path)
    qc = ckpt.quant_config
    assert qc.modules_to_not_convert == ("lm_head", "vision_tower")
    assert qc.keeps_dense("lm_head") and qc.keeps_dense("model.vision_tower.proj") and not qc.keeps_dense("model.layers.0.mlp.down_proj")
    assert ckpt.layers["lm_head"].format == "fp16"
    # a listed module that has quantized tensors contradicts the config
    other = tmp_path / "other"
    other.mkdir()
    path, _ = _awq_dir(other, keep=["down_proj"])
    with pytest.raises(CheckpointError, match="modules_to_not_convert lists this module") as exc:
        open_checkpoint(path)
    assert "model.layers.0.mlp.down_proj.qweight" in str(exc.value)


def test_awq_layer_with_g_idx_is_an_error(tmp_path):
    t = random_awq(np.random.default_rng(5), 64, 16, 32)
    t["g_idx"] = np.arange(64, dtype=np.int32) // 32
    _write_safetensors(tmp_path / "model.safetensors", {f"layer.{k}": v for k, v in t.items()})
    (tmp_path / "quant_config.json").write_text(json.dumps({"w_bit": 4, "q_group_size": 32, "zero_point": True}))
    with pytest.raises(CheckpointError, match="layer.g_idx.*no g_idx"):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "change, fragment",
    [
        (dict(scales=np.zeros((2, 24), np.float16)), "layer.scales.*expected shape"),
        (dict(qzeros=np.zeros((3, 2), np.int32)), "layer.qzeros.*expected shape"),
        (dict(qweight=np.zeros((64, 2), np.float32)), "layer.qweight.*expected dtype I32"),
        (dict(bias=np.zeros(15, np.float16)), "layer.bias.*expected shape"),
    ],
)
def test_inconsistent_awq_tensors_name_file_and_tensor(tmp_path, change, fragment):
    t = random_awq(np.random.default_rng(6), 64, 16, 32)
    t.update(change)
    _write_safetensors(tmp_path / "model.safetensors", {f"layer.{k}": v for k, v in t.items()})
    (tmp_path / "quant_config.json").write_text(json.dumps({"w_bit": 4, "q_group_size": 32, "zero_point": True}))
    with pytest.raises(CheckpointError, match=fragment) as exc:
        open_checkpoint(tmp_path)
    assert "model.safetensors" in str(exc.value)


def test_group_size_must_divide_rows(tmp_path):
    t = random_awq(np.random.default_rng(7), 96, 16, 32)
    _write_safetensors(tmp_path / "model.safetensors", {f"layer.{k}": v for k, v in t.items()})
    (tmp_path / "quant_config.json").write_text(json.dumps({"w_bit": 4, "q_group_size": 64, "zero_point": True}))
    with pytest.raises(CheckpointError, match="group_size 64 does not divide the 96 input rows"):
        open_checkpoint(tmp_path)


def test_save_awq_round_trip(tmp_path):
    rng = np.random.default_rng(8)
    w = {n: rng.standard_normal((256, 64)).astype(np.float32) * 0.05 for n in ("a.q_proj", "a.k_proj")}
    layers = {n: quantize_awq(v, group_size=128, bias=rng.standard_normal(64) if n == "a.q_proj" else None)
              for n, v in w.items()}
    extra = {"lm_head.weight": np.ones((8, 256), np.float16)}
    out = save_awq(tmp_path / "ckpt", layers, group_size=128, modules_to_not_convert=["lm_head"],
                   extra_tensors=extra, config={"model_type": "llama"}, shard_bytes=10_000)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    assert cfg["quantization_config"] == {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True,
                                          "version": "gemm", "modules_to_not_convert": ["lm_head"]}
    ckpt = open_checkpoint(out)
    assert len(ckpt.files) > 1 and sorted(ckpt.quantized_layers) == sorted(layers)
    for name, t in layers.items():
        loaded = ckpt.load_layer(name)
        assert all(np.array_equal(loaded[p], t[p]) for p in t)
        assert np.array_equal(ckpt.dequantize(name), dequant_awq(t["qweight"], t["qzeros"], t["scales"], 128))
    assert np.array_equal(ckpt.load_tensor("lm_head.weight"), extra["lm_head.weight"])


def test_save_awq_rejects(tmp_path):
    t = quantize_awq(np.ones((128, 16), np.float32), group_size=64)
    with pytest.raises(ValueError, match="group_size"):
        save_awq(tmp_path / "a", {"x": t}, group_size=0)
    with pytest.raises(ValueError, match=r"layers\['x'\].*qzeros"):
        save_awq(tmp_path / "b", {"x": t}, group_size=32)
    with pytest.raises(ValueError, match="missing tensor 'scales'"):
        save_awq(tmp_path / "c", {"x": {"qweight": t["qweight"], "qzeros": t["qzeros"]}}, group_size=64)
    with pytest.raises(ValueError, match="unexpected tensors.*g_idx"):
        save_awq(tmp_path / "d", {"x": {**t, "g_idx": np.zeros(128, np.int32)}}, group_size=64)
    with pytest.raises(ValueError, match="modules_to_not_convert keeps it dense"):
        save_awq(tmp_path / "e", {"model.lm_head": t}, group_size=64, modules_to_not_convert=["lm_head"])
    with pytest.raises(ValueError, match="modules_to_not_convert: expected a list"):
        save_awq(tmp_path / "f", {"x": t}, group_size=64, modules_to_not_convert="lm_head")
    assert not any(tmp_path.glob("*/*.safetensors"))


# ------------------------------------------------------------------------------------------------ CLI and sample


def test_cli_inspect_awq(tmp_path, capsys):
    path, _ = _awq_dir(tmp_path, keep=["lm_head"])
    assert cli.main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "awq (from config.json): bits 4, group_size 64, zero_point True, version gemm" in out
    assert "modules_to_not_convert lm_head" in out
    assert cli.main(["inspect", str(path), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["quantization_config"]["awq_version"] == "gemm"
    assert payload["quantization_config"]["modules_to_not_convert"] == ["lm_head"]
    formats = {row["name"]: row["format"] for row in payload["layers"]}
    assert formats == {"lm_head": "fp16", "model.layers.0.mlp.down_proj": "awq", "model.layers.0.self_attn.q_proj": "awq"}
    assert payload["totals"]["quantized_layers"] == 2


def test_cli_verify_awq_cpu(tmp_path, capsys):
    path, _ = _awq_dir(tmp_path, style="autoawq")
    code = cli.main(["verify", str(path), "--cpu", "--m", "1,5", "--json"])
    payload = json.loads(capsys.readouterr().out)
    assert code == 0 and payload["passed"]
    assert {r["format"] for r in payload["layers"]} == {"awq"} and len(payload["layers"]) == 2


def test_sample_has_an_awq_model(tmp_path):
    from cupyq.sample import make_sample

    made = make_sample(tmp_path, seed=2)
    ckpt = open_checkpoint(made["awq-4bit-g128"])
    assert ckpt.quant_config.quant_method == "awq" and ckpt.quant_config.modules_to_not_convert == ("lm_head",)
    infos = [ckpt.layers[n] for n in ckpt.quantized_layers]
    assert len(infos) == 2 and {(i.format, i.group_size) for i in infos} == {("awq", 128)}
    assert ckpt.layers["lm_head"].format == "fp16"
    assert any("bias" in ckpt.load_layer(i.name) for i in infos)


@pytest.mark.gpu
def test_cli_verify_awq_gpu(tmp_path, capsys):
    path, _ = _awq_dir(tmp_path)
    code = cli.main(["verify", str(path), "--json"])
    payload = json.loads(capsys.readouterr().out)
    assert payload["gpu"] is True and code == 0 and payload["passed"]


@pytest.mark.gpu
def test_cli_warmup_awq_gpu(tmp_path, capsys):
    path, _ = _awq_dir(tmp_path)
    assert cli.main(["warmup", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layers"] == 2
