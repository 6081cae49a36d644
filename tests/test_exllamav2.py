"""cupyq.exllamav2: the LoRAX/TGI-compatible module.

Layers are made fresh by cupyq.quantize from random weights; results are compared with the float32
NumPy oracle (cupyq.reference). CPU tests run the reference path through the same module code; GPU
tests (marked ``gpu``) run the kernels, the scratch lifecycle, torch.compile and CUDA graphs.
"""

from __future__ import annotations

import copy
import gc
import pickle
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cupyq import exllamav2 as ex  # noqa: E402
from cupyq import reference, torch_ops  # noqa: E402
from cupyq.exllamav2.ext import bind_scratch  # noqa: E402
from cupyq.formats import exl2 as fexl2  # noqa: E402
from cupyq.quantize import quantize_exl2, quantize_gptq  # noqa: E402


@pytest.fixture(autouse=True)
def _module_state():
    """Every test starts from, and leaves behind, the module's state as it found it."""
    saved = (list(ex.LAYERS), ex.FIXED_BYTES, ex.DEVICE, dict(ex._DEVICE_TENSORS))
    ex.LAYERS.clear()
    ex._DEVICE_TENSORS.clear()
    ex.FIXED_BYTES = 0
    yield
    ex.LAYERS[:] = saved[0]
    ex.FIXED_BYTES, ex.DEVICE = saved[1], saved[2]
    ex._DEVICE_TENSORS.clear()
    ex._DEVICE_TENSORS.update(saved[3])


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _weight(k, n, seed):
    return np.random.default_rng(seed).normal(0.0, 0.05, size=(k, n)).astype(np.float32)


def _bias(n, seed):
    return np.random.default_rng(seed + 500).normal(0.0, 0.5, size=n).astype(np.float32)


GPTQ_VARIANTS = ("no_g_idx", "trivial", "act_order", "all_zero")


def _gptq(variant, k=256, n=64, *, seed=0, bias=True, bits=4, device="cpu"):
    """(torch tensors dict, g_idx to pass, groupsize, float32 W, float16 bias as NumPy or None).

    no_g_idx: group size 32 with g_idx None; trivial: g_idx = k // 32; act_order: shuffled groups;
    all_zero: one group (group size -1) with an all-zero g_idx.
    """
    group_size = -1 if variant == "all_zero" else 32
    t = quantize_gptq(
        _weight(k, n, seed),
        bits=bits,
        group_size=group_size,
        act_order=variant == "act_order",
        bias=_bias(n, seed) if bias else None,
        seed=seed,
    )
    w = reference.dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits=bits)
    tt = {name: torch.from_numpy(np.ascontiguousarray(a)).to(device) for name, a in t.items()}
    g_idx = None if variant == "no_g_idx" else tt["g_idx"]
    if variant == "all_zero":
        assert not tt["g_idx"].any()
    return tt, g_idx, group_size, w, t.get("bias")


def _exl2(k=256, n=64, *, seed=0, bias=True, bits=(6, 4, 3), proportions=(0.25, 0.5, 0.25), device="cpu"):
    t = quantize_exl2(
        _weight(k, n, seed), bits=bits, proportions=proportions, bias=_bias(n, seed) if bias else None, seed=seed
    )
    w = reference.dequantize_exl2(t["q_weight"], t["q_invperm"], t["q_scale"], t["q_scale_max"], t["q_groups"])
    tt = {name: torch.from_numpy(np.ascontiguousarray(a)).to(device) for name, a in t.items()}
    return tt, w, t.get("bias")


def _lorax_layer(variant, k=256, n=64, *, seed=0, bias=True, device="cpu"):
    tt, g_idx, group_size, w, b = _gptq(variant, k, n, seed=seed, bias=bias, device=device)
    layer = ex.QuantLinear(tt["qweight"], tt["qzeros"], tt["scales"], g_idx, tt.get("bias"), 4, group_size)
    return layer, w, b


def _expected(x, w, b):
    return torch.from_numpy(reference.matmul(x.detach().cpu(), w, b))


def _x(shape, seed, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(dtype).to(device)


def _snapshot(tensors):
    return {name: t.clone() for name, t in tensors.items() if isinstance(t, torch.Tensor) and not t.is_meta}


def _assert_unchanged(tensors, snapshot):
    assert set(k for k, v in tensors.items() if isinstance(v, torch.Tensor) and not v.is_meta) == set(snapshot)
    for name, before in snapshot.items():
        after = tensors[name]
        assert after.dtype == before.dtype and after.shape == before.shape, name
        assert torch.equal(after, before), f"{name} was modified"


def _group_map_rule(q_groups, num_qrows):
    """The group-map rule written out plainly (independent of cupyq.formats)."""
    pairs = [int(v) for v in q_groups]
    out = []
    groups = len(pairs) // 2
    for i in range(groups):
        bits, start = pairs[2 * i], pairs[2 * i + 1]
        end = pairs[2 * i + 3] if i + 1 < groups else num_qrows
        rows = (end - start) * 32 // bits
        for j in range(rows):
            out += [i, rows - j]
    return out


# --------------------------------------------------------------------------------------------
# module basics
# --------------------------------------------------------------------------------------------


def test_none_tensor_is_meta():
    assert ex.none_tensor.is_meta and tuple(ex.none_tensor.shape) == (1, 1)


def test_set_device():
    ex.set_device("cuda:1")
    assert ex.DEVICE == torch.device("cuda", 1)
    ex.set_device(torch.device("cpu"))
    assert ex.DEVICE == torch.device("cpu")
    ex.set_device(None)
    assert ex.DEVICE is None


@pytest.mark.parametrize(
    "bits,proportions,k",
    [((4,), (1.0,), 256), ((8, 6, 5, 4, 3, 2), (0.1, 0.1, 0.2, 0.2, 0.2, 0.2), 320), ((5, 3), (0.4, 0.6), 200)],
)
def test_make_group_map(bits, proportions, k):
    t = quantize_exl2(_weight(k, 32, 1), bits=bits, proportions=proportions, seed=1)
    q_groups = torch.from_numpy(t["q_groups"])
    num_qrows = t["q_weight"].shape[0]
    gm = ex.make_group_map(q_groups, num_qrows)
    assert gm.dtype == torch.int16 and gm.device == q_groups.device
    assert gm.tolist() == _group_map_rule(t["q_groups"].tolist(), num_qrows)
    np.testing.assert_array_equal(gm.numpy(), fexl2.make_group_map(t["q_groups"], num_qrows))


def test_make_group_map_rejects_arrays():
    with pytest.raises(TypeError, match="q_groups"):
        ex.make_group_map(np.array([4, 0], dtype=np.int16), 4)


@pytest.mark.parametrize("num_qrows", [33.7, "34", None])
def test_make_group_map_refuses_a_row_count_that_is_not_an_int(num_qrows):
    t = quantize_exl2(_weight(256, 32, 2), bits=(6, 4), proportions=(0.5, 0.5), seed=2)
    q_groups = torch.from_numpy(t["q_groups"])
    match = rf"num_qrows: expected an int \(q_weight.shape\[0\]\), got {type(num_qrows).__name__}"
    with pytest.raises(TypeError, match=match):
        ex.make_group_map(q_groups, num_qrows)
    rows = np.int64(t["q_weight"].shape[0])
    assert ex.make_group_map(q_groups, rows).tolist() == _group_map_rule(t["q_groups"].tolist(), int(rows))


# --------------------------------------------------------------------------------------------
# QuantLinear construction and sizes
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_quant_linear_rejects_bits_other_than_4(bits):
    tt, g_idx, gs, _, _ = _gptq("trivial", 256, 64, bits=bits)
    with pytest.raises(ValueError, match=f"supports only bits=4.*bits={bits}"):
        ex.QuantLinear(tt["qweight"], tt["qzeros"], tt["scales"], g_idx, None, bits, gs)
    assert ex.LAYERS == [] and ex.FIXED_BYTES == 0


def test_quant_linear_sizes_and_registration():
    layer, _, _ = _lorax_layer("trivial", 256, 40)
    assert ex.QuantLinear.QUANT_TYPE == "exllamav2"
    assert (layer.infeatures, layer.outfeatures, layer.padding) == (256, 64, 24)
    assert layer.temp_dq_size() == 256 * 64 * 2 + 128
    assert layer.temp_fwd_size(10, 3) == 64 * 10 * 3 * 4 + 128
    assert layer.scratch_space_fixed() == layer.temp_dq_size() + 64 * 4096 * 16 * 4 + 128
    assert layer.scratch_space_fixed(100, 1) == layer.temp_dq_size() + 64 * 100 * 4 + 128
    assert ex.LAYERS == [layer] and ex.FIXED_BYTES == layer.temp_dq_size()
    big, _, _ = _lorax_layer("trivial", 512, 64, seed=1)
    small, _, _ = _lorax_layer("trivial", 64, 32, seed=2)
    assert ex.LAYERS == [layer, big, small]
    assert ex.FIXED_BYTES == big.temp_dq_size() == 512 * 64 * 2 + 128
    assert "infeatures=256" in repr(layer) and "outfeatures=40" in repr(layer)


def test_quant_linear_validation():
    tt, g_idx, gs, _, _ = _gptq("trivial", 256, 64)
    with pytest.raises(TypeError, match="qweight"):
        ex.QuantLinear(tt["qweight"].float(), tt["qzeros"], tt["scales"], g_idx, None, 4, gs)
    with pytest.raises(ValueError, match="scales"):
        ex.QuantLinear(tt["qweight"], tt["qzeros"], tt["scales"][:, :32], g_idx, None, 4, gs)
    with pytest.raises(ValueError, match="g_idx"):
        ex.QuantLinear(tt["qweight"], tt["qzeros"], tt["scales"], g_idx + 100, None, 4, gs)
    with pytest.raises(ValueError, match="groupsize"):
        ex.QuantLinear(tt["qweight"], tt["qzeros"], tt["scales"], None, None, 4, 64)
    with pytest.raises(ValueError, match="groupsize"):
        ex.QuantLinear(tt["qweight"], tt["qzeros"], tt["scales"], None, None, 4, 0)
    assert ex.LAYERS == []


# --------------------------------------------------------------------------------------------
# scratch arithmetic and the device-tensors object
# --------------------------------------------------------------------------------------------


def test_dequant_scratch_budget():
    a = ex.ScratchNeed(full_bytes=4096 * 4096 * 2 + 128, row_bytes=4096 * 2, gather_bytes=0)
    b = ex.ScratchNeed(full_bytes=11008 * 4096 * 2 + 128, row_bytes=4096 * 2, gather_bytes=11008 * 2)
    assert ex.dequant_scratch_budget([], 100) == 0
    # No token bound: the largest full copy, rounded to 128.
    assert ex.dequant_scratch_budget([a, b]) == 11008 * 4096 * 2 + 128
    assert ex.dequant_scratch_budget([ex.ScratchNeed(1000, 16, 0)]) == 1024
    # 1000 tokens: 2000 rows -> 2048 rows per chunk (64-row units) after gathering 1000 rows.
    expect_b = -(-1000 * 11008 * 2 // 256) * 256 + 256 + 2048 * 4096 * 2 + 128
    expect_a = 256 + 2048 * 4096 * 2 + 128
    assert ex.dequant_scratch_budget([a, b], 1000) == max(expect_a, expect_b)
    assert ex.dequant_scratch_budget([a], 1000) == expect_a
    # Few tokens: never below MIN_DEQUANT_ROWS rows.
    rows = ex.MIN_DEQUANT_ROWS
    assert ex.dequant_scratch_budget([a], 3) == 256 + rows * 4096 * 2 + 128
    # Many tokens: capped by the full copy.
    assert ex.dequant_scratch_budget([a, b], 10**6) == 11008 * 4096 * 2 + 128
    with pytest.raises(ValueError, match="max_total_tokens"):
        ex.dequant_scratch_budget([a], 0)
    with pytest.raises(TypeError, match="max_total_tokens"):
        ex.dequant_scratch_budget([a], 2.5)
    with pytest.raises(TypeError, match="max_total_tokens"):
        ex.dequant_scratch_budget([a], True)


def test_scratch_need_of_cpu_matrices():
    plain = ex.ext_make_q_matrix(_gptq("trivial", 256, 64)[0])
    shuffled = ex.ext_make_q_matrix(_gptq("act_order", 256, 64)[0])
    for qm in (plain, shuffled):
        need = ex.scratch_need(qm)
        assert need.full_bytes == qm.dequant_scratch_bytes >= 256 * 64 * 2
        assert need.row_bytes >= 64 * 2
    assert ex.scratch_need(plain).gather_bytes == 0
    assert ex.scratch_need(shuffled).gather_bytes >= 256 * 2


def test_device_tensors_bump_allocator_cpu():
    dt = ex.ExLlamaV2DeviceTensors("cpu", 1000)
    assert dt.scratch_bytes == 1024 and dt.scratch is None and dt.used_bytes == 0
    base = dt.prepare()
    assert dt.prepare() is base and base.dtype == torch.float16 and base.numel() == 512
    a = dt.get_scratch_slice(100)
    b = dt.get_scratch_slice(129)
    assert a.dtype == torch.float16 and a.numel() == 64 and b.numel() == 128
    assert a.data_ptr() - base.data_ptr() == 0 and b.data_ptr() - base.data_ptr() == 128
    assert dt.used_bytes == 384 and dt.free_bytes == 640
    a.fill_(1.0)
    b.fill_(2.0)
    assert (a == 1.0).all() and (b == 2.0).all()
    assert dt.get_scratch_slice(0).numel() == 0
    with pytest.raises(ValueError, match=r"1000 bytes.*only 640 of 1024"):
        dt.get_scratch_slice(1000)
    with pytest.raises(ValueError, match="size_bytes"):
        dt.get_scratch_slice(-1)
    with pytest.raises(TypeError, match="size_bytes"):
        dt.get_scratch_slice(1.5)
    # The dequantisation region: everything left, shared by every caller.
    d1 = dt.get_dequant_slice(200)
    d2 = dt.get_dequant_slice(10**6)
    assert d1.data_ptr() == d2.data_ptr() == b.data_ptr() + 256
    assert d1.numel() == 128 and d2.numel() == 320 and dt.dequant_bytes == 640
    with pytest.raises(ValueError, match="only 0 of 1024"):
        dt.get_scratch_slice(1)
    dt.reset()
    assert dt.used_bytes == 0 and dt.get_scratch_slice(128).data_ptr() == base.data_ptr()


@pytest.mark.gpu
def test_device_tensors_cupy_pool_cuda():
    import cupy

    pool = cupy.get_default_memory_pool()
    before = pool.used_bytes()
    dt = ex.ExLlamaV2DeviceTensors("cuda:0", (1 << 20) - 5)
    assert dt.scratch is None and dt.buffer is None  # lazy
    base = dt.prepare()
    assert pool.used_bytes() - before >= 1 << 20  # one block from CuPy's pool
    assert base.is_cuda and base.dtype == torch.float16 and base.numel() == 1 << 19
    assert base.data_ptr() == dt.buffer.data.ptr and base.data_ptr() % 128 == 0
    a = dt.get_scratch_slice(1000)
    b = dt.get_scratch_slice(300)
    assert b.data_ptr() == a.data_ptr() + 1024 and b.data_ptr() % 128 == 0
    a.fill_(1.5)
    b.fill_(-2.0)
    torch.cuda.synchronize()
    as_cupy = dt.buffer.view(cupy.float16)  # the same memory, seen from CuPy
    assert float(as_cupy[0]) == 1.5 and float(as_cupy[511]) == 1.5 and float(as_cupy[512]) == -2.0
    with pytest.raises(ValueError, match="only"):
        dt.get_scratch_slice(1 << 20)


def test_device_tensors_validation():
    with pytest.raises(ValueError, match="scratch_bytes"):
        ex.ExLlamaV2DeviceTensors("cpu", -5)
    with pytest.raises(TypeError, match="scratch_bytes"):
        ex.ExLlamaV2DeviceTensors("cpu", "big")
    empty = ex.ExLlamaV2DeviceTensors("cpu", 0)
    with pytest.raises(ValueError, match="dequantisation region"):
        empty.get_dequant_slice(128)


# --------------------------------------------------------------------------------------------
# ext_make_q_matrix / ext_gemm_half_q_half
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", GPTQ_VARIANTS)
def test_ext_make_q_matrix_gptq(variant):
    tt, g_idx, _, w, b = _gptq(variant, seed=3)
    w_dict = {"qweight": tt["qweight"], "qzeros": tt["qzeros"], "scales": tt["scales"].float(), "g_idx": g_idx}
    if g_idx is None:
        w_dict["g_idx"] = ex.none_tensor
    w_dict["bias"] = tt["bias"]
    keys = list(w_dict)
    before = _snapshot(w_dict)
    qm = ex.ext_make_q_matrix(w_dict, ex.none_tensor, key="model.layers.0.mlp.down_proj")
    _assert_unchanged(w_dict, before)
    assert list(w_dict) == keys
    assert (qm.in_features, qm.out_features) == (256, 64)
    x = _x((2, 3, 256), seed=3)
    y = ex.ext_gemm_half_q_half(x, qm, 64, False)
    assert y.shape == (2, 3, 64) and y.dtype == torch.float32
    torch.testing.assert_close(y, _expected(x, w, b), rtol=1e-5, atol=1e-5)


def test_ext_make_q_matrix_exl2_keeps_inputs():
    tt, w, b = _exl2(seed=4)
    perm = torch.argsort(tt["q_invperm"].long())
    w_dict = dict(tt)
    w_dict["q_perm"] = perm.short()
    w_dict["q_invperm"] = tt["q_invperm"].short()
    w_dict["q_group_map"] = ex.make_group_map(tt["q_groups"], tt["q_weight"].shape[0])
    before = _snapshot(w_dict)
    qm = ex.ext_make_q_matrix(w_dict, None)
    _assert_unchanged(w_dict, before)
    x = _x((5, 256), seed=4)
    torch.testing.assert_close(ex.ext_gemm_half_q_half(x, qm, 64, False), _expected(x, w, b), rtol=1e-5, atol=1e-5)
    # q_perm alone is enough.
    del w_dict["q_invperm"]
    qm2 = ex.ext_make_q_matrix(w_dict)
    torch.testing.assert_close(ex.ext_gemm_half_q_half(x, qm2, 64, False), _expected(x, w, b), rtol=1e-5, atol=1e-5)


@dataclass
class _TgiExl2Weight:
    """Shaped like TGI's Exl2Weight: q_scale_max divided by 256 and q_invperm narrowed to int16 on creation."""

    q_weight: torch.Tensor
    q_scale: torch.Tensor
    q_invperm: torch.Tensor
    q_scale_max: torch.Tensor
    q_groups: torch.Tensor

    def __post_init__(self):
        self.q_scale_max = self.q_scale_max / 256
        self.q_invperm = self.q_invperm.short()

    @property
    def device(self):
        return self.q_weight.device


@dataclass
class _TgiGPTQWeight:
    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    g_idx: torch.Tensor | None
    bits: int
    groupsize: int
    use_awq_kernel: bool = False
    use_exllama: bool = True

    @property
    def device(self):
        return self.qweight.device


def _tgi_exl2(tt):
    return _TgiExl2Weight(tt["q_weight"], tt["q_scale"], tt["q_invperm"], tt["q_scale_max"], tt["q_groups"])


def test_tgi_exl2_weight_with_k_beyond_int16():
    # 33024 rows: TGI's int16 q_invperm wraps negative; it must be read as unsigned.
    tt, w, _ = _exl2(k=33024, n=32, seed=5, bias=False, bits=(4, 3), proportions=(0.5, 0.5))
    weight = _tgi_exl2(tt)
    assert int(weight.q_invperm.min()) < 0
    qm = ex.ext_make_q_matrix(weight)
    x = _x((3, 33024), seed=5)
    torch.testing.assert_close(ex.ext_gemm_half_q_half(x, qm, 32, False), _expected(x, w, None), rtol=1e-4, atol=1e-4)


def test_tgi_style_quant_linear():
    tt, w, _ = _exl2(seed=6, bias=False)
    bias = torch.from_numpy(_bias(64, 6)).half()
    layer = ex.QuantLinear(_tgi_exl2(tt), bias)
    assert (layer.infeatures, layer.outfeatures, layer.padding) == (256, 64, 0)
    x = _x((4, 256), seed=6)
    torch.testing.assert_close(layer(x), _expected(x, w, bias.numpy()), rtol=1e-5, atol=1e-5)

    gt, g_idx, gs, gw, gb = _gptq("act_order", seed=7)
    glayer = ex.QuantLinear(_TgiGPTQWeight(gt["qweight"], gt["qzeros"], gt["scales"], g_idx, 4, gs), gt["bias"])
    torch.testing.assert_close(glayer(x), _expected(x, gw, gb), rtol=1e-5, atol=1e-5)
    assert ex.LAYERS == [layer, glayer]

    with pytest.raises(ValueError, match="AWQ"):
        awq = _TgiGPTQWeight(gt["qweight"], gt["qzeros"], gt["scales"], g_idx, 4, gs, use_awq_kernel=True)
        ex.QuantLinear(awq, None)
    with pytest.raises(ValueError, match="bits=4"):
        ex.QuantLinear(_TgiGPTQWeight(gt["qweight"], gt["qzeros"], gt["scales"], g_idx, 8, gs), None)
    with pytest.raises(TypeError, match="weight"):
        ex.QuantLinear(object(), None)


def test_quant_linear_checks_the_bias_before_registering():
    tt, g_idx, gs, _, _ = _gptq("trivial", 256, 64, bias=False)
    good = ex.QuantLinear(tt["qweight"], tt["qzeros"], tt["scales"], g_idx, None, 4, gs)
    et, _, _ = _exl2(seed=9, bias=False)
    gptq_weight = _TgiGPTQWeight(tt["qweight"], tt["qzeros"], tt["scales"], g_idx, 4, gs)
    for make, match in [
        (lambda: ex.QuantLinear(tt["qweight"], tt["qzeros"], tt["scales"], g_idx, torch.ones(65), 4, gs),
         r"bias: expected shape \(64,\), got \(65,\)"),
        (lambda: ex.QuantLinear(tt["qweight"], tt["qzeros"], tt["scales"], g_idx, torch.ones(64, 1), 4, gs),
         r"bias: expected shape \(64,\)"),
        (lambda: ex.QuantLinear(tt["qweight"], tt["qzeros"], tt["scales"], g_idx,
                                torch.full((64,), float("nan")), 4, gs), "bias"),
        (lambda: ex.QuantLinear(gptq_weight, torch.ones(63)), r"bias: expected shape \(64,\), got \(63,\)"),
        (lambda: ex.QuantLinear(_tgi_exl2(et), torch.ones(65)), r"bias: expected shape \(64,\), got \(65,\)"),
    ]:
        with pytest.raises(ValueError, match=match):
            make()
    with pytest.raises(TypeError, match="bias"):
        ex.QuantLinear(tt["qweight"], tt["qzeros"], tt["scales"], g_idx, torch.ones(64, dtype=torch.int32), 4, gs)
    assert ex.LAYERS == [good] and ex.FIXED_BYTES == good.temp_dq_size()
    t2, g2, gs2, w2, b2 = _gptq("act_order", 256, 64, seed=10)
    later = ex.QuantLinear(t2["qweight"], t2["qzeros"], t2["scales"], g2, t2["bias"], 4, gs2)
    assert ex.create_exllama_buffers() == {}  # CPU layers: nothing to bind, and no error from a refused layer
    x = _x((3, 256), seed=10)
    torch.testing.assert_close(later(x), _expected(x, w2, b2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("built", [False, True])
def test_quant_linear_bias_is_read_only_and_truthful(built):
    layer, w, b = _lorax_layer("act_order", seed=11)
    x = _x((3, 256), seed=11)
    if built:
        layer.post_init(None)
    layer.bias.mul_(0)  # a copy: the matrix keeps the bias
    assert torch.equal(layer.bias, torch.from_numpy(b))
    with pytest.raises(AttributeError, match=r"bias: QuantLinear's bias is part of its quantized matrix.*new QuantLinear"):
        layer.bias = None
    torch.testing.assert_close(layer(x), _expected(x, w, b), rtol=1e-5, atol=1e-5)
    assert "bias=True" in repr(layer)


@pytest.mark.parametrize("built", [False, True])
def test_quant_linear_pickles_and_copies(built):
    layer, w, b = _lorax_layer("no_g_idx", seed=12)
    if built:
        ex.create_exllama_buffers()
    back, dup = pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)
    assert ex.LAYERS == [layer, back, dup]  # layers of this process, as constructed ones
    if built:
        assert back._op_handle not in (None, layer._op_handle) and dup.q_handle is layer.q_handle
    ex.LAYERS.remove(layer)
    del layer
    gc.collect()
    x = _x((3, 256), seed=12)
    for other in (back, dup):
        torch.testing.assert_close(other(x), _expected(x, w, b), rtol=1e-5, atol=1e-5)
        assert torch_ops.lookup_qmatrix(other._op_handle) is other.q_handle
    assert ex.create_exllama_buffers() == {}


def test_ext_make_q_matrix_rejects_unknown_weights():
    with pytest.raises(ValueError, match="layer.7.*expected GPTQ weights"):
        ex.ext_make_q_matrix({"weight": torch.zeros(2, 2)}, None, key="layer.7")
    tt, _, _ = _exl2(seed=8)
    with pytest.raises(ValueError, match="q_scale_max"):
        ex.ext_make_q_matrix({k: v for k, v in tt.items() if k != "q_scale_max"})
    with pytest.raises(ValueError, match="q_invperm"):
        ex.ext_make_q_matrix({k: v for k, v in tt.items() if k != "q_invperm"})
    with pytest.raises(TypeError, match="temp_dq"):
        tt2, _, _, _, _ = _gptq("trivial")
        qm = ex.ext_make_q_matrix(tt2)
        bind_scratch(_CudaLike(qm), "scratch")


class _CudaLike:
    """A matrix that claims to be on cuda:0 (to reach the temp_dq checks without a GPU)."""

    def __init__(self, qm):
        self.qm = qm
        self.is_cuda = True
        self.device_id = 0

    def __getattr__(self, name):
        return getattr(self.qm, name)


def test_ext_gemm_widths():
    tt, g_idx, _, w, b = _gptq("trivial", 256, 40, seed=9)
    qm = ex.ext_make_q_matrix(tt)
    x = _x((3, 256), seed=9)
    y = ex.ext_gemm_half_q_half(x, qm, 64, False)  # the 32-padded width: zero columns past 40
    assert y.shape == (3, 64)
    assert (y[:, 40:] == 0).all()
    torch.testing.assert_close(y[:, :40], _expected(x, w, b), rtol=1e-5, atol=1e-5)
    handle = torch_ops.register_qmatrix(qm)
    torch.testing.assert_close(ex.ext_gemm_half_q_half(x, handle, 40, False), y[:, :40])
    with pytest.raises(ValueError, match="q4_width"):
        ex.ext_gemm_half_q_half(x, qm, 32, False)
    with pytest.raises(ValueError, match="q_handle"):
        ex.ext_gemm_half_q_half(x, None, 40, False)


# --------------------------------------------------------------------------------------------
# QuantLinear forward and lifecycle on the CPU
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", GPTQ_VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_quant_linear_cpu_forward(variant, dtype):
    layer, w, b = _lorax_layer(variant, 256, 40, seed=10)
    x = _x((2, 5, 256), seed=10, dtype=dtype)
    y = layer(x)  # no post_init: the matrix is built on first use
    assert y.shape == (2, 5, 40) and y.dtype == dtype
    ref = _expected(x, w, b)
    if dtype == torch.float32:
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    else:  # the float32 result rounded once to float16
        assert ((y.float() - ref).abs() <= 2.0**-11 * ref.abs() + 1e-6).all()


def test_quant_linear_groupsize_not_dividing_k():
    k, n, gs = 96, 32, 40  # groups of 40, 40 and 16 rows
    t = quantize_gptq(_weight(k, n, 11), bits=4, group_size=gs, seed=11)
    w = reference.dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits=4)
    tt = {name: torch.from_numpy(a) for name, a in t.items()}
    layer = ex.QuantLinear(tt["qweight"], tt["qzeros"], tt["scales"], None, None, 4, gs)
    x = _x((4, k), seed=11)
    torch.testing.assert_close(layer(x), _expected(x, w, None), rtol=1e-5, atol=1e-5)


def test_lifecycle_cpu_is_repeatable():
    layers = [_lorax_layer(v, seed=12 + i) for i, v in enumerate(GPTQ_VARIANTS)]
    tensors = [_snapshot(layer.q_tensors) for layer, _, _ in layers]
    x = _x((3, 256), seed=12)
    assert ex.create_exllama_buffers(64) == {}  # CPU layers need no scratch
    first = [layer(x) for layer, _, _ in layers]
    for layer, _, _ in layers:
        assert layer.q_handle is not None
    ex.create_exllama_buffers(64)
    ex.create_exllama_buffers()
    for layer, _, _ in layers:
        handle = layer.q_handle
        layer.post_init(None)
        layer.post_init(ex.none_tensor)
        assert layer.q_handle is handle  # built once
    for (layer, w, b), y0, snap in zip(layers, first, tensors):
        assert torch.equal(layer(x), y0)
        torch.testing.assert_close(y0, _expected(x, w, b), rtol=1e-5, atol=1e-5)
        _assert_unchanged(layer.q_tensors, snap)


def test_release_checkpoint_tensors():
    layer, w, b = _lorax_layer("act_order", seed=15)
    x = _x((3, 256), seed=15)
    y = layer(x)
    layer.release_checkpoint_tensors()
    assert layer.qweight is None and layer.q_tensors is None and layer.g_idx is None
    layer.post_init(None)
    ex.create_exllama_buffers(16)
    assert torch.equal(layer(x), y)
    torch.testing.assert_close(y, _expected(x, w, b), rtol=1e-5, atol=1e-5)


def test_compile_fullgraph_cpu():
    torch._dynamo.reset()
    gate, wg, bg = _lorax_layer("act_order", 64, 96, seed=13)
    tt, wd, _ = _exl2(96, 64, seed=14, bias=False)
    down = ex.QuantLinear(_tgi_exl2(tt), None)
    ex.create_exllama_buffers(32)  # builds both matrices before tracing

    def model(x):
        return down(torch.nn.functional.gelu(gate(x))) * 2.0

    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for shape in ((3, 64), (2, 7, 64)):
        x = _x(shape, seed=13)
        h = torch.nn.functional.gelu(_expected(x, wg, bg))
        torch.testing.assert_close(compiled(x), _expected(h, wd, None) * 2.0, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------


def _assert_close_fp16(y, ref, *, max_rel=1e-2, rms_rel=2e-3):
    """float16 kernel output vs float32 oracle, relative to the output's scale.

    Dequantised weights and outputs are each stored in float16 (2**-11 relative rounding per element);
    accumulation is float32. The worst element stays far below 1% of max|ref|, the RMS error below 0.2%.
    """
    y = y.detach().float().cpu()
    assert y.shape == ref.shape and torch.isfinite(y).all()
    diff = (y - ref).abs()
    assert diff.max().item() <= max_rel * ref.abs().max().item()
    assert diff.norm().item() <= rms_rel * ref.norm().item()


def _cuda_layer(kind, k=512, n=256, seed=0):
    if kind == "exl2":
        tt, w, _ = _exl2(k, n, seed=seed, bias=False, device="cuda")
        bias = torch.from_numpy(_bias(n, seed)).half().cuda()
        return ex.QuantLinear(_tgi_exl2(tt), bias), w, bias.cpu().numpy()
    return _lorax_layer(kind, k, n, seed=seed, device="cuda")


CUDA_KINDS = GPTQ_VARIANTS + ("exl2",)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", CUDA_KINDS)
@pytest.mark.parametrize("m", [1, 7, 33, 130])
def test_quant_linear_cuda_matches_reference(kind, m):
    layer, w, b = _cuda_layer(kind, seed=m)
    snap = _snapshot(layer.q_tensors if isinstance(layer.q_tensors, dict) else vars(layer.q_tensors))
    ex.set_device(torch.device("cuda", 0))
    ex.create_exllama_buffers(256)
    x = _x((m, 512), seed=m, dtype=torch.float16, device="cuda")
    y = layer(x)
    assert y.is_cuda and y.dtype == torch.float16 and y.shape == (m, 256)
    _assert_close_fp16(y, _expected(x, w, b))
    y3 = layer(x.view(1, m, 512))
    assert y3.shape == (1, m, 256)
    _assert_close_fp16(y3[0], _expected(x, w, b))
    _assert_unchanged(layer.q_tensors if isinstance(layer.q_tensors, dict) else vars(layer.q_tensors), snap)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["act_order", "exl2"])
def test_quant_linear_cuda_force_cuda(kind):
    layer, w, b = _cuda_layer(kind, seed=20)
    ex.create_exllama_buffers(256)
    x = _x((130, 512), seed=20, dtype=torch.float16, device="cuda")
    ref = _expected(x, w, b)
    _assert_close_fp16(layer(x, force_cuda=True), ref)
    _assert_close_fp16(layer.forward(x, True), ref)
    _assert_close_fp16(layer(x), ref)


@pytest.mark.gpu
def test_create_buffers_and_post_init_twice():
    layers = [_cuda_layer(kind, seed=30 + i) for i, kind in enumerate(CUDA_KINDS)]
    cuda0 = torch.device("cuda", 0)
    snaps = [_snapshot(layer.q_tensors if isinstance(layer.q_tensors, dict) else vars(layer.q_tensors))
             for layer, _, _ in layers]
    x = _x((130, 512), seed=30, dtype=torch.float16, device="cuda")
    small = _x((5, 512), seed=31, dtype=torch.float16, device="cuda")
    # A budget for 8 tokens: smaller than a full copy of these layers.
    first = ex.create_exllama_buffers(8)[cuda0]
    assert first.scratch_bytes < max(layer.q_handle.dequant_scratch_bytes for layer, _, _ in layers)
    y_small = [layer(small) for layer, _, _ in layers]
    # 200 tokens need more: the buffer is replaced and every layer rebound.
    second = ex.create_exllama_buffers(200)[cuda0]
    assert second is not first and second.scratch_bytes > first.scratch_bytes
    y_big = [layer(x) for layer, _, _ in layers]
    for (layer, w, b), ys, yb in zip(layers, y_small, y_big):
        assert layer.temp_dq.data_ptr() == second.get_dequant_slice(128).data_ptr()
        assert torch.equal(layer(small), ys)
        _assert_close_fp16(ys, _expected(small, w, b))
        _assert_close_fp16(yb, _expected(x, w, b))
    # Same budget again: the buffer is reused; post_init twice more changes nothing.
    assert ex.create_exllama_buffers(200)[cuda0] is second
    for layer, _, _ in layers:
        handle = layer.q_handle
        layer.post_init(second)
        layer.post_init(second)
        assert layer.q_handle is handle
    for (layer, _, _), ys, yb, snap in zip(layers, y_small, y_big, snaps):
        assert torch.equal(layer(x), yb)
        assert torch.equal(layer(small), ys)
        _assert_unchanged(layer.q_tensors if isinstance(layer.q_tensors, dict) else vars(layer.q_tensors), snap)


@pytest.mark.gpu
def test_chunked_dequantisation_matches_full():
    # 2048 input rows, a scratch budget for 130 tokens: 320 dequantised rows per chunk.
    layers = [_cuda_layer(kind, k=2048, n=256, seed=40 + i) for i, kind in enumerate(("act_order", "exl2", "trivial"))]
    tensors = ex.create_exllama_buffers(130)[torch.device("cuda", 0)]
    assert tensors.scratch_bytes < max(layer.q_handle.dequant_scratch_bytes for layer, _, _ in layers)
    x = _x((130, 2048), seed=40, dtype=torch.float16, device="cuda")
    for layer, w, b in layers:
        _assert_close_fp16(layer(x), _expected(x, w, b))


@pytest.mark.gpu
def test_distinct_scratch_slices_cuda():
    dt = ex.ExLlamaV2DeviceTensors(0, 4096)
    a = dt.get_scratch_slice(300)
    b = dt.get_scratch_slice(1000)
    assert a.is_cuda and a.dtype == torch.float16
    assert a.data_ptr() % 128 == 0 and b.data_ptr() % 128 == 0
    assert a.data_ptr() + a.numel() * 2 <= b.data_ptr()
    a.fill_(1.0)
    b.fill_(-2.0)
    torch.cuda.synchronize()
    assert (a == 1.0).all() and (b == -2.0).all()
    with pytest.raises(ValueError, match="left"):
        dt.get_scratch_slice(4096)
    # Layers bound to one device-tensors object share its dequantisation region.
    l1, _, _ = _cuda_layer("trivial", seed=50)
    l2, _, _ = _cuda_layer("exl2", seed=51)
    shared = ex.ExLlamaV2DeviceTensors(0, 1 << 20)
    l1.post_init(shared)
    l2.post_init(shared)
    assert l1.temp_dq.data_ptr() == l2.temp_dq.data_ptr()


class _Block(torch.nn.Module):
    def __init__(self, seed):
        super().__init__()
        self.gate, self.wg, self.bg = _cuda_layer("act_order", 256, 512, seed)
        self.down, self.wd, self.bd = _cuda_layer("exl2", 512, 256, seed + 1)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.gate(x)))

    def oracle(self, x):
        h = _expected(x, self.wg, self.bg).half().float()
        h = torch.nn.functional.silu(h).half()
        return _expected(h, self.wd, self.bd)


@pytest.mark.gpu
def test_compile_fullgraph_cuda():
    torch._dynamo.reset()
    block = _Block(60)
    ex.create_exllama_buffers(128)
    compiled = torch.compile(block, fullgraph=True)
    for m in (1, 9, 100):
        x = _x((m, 256), seed=m, dtype=torch.float16, device="cuda")
        y = compiled(x)
        _assert_close_fp16(y, block.oracle(x), max_rel=2e-2, rms_rel=4e-3)
        _assert_close_fp16(y, block(x).float().cpu(), max_rel=1e-2, rms_rel=2e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 100])
def test_cuda_graph_capture_and_replay(m):
    block = _Block(70)
    ex.create_exllama_buffers(128)
    static_x = _x((m, 256), seed=0, dtype=torch.float16, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            block(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = block(static_x)
    for seed in (71, 72):
        fresh = _x((m, 256), seed=seed, dtype=torch.float16, device="cuda")
        static_x.copy_(fresh)
        static_y.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        _assert_close_fp16(static_y, block.oracle(fresh), max_rel=2e-2, rms_rel=4e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [3, 130])
def test_non_default_stream(m):
    layer, w, b = _cuda_layer("exl2", seed=80)
    ex.create_exllama_buffers(256)
    x = _x((m, 512), seed=80, dtype=torch.float16, device="cuda")
    layer(x)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.cuda._sleep(10_000_000)  # work issued on any other stream would run before x2 exists
        x2 = x * -1.5
        y = layer(x2)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    _assert_close_fp16(y, _expected(x2, w, b))


# --------------------------------------------------------------------------------------------
# GPTQ layers without g_idx: the group size is not guessed from the group count
# --------------------------------------------------------------------------------------------


def _three_groups_of_128(seed):
    """320 input rows in groups of 128, 128 and 64: every size in 107..159 gives 3 groups."""
    t = quantize_gptq(_weight(320, 64, seed), bits=4, group_size=128, seed=seed)
    w = reference.dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits=4)
    return {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in t.items()}, w


def test_ext_make_q_matrix_without_g_idx_uses_the_exllamav2_power_of_two_group_size():
    tt, w = _three_groups_of_128(seed=40)
    w_dict = {"qweight": tt["qweight"], "qzeros": tt["qzeros"], "scales": tt["scales"], "g_idx": ex.none_tensor}
    qm = ex.ext_make_q_matrix(w_dict, ex.none_tensor)
    assert qm.group_sizes == {4: 128}
    np.testing.assert_array_equal(qm.reference_weight(), w)


@pytest.mark.parametrize("groupsize", [128, -1])
def test_lorax_quant_linear_without_g_idx_follows_its_groupsize(groupsize):
    tt, w = _three_groups_of_128(seed=41)
    layer = ex.QuantLinear(tt["qweight"], tt["qzeros"], tt["scales"], None, None, 4, groupsize)
    x = _x((2, 320), seed=41)
    torch.testing.assert_close(layer(x), _expected(x, w, None), rtol=1e-5, atol=1e-5)


def test_lorax_quant_linear_with_a_wrong_groupsize_is_refused():
    tt, _ = _three_groups_of_128(seed=42)
    with pytest.raises(ValueError, match=r"groupsize: 64 gives 5 groups for 320 input features"):
        ex.QuantLinear(tt["qweight"], tt["qzeros"], tt["scales"], None, None, 4, 64)


# --------------------------------------------------------------------------------------------
# TGI weight objects are checked when the layer is constructed, before it joins LAYERS
# --------------------------------------------------------------------------------------------


def _exl2_object(tt, **replace):
    weight = _tgi_exl2(tt)
    for name, value in replace.items():
        setattr(weight, name, value)
    return weight


@pytest.mark.parametrize("replace, error, match", [
    (lambda tt: {"q_scale": tt["q_scale"].float()}, TypeError, r"q_scale: expected dtype int32, got float32"),
    (lambda tt: {"q_groups": tt["q_groups"][:2]}, ValueError, r"q_groups: expected shape \(16,\), got \(2,\)"),
    (lambda tt: {"q_invperm": tt["q_invperm"].flip(0)[:-1]}, ValueError, r"q_invperm: not a permutation"),
    (lambda tt: {"q_invperm": list(range(256))}, TypeError, r"q_invperm: expected a torch tensor, got list"),
    (lambda tt: {"q_weight": tt["q_weight"][0]}, ValueError, r"q_weight: expected a 2-D array, got shape \(64,\)"),
    (lambda tt: {"q_scale_max": torch.full((8,), float("nan"), dtype=torch.float16)}, ValueError,
     r"q_scale_max: expected finite values"),
])
def test_quant_linear_refuses_a_bad_exl2_weight_object_before_joining_layers(replace, error, match):
    tt, _, _ = _exl2(seed=50, bias=False)
    weight = _tgi_exl2(tt)
    good = ex.QuantLinear(weight, None)
    # the W the object means: its q_scale_max was divided by 256 in float16 (rounded where subnormal)
    w = reference.dequantize_exl2(tt["q_weight"], tt["q_invperm"], tt["q_scale"], weight.q_scale_max.float() * 256,
                                  tt["q_groups"])
    snap = _snapshot(tt)
    with pytest.raises(error, match=match):
        ex.QuantLinear(_exl2_object(tt, **replace(tt)), None)
    _assert_unchanged(tt, snap)
    assert ex.LAYERS == [good] and ex.FIXED_BYTES == good.temp_dq_size()
    assert ex.create_exllama_buffers() == {}  # the refused layer does not break the buffers of the others
    x = _x((3, 256), seed=50)
    torch.testing.assert_close(good(x), _expected(x, w, None), rtol=1e-5, atol=1e-5)


def test_quant_linear_refuses_a_gptq_weight_object_with_a_missing_tensor_or_unknown_format():
    tt, g_idx, gs, _, _ = _gptq("act_order", seed=51)
    lacking = _TgiGPTQWeight(tt["qweight"], tt["qzeros"], tt["scales"], g_idx, 4, gs)
    del lacking.qzeros
    with pytest.raises(TypeError, match=r"qzeros: expected a torch tensor, got NoneType"):
        ex.QuantLinear(lacking, None)
    odd_format = _TgiGPTQWeight(tt["qweight"], tt["qzeros"], tt["scales"], g_idx, 4, gs)
    odd_format.checkpoint_format = "gptq_v3"
    with pytest.raises(ValueError, match=r"checkpoint_format: expected one of \('gptq', 'gptq_v2'\), got 'gptq_v3'"):
        ex.QuantLinear(odd_format, None)
    assert ex.LAYERS == [] and ex.FIXED_BYTES == 0


def test_quant_linear_reads_a_gptq_v2_weight_object():
    t = quantize_gptq(_weight(256, 64, 52), bits=4, group_size=32, act_order=True, checkpoint_format="gptq_v2", seed=52)
    w = reference.dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits=4,
                                  checkpoint_format="gptq_v2")
    tt = {name: torch.from_numpy(a) for name, a in t.items()}
    weight = _TgiGPTQWeight(tt["qweight"], tt["qzeros"], tt["scales"], tt["g_idx"], 4, 32)
    weight.checkpoint_format = "gptq_v2"
    x = _x((3, 256), seed=52)
    torch.testing.assert_close(ex.QuantLinear(weight, None)(x), _expected(x, w, None), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("short, match", [
    ("q_scale", r"q_scale: expected shape \(8, 8\), got \(7, 8\)"),
    ("q_scale_max", r"q_scale_max: expected shape \(8,\), got \(7,\)"),
    ("q_groups", r"q_groups: expected shape \(16,\), got \(14,\)"),
])
def test_ext_make_q_matrix_names_the_exl2_tensor_with_the_odd_group_count(short, match):
    tt, _, _ = _exl2(seed=53, bias=False)
    w = dict(tt, **{short: tt[short][:-2] if short == "q_groups" else tt[short][:-1]})
    with pytest.raises(ValueError, match="layer.3: " + match):
        ex.ext_make_q_matrix(w, None, key="layer.3")


def test_forward_and_ext_gemm_refuse_an_x_that_is_not_a_torch_tensor():
    layer, w, b = _lorax_layer("act_order", seed=54)
    x = _x((2, 256), seed=54)
    match = r"x: expected a torch tensor \[\.\.\., in_features\], got numpy\.ndarray; convert NumPy arrays"
    with pytest.raises(TypeError, match=match):
        layer(x.numpy())
    with pytest.raises(TypeError, match=match):
        ex.ext_gemm_half_q_half(x.numpy(), layer._ensure_handle(), 64)
    with pytest.raises(TypeError, match=r"x: expected a torch tensor .*got builtins\.list"):
        layer(x.tolist())
    torch.testing.assert_close(layer(x), _expected(x, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("q_handle", ["layer.0", True, torch.zeros(3), {"qweight": None}])
def test_ext_gemm_names_q_handle_when_it_is_neither_a_matrix_nor_a_handle(q_handle):
    with pytest.raises(TypeError, match=r"q_handle: expected the cupyq\.QMatrix ext_make_q_matrix returned \(or its "
                                        rf"int handle\), got {type(q_handle).__name__}"):
        ex.ext_gemm_half_q_half(_x((2, 256), seed=55), q_handle, 64)


@pytest.mark.parametrize("bound, error", [("4096", TypeError), (2.5, TypeError), (True, TypeError), (0, ValueError),
                                          (-8, ValueError)])
def test_create_exllama_buffers_refuses_a_bad_token_bound_without_gpu_layers(bound, error):
    layer, w, b = _lorax_layer("trivial", seed=56)
    with pytest.raises(error, match="max_total_tokens"):
        ex.create_exllama_buffers(bound)
    ex.LAYERS.clear()
    with pytest.raises(error, match="max_total_tokens"):
        ex.create_exllama_buffers(bound)
    with pytest.raises(error, match="max_total_tokens"):
        ex.dequant_scratch_budget([], bound)
    assert ex.create_exllama_buffers(4096) == {} and ex.create_exllama_buffers(np.int64(16)) == {}
    x = _x((2, 256), seed=56)
    torch.testing.assert_close(layer(x), _expected(x, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("temp_dq", ["scratch", 4096, np.zeros(64, np.float16)])
def test_post_init_and_ext_make_q_matrix_refuse_a_temp_dq_of_the_wrong_type_on_the_cpu(temp_dq):
    layer, w, b = _lorax_layer("act_order", seed=57)
    match = rf"temp_dq: expected an ExLlamaV2DeviceTensors, a CUDA tensor or None, got {type(temp_dq).__name__}"
    with pytest.raises(TypeError, match=match):
        layer.post_init(temp_dq)
    with pytest.raises(TypeError, match=match):
        ex.ext_make_q_matrix(layer.q_tensors, temp_dq)
    assert layer.temp_dq is None
    layer.post_init(ex.ExLlamaV2DeviceTensors("cpu", 1024))  # the right types still bind (to nothing, on the CPU)
    x = _x((2, 256), seed=57)
    torch.testing.assert_close(layer(x), _expected(x, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("meta", ["qweight", "qzeros", "scales"])
def test_quant_linear_refuses_a_meta_weight_tensor_before_joining_layers(meta):
    tt, g_idx, gs, _, _ = _gptq("act_order", seed=58, bias=False)
    given = dict(tt, **{meta: tt[meta].to("meta")})
    match = rf"{meta}: expected the checkpoint's values, got a meta tensor \(no data\)"
    with pytest.raises(ValueError, match=match):
        ex.QuantLinear(given["qweight"], given["qzeros"], given["scales"], g_idx, None, 4, gs)
    with pytest.raises(ValueError, match=match):
        ex.QuantLinear(_TgiGPTQWeight(given["qweight"], given["qzeros"], given["scales"], g_idx, 4, gs), None)
    assert ex.LAYERS == [] and ex.create_exllama_buffers() == {}


@pytest.mark.parametrize("w", [None, torch.ones(4, 8, dtype=torch.int32)])
def test_ext_make_q_matrix_names_w_when_it_is_none_or_a_tensor(w):
    with pytest.raises(TypeError, match=rf"w: expected a mapping or a GPTQ/EXL2 weight object of tensors, "
                                        rf"got {type(w).__name__}"):
        ex.ext_make_q_matrix(w, None, key="layer.1")


def _q_perm_only(tt, q_perm):
    return {**{k: v for k, v in tt.items() if k != "q_invperm"}, "q_perm": q_perm}


@pytest.mark.parametrize("spoil, match", [
    (lambda p: torch.cat([p[1:2], p[1:]]), r"q_perm: not a permutation of 0\.\.255: some values repeat"),
    (lambda p: p + 1, r"q_perm: not a permutation of 0\.\.255: values range over \[1, 256\]"),
    (lambda p: p.float(), r"q_perm: expected dtype int16, uint16, int32 or int64, got float32"),
])
def test_a_q_perm_that_is_not_a_permutation_is_refused(spoil, match):
    tt, w, _ = _exl2(seed=59, bias=False)
    q_perm = torch.argsort(tt["q_invperm"].long()).to(torch.int32)
    x = _x((3, 256), seed=59)
    for good in (q_perm, q_perm.to(torch.int16), q_perm.long()):  # q_perm alone is enough, in any integer width
        qm = ex.ext_make_q_matrix(_q_perm_only(tt, good))
        torch.testing.assert_close(ex.ext_gemm_half_q_half(x, qm, 64), _expected(x, w, None), rtol=1e-5, atol=1e-5)
    bad = _q_perm_only(tt, spoil(q_perm))
    with pytest.raises((ValueError, TypeError), match="layer.2: " + match):
        ex.ext_make_q_matrix(bad, None, key="layer.2")
    weight = SimpleNamespace(**dict(bad, q_scale_max=tt["q_scale_max"] / 256))  # shaped like TGI's Exl2Weight
    with pytest.raises((ValueError, TypeError), match=match):
        ex.QuantLinear(weight, None)
    assert ex.LAYERS == []


def test_ext_make_q_matrix_without_g_idx_says_to_pass_g_idx_when_the_groups_are_not_a_power_of_two():
    t = quantize_gptq(_weight(256, 64, 60), bits=4, group_size=96, seed=60)  # groups of 96, 96 and 64 rows
    tt = {name: torch.from_numpy(a) for name, a in t.items()}
    w_dict = {"qweight": tt["qweight"], "qzeros": tt["qzeros"], "scales": tt["scales"]}
    with pytest.raises(ValueError, match=r"layer.4: g_idx: none given, so the layer is read with the power-of-two "
                                         r"group size 128 .* 2 groups for 256 input rows, but qzeros/scales have 3; "
                                         r"pass the checkpoint's g_idx"):
        ex.ext_make_q_matrix(w_dict, None, key="layer.4")
    w = reference.dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits=4)
    qm = ex.ext_make_q_matrix(dict(w_dict, g_idx=tt["g_idx"]), None)
    x = _x((2, 256), seed=60)
    torch.testing.assert_close(ex.ext_gemm_half_q_half(x, qm, 64), _expected(x, w, None), rtol=1e-5, atol=1e-5)
