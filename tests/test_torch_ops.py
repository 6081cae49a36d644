"""cupyq.torch_ops: the cupyq::qgemm custom op, its handle registry and QuantizedLinear.

CPU tests run the float32 reference path through the op; GPU tests (marked ``gpu``) run the kernels,
also under torch.compile, CUDA-graph capture and a non-default stream. Every result is compared with
an independent float32 NumPy oracle: ``cupyq.reference`` dequantisation and matmul.
"""

from __future__ import annotations

import copy
import gc
import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cupyq import reference, torch_ops  # noqa: E402
from cupyq.quantize import quantize_exl2, quantize_gptq  # noqa: E402

# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _weight(k, n, seed):
    return np.random.default_rng(seed).normal(0.0, 0.05, size=(k, n)).astype(np.float32)


def _gptq_layer(k, n, *, seed, bits=4, group_size=32, act_order=False, bias=True):
    """(checkpoint tensors as NumPy, float32 reference W [K, N], bias or None)."""
    rng = np.random.default_rng(seed + 1000)
    b = rng.normal(0.0, 0.5, size=n).astype(np.float32) if bias else None
    t = quantize_gptq(_weight(k, n, seed), bits=bits, group_size=group_size, act_order=act_order, bias=b, seed=seed)
    w = reference.dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits=bits)
    return t, w, t.get("bias")


def _exl2_layer(k, n, *, seed, bits=(6, 4, 3), proportions=(0.25, 0.5, 0.25), bias=True):
    rng = np.random.default_rng(seed + 2000)
    b = rng.normal(0.0, 0.5, size=n).astype(np.float32) if bias else None
    t = quantize_exl2(_weight(k, n, seed), bits=bits, proportions=proportions, bias=b, seed=seed)
    w = reference.dequantize_exl2(t["q_weight"], t["q_invperm"], t["q_scale"], t["q_scale_max"], t["q_groups"])
    return t, w, t.get("bias")


def _to_torch(tensors, device):
    return {name: torch.from_numpy(np.ascontiguousarray(a)).to(device) for name, a in tensors.items()}


def _qmatrix(fmt, tensors, device):
    from cupyq.qmatrix import QMatrix

    t = _to_torch(tensors, device)
    if fmt == "gptq":
        return QMatrix.from_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], t.get("bias"), bits=4)
    return QMatrix.from_exl2(
        t["q_weight"], t["q_invperm"], t["q_scale"], t["q_scale_max"], t["q_groups"], t.get("bias")
    )


def _layer(fmt, k, n, seed, device="cpu", **kw):
    tensors, w, b = (_gptq_layer if fmt == "gptq" else _exl2_layer)(k, n, seed=seed, **kw)
    return _qmatrix(fmt, tensors, device), w, b


def _expected(x, w, b):
    return torch.from_numpy(reference.matmul(x.detach().cpu(), w, b))


def _assert_close_fp16(y, ref, *, max_rel=1e-2, rms_rel=2e-3):
    """Kernel output (float16) vs float32 oracle, errors relative to the output's scale.

    fp16 storage of the dequantised weights and of the output each contribute ~2**-11 relative error
    per element; fp32 accumulation adds little. So the worst element stays well below 1% of max|ref|
    and the RMS error below 0.2% of the RMS of ref.
    """
    y = y.detach().float().cpu()
    assert y.shape == ref.shape
    assert torch.isfinite(y).all()
    diff = (y - ref).abs()
    scale = ref.abs().max().item()
    assert diff.max().item() <= max_rel * scale, (diff.max().item(), scale)
    assert diff.norm().item() <= rms_rel * ref.norm().item(), (diff.norm().item(), ref.norm().item())


class _Dummy:
    """Smallest object the registry accepts (it needs only the two feature counts)."""

    def __init__(self, k=64, n=32):
        self.in_features = k
        self.out_features = n


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------


def test_register_is_stable_and_weak():
    obj = _Dummy()
    h = torch_ops.register_qmatrix(obj)
    assert isinstance(h, int)
    assert torch_ops.register_qmatrix(obj) == h
    assert torch_ops.lookup_qmatrix(h) is obj
    assert h in torch_ops.registered_handles()
    other = _Dummy()
    assert torch_ops.register_qmatrix(other) != h
    del obj
    gc.collect()
    assert h not in torch_ops.registered_handles()
    with pytest.raises(ValueError, match="handle"):
        torch_ops.lookup_qmatrix(h)


def test_handles_are_never_reused():
    seen = set()
    for _ in range(20):
        obj = _Dummy()
        h = torch_ops.register_qmatrix(obj)
        assert h not in seen
        seen.add(h)
        del obj  # freed at once by reference counting; its entry goes with it


def test_unregister():
    obj = _Dummy()
    h = torch_ops.register_qmatrix(obj)
    torch_ops.unregister_qmatrix(h)
    with pytest.raises(ValueError):
        torch_ops.lookup_qmatrix(h)
    torch_ops.unregister_qmatrix(h)  # already gone: no error
    assert torch_ops.register_qmatrix(obj) != h


def test_register_rejects_non_matrix():
    with pytest.raises(TypeError, match="qm"):
        torch_ops.register_qmatrix(object())


def test_op_is_registered():
    assert torch_ops.HAS_CUSTOM_OP
    assert torch_ops.qgemm is torch.ops.cupyq.qgemm.default
    schema = str(torch.ops.cupyq.qgemm.default._schema)
    assert schema == "cupyq::qgemm(Tensor x, int handle, bool force_cuda) -> Tensor"
    assert "bool force_cuda" in schema


# --------------------------------------------------------------------------------------------
# op on the CPU
# --------------------------------------------------------------------------------------------


def test_fake_shapes_and_dtype():
    from torch._subclasses.fake_tensor import FakeTensorMode

    qm, _, _ = _layer("gptq", 64, 48, seed=0)
    h = torch_ops.register_qmatrix(qm)
    with FakeTensorMode():
        for shape, dtype in (((5, 64), torch.float16), ((2, 3, 64), torch.float32), ((64,), torch.bfloat16)):
            y = torch.ops.cupyq.qgemm(torch.empty(shape, dtype=dtype), h, False)
            assert tuple(y.shape) == shape[:-1] + (48,)
            assert y.dtype == dtype
        with pytest.raises(ValueError, match="x: expected shape"):
            torch.ops.cupyq.qgemm(torch.empty(4, 63), h, False)
        # The modules' entry point routes fake tensors through the op (its fake), never the real path.
        y = torch_ops.apply_qgemm(torch.empty(3, 64, dtype=torch.float16), h, False)
        assert tuple(y.shape) == (3, 48) and y.dtype == torch.float16


def test_apply_qgemm_matches_op():
    qm, _, _ = _layer("exl2", 64, 32, seed=9)
    h = torch_ops.register_qmatrix(qm)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(9))
    assert torch.equal(torch_ops.apply_qgemm(x, h, False), torch.ops.cupyq.qgemm(x, h, False))


@pytest.mark.parametrize("dtype,requires_grad", [(torch.float32, False), (torch.float16, False), (torch.float32, True)])
def test_opcheck(dtype, requires_grad):
    qm, _, _ = _layer("gptq", 64, 32, seed=1)
    h = torch_ops.register_qmatrix(qm)
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_(requires_grad)
    result = torch.library.opcheck(torch.ops.cupyq.qgemm.default, (x, h, False))
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("fmt", ["gptq", "exl2"])
def test_gradient_flows_to_x(fmt):
    qm, w, b = _layer(fmt, 64, 32, seed=8)
    layer = torch_ops.QuantizedLinear(qm)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(4, 64, generator=gen, requires_grad=True)
    g = torch.randn(4, 32, generator=gen)
    (layer(x) * g).sum().backward()
    # Backward on the CPU uses the float32 reference W, as forward does: only summation order differs.
    expected = g @ torch.from_numpy(w).t()
    scale = expected.abs().max().item()
    torch.testing.assert_close(x.grad, expected, rtol=1e-5, atol=1e-5 * scale)


def test_op_rejects_bad_input():
    qm, _, _ = _layer("gptq", 64, 32, seed=2)
    h = torch_ops.register_qmatrix(qm)
    with pytest.raises(ValueError, match=r"x: expected shape \[\.\.\., 64\]"):
        torch.ops.cupyq.qgemm(torch.randn(3, 65), h, False)
    with pytest.raises(TypeError, match="x: expected a floating dtype"):
        torch.ops.cupyq.qgemm(torch.ones(3, 64, dtype=torch.int32), h, False)
    with pytest.raises(ValueError, match="handle"):
        torch.ops.cupyq.qgemm(torch.randn(3, 64), 10**9, False)


# --------------------------------------------------------------------------------------------
# QuantizedLinear on the CPU
# --------------------------------------------------------------------------------------------

CPU_CASES = [
    ("gptq", dict(group_size=32, act_order=False)),
    ("gptq", dict(group_size=32, act_order=True)),
    ("gptq", dict(group_size=-1, bias=False)),
    ("exl2", dict()),
    ("exl2", dict(bits=(8, 2), proportions=(0.5, 0.5), bias=False)),
]


@pytest.mark.parametrize("fmt,kw", CPU_CASES)
def test_quantized_linear_cpu_matches_reference(fmt, kw):
    qm, w, b = _layer(fmt, 128, 64, seed=3, **kw)
    layer = torch_ops.QuantizedLinear(qm)
    assert (layer.in_features, layer.out_features) == (128, 64)
    x = torch.from_numpy(np.random.default_rng(3).normal(size=(2, 5, 128)).astype(np.float32))
    with torch.no_grad():
        y = layer(x)
    assert y.dtype == torch.float32 and y.shape == (2, 5, 64)
    # Same float32 arithmetic on both sides: only summation order may differ.
    torch.testing.assert_close(y, _expected(x, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_quantized_linear_cpu_keeps_dtype(dtype):
    qm, w, b = _layer("gptq", 64, 32, seed=4)
    layer = torch_ops.QuantizedLinear(qm)
    x = torch.from_numpy(np.random.default_rng(4).normal(size=(7, 64)).astype(np.float32)).to(dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (7, 32)
    ref = _expected(x, w, b)
    # Only the final rounding to dtype differs from the float32 oracle (half an ulp: 2**-11 / 2**-8).
    eps = torch.finfo(dtype).eps
    assert ((y.float() - ref).abs() <= eps * ref.abs() + 1e-6).all()


def test_quantized_linear_keeps_matrix_alive():
    qm, w, b = _layer("exl2", 64, 32, seed=5)
    layer = torch_ops.QuantizedLinear(qm)
    h = layer.handle
    del qm
    gc.collect()
    assert torch_ops.lookup_qmatrix(h) is layer.qmatrix
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(layer(x), _expected(x, w, b), rtol=1e-5, atol=1e-5)
    del layer
    gc.collect()
    assert h not in torch_ops.registered_handles()


def test_quantized_linear_repr_and_shape_errors():
    qm, _, _ = _layer("gptq", 64, 32, seed=6)
    layer = torch_ops.QuantizedLinear(qm)
    text = repr(layer)
    assert "in_features=64" in text and "out_features=32" in text and "format=gptq" in text
    with pytest.raises(ValueError, match="x: expected shape"):
        layer(torch.randn(2, 32))


class _TwoLayers(torch.nn.Module):
    def __init__(self, a, b):
        super().__init__()
        self.up = torch_ops.QuantizedLinear(a)
        self.down = torch_ops.QuantizedLinear(b)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.up(x)) * 0.5) + 1.0


def _two_layer_model(seed, device="cpu"):
    qa, wa, ba = _layer("gptq", 64, 96, seed=seed, device=device, act_order=True)
    qb, wb, bb = _layer("exl2", 96, 64, seed=seed + 1, device=device)

    def oracle(x):
        h = _expected(x, wa, ba).to(x.dtype).float()
        h = (torch.nn.functional.silu(h) * 0.5).to(x.dtype)
        return _expected(h, wb, bb) + 1.0

    return _TwoLayers(qa, qb), oracle


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compile_fullgraph_cpu(backend):
    torch._dynamo.reset()
    model, oracle = _two_layer_model(7)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for shape in ((4, 64), (2, 9, 64)):  # a second shape exercises the fake under dynamic shapes
            x = torch.randn(shape, generator=gen)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(compiled(x), oracle(x), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------
# QuantizedLinear: the matrix it holds (pickling, copies, reassignment), tracing, meta, backward
# --------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def _randn(shape, seed, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _assert_computes_with(layer, w, b, seed):
    x = _randn((3, layer.in_features), seed)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _expected(x, w, b), rtol=1e-5, atol=1e-5)


_LOAD_IN_A_NEW_PROCESS = """
import sys, numpy as np, torch
from cupyq import QMatrix
from cupyq.quantize import quantize_gptq
from cupyq.torch_ops import QuantizedLinear
g = quantize_gptq(np.random.default_rng(99).normal(size=(64, 32)).astype(np.float32), bits=4, group_size=32)
other = QuantizedLinear(QMatrix.from_gptq(g["qweight"], g["qzeros"], g["scales"], g["g_idx"], bits=4))
saved = torch.load(sys.argv[1], weights_only=False)
with torch.no_grad():
    torch.save({"y": saved["layer"](saved["x"]), "handles": (saved["layer"].handle, other.handle)}, sys.argv[2])
"""


def test_torch_load_in_a_new_process_computes_with_the_saved_matrix(tmp_path):
    qm, w, b = _layer("gptq", 64, 32, seed=20)
    x = _randn((4, 64), 20)
    torch.save({"layer": torch_ops.QuantizedLinear(qm), "x": x}, tmp_path / "layer.pt")
    # The new process registers a matrix of its own first, so the saving process's handle names that one there.
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", _LOAD_IN_A_NEW_PROCESS, str(tmp_path / "layer.pt"),
                           str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    out = torch.load(tmp_path / "out.pt")
    loaded_handle, other_handle = out["handles"]
    assert loaded_handle != other_handle
    torch.testing.assert_close(out["y"], _expected(x, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["gptq", "exl2"])
def test_unpickled_layer_registers_its_own_matrix(fmt):
    qm, w, b = _layer(fmt, 64, 32, seed=21)
    layer = torch_ops.QuantizedLinear(qm)
    back = pickle.loads(pickle.dumps(layer))
    assert back.qmatrix is not qm and back.handle != layer.handle
    assert torch_ops.lookup_qmatrix(back.handle) is back.qmatrix
    del layer, qm
    gc.collect()
    _assert_computes_with(back, w, b, seed=21)
    assert "format=" + fmt in repr(back)


def test_deepcopy_is_independent_of_the_original():
    qm, w, b = _layer("gptq", 64, 32, seed=22, act_order=True)
    model = torch.nn.Sequential(torch_ops.QuantizedLinear(qm), torch.nn.LayerNorm(32))
    dup = copy.deepcopy(model)
    assert dup[0] is not model[0] and dup[0].qmatrix is qm  # the matrix is shared, never modified
    assert torch_ops.lookup_qmatrix(dup[0].handle) is dup[0].qmatrix
    assert dup[1].weight is not model[1].weight  # everything else is copied
    x = _randn((3, 64), 22)
    with torch.no_grad():
        expected = model(x)
    del model, qm
    gc.collect()
    with torch.no_grad():
        assert torch.equal(dup(x), expected)
    _assert_computes_with(dup[0], w, b, seed=23)


def test_assigning_a_matrix_switches_forward_to_it():
    qm, _, _ = _layer("gptq", 64, 32, seed=24)
    qm2, w2, b2 = _layer("exl2", 64, 32, seed=25)
    layer = torch_ops.QuantizedLinear(qm)
    layer.qmatrix = qm2
    del qm, qm2
    gc.collect()
    assert torch_ops.lookup_qmatrix(layer.handle) is layer.qmatrix
    _assert_computes_with(layer, w2, b2, seed=24)
    with pytest.raises(TypeError, match="qm: expected a cupyq.QMatrix"):
        layer.qmatrix = object()
    _assert_computes_with(layer, w2, b2, seed=26)  # a refused assignment changes nothing


def _gpu_matrix_stand_in():
    """A GpuQMatrix as the registry and the module see it, without a GPU (nothing on it is launched)."""
    from cupyq.qmatrix import GpuQMatrix

    qm = object.__new__(GpuQMatrix)
    qm.device_id, qm.input_kind, qm.in_features, qm.out_features = 0, "torch", 64, 32
    return qm


def test_gpu_matrix_refuses_pickling_and_says_how_to_save():
    qm = _gpu_matrix_stand_in()
    layer = torch_ops.QuantizedLinear(qm)
    for target in (qm, layer, torch.nn.Sequential(layer)):
        with pytest.raises(TypeError, match=r"cuda:0 cannot be pickled.*save_gptq / save_exl2 / save_awq"):
            pickle.dumps(target)
    with pytest.raises(TypeError, match="cannot be pickled"):
        torch.save(layer, io.BytesIO())
    dup = copy.deepcopy(layer)  # a deep copy of the module shares the matrix instead
    assert dup.qmatrix is qm and dup.handle == layer.handle


@pytest.mark.filterwarnings("ignore:`torch.jit.trace:DeprecationWarning")
def test_jit_trace_records_the_op():
    model, oracle = _two_layer_model(27)
    with torch.no_grad():
        traced = torch.jit.trace(model, _randn((4, 64), 27), check_trace=False)
    assert str(traced.inlined_graph).count("cupyq::qgemm") == 2  # one node per layer
    for shape, seed in (((4, 64), 28), ((9, 64), 29), ((2, 3, 64), 30)):
        x = _randn(shape, seed)
        with torch.no_grad():
            y = traced(x)
        assert y.shape == shape[:-1] + (64,)
        torch.testing.assert_close(y, model(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y, oracle(x), rtol=1e-4, atol=1e-4)


def test_meta_inputs_give_meta_outputs():
    qm, _, _ = _layer("exl2", 64, 48, seed=31)
    layer = torch_ops.QuantizedLinear(qm)
    for shape, dtype in (((3, 64), torch.float32), ((2, 5, 64), torch.float16), ((64,), torch.bfloat16)):
        y = layer(torch.empty(shape, dtype=dtype, device="meta"))
        assert y.is_meta and y.dtype == dtype and tuple(y.shape) == shape[:-1] + (48,)
    with pytest.raises(ValueError, match=r"x: expected shape \[\.\.\., 64\]"):
        layer(torch.empty(3, 65, device="meta"))
    model, _ = _two_layer_model(32)
    model.to("meta")  # no parameter to move: the whole forward runs on meta tensors
    y = model(torch.empty(7, 64, device="meta"))
    assert y.is_meta and tuple(y.shape) == (7, 64)


@pytest.mark.parametrize("fmt,kw", [("gptq", dict(act_order=True)), ("exl2", dict())])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_backward_matches_an_fp32_dense_twin(fmt, kw, dtype):
    qm, _, b = _layer(fmt, 256, 128, seed=33, **kw)
    w = torch.from_numpy(qm.reference_weight())  # the float32 W the CPU forward multiplies by
    dense = torch.nn.Linear(256, 128, bias=b is not None)
    with torch.no_grad():
        dense.weight.copy_(w.t())
        if b is not None:
            dense.bias.copy_(torch.from_numpy(b.astype(np.float32)))
    layer = torch_ops.QuantizedLinear(qm)
    x = _randn((5, 256), 33, dtype).requires_grad_()
    x_dense = x.detach().float().requires_grad_()
    g = _randn((5, 128), 34, dtype)
    (layer(x) * g).sum().backward()
    (dense(x_dense) * g.float()).sum().backward()
    assert x.grad.dtype == dtype
    # Both are float32 sums of 128 products of the same numbers in another order: relative differences of a few
    # float32 ulps (~1e-7 each, ~1e-6 in the worst element); W rounded to float16 would be off by ~3e-4.
    error = (x.grad.float() - x_dense.grad).norm() / x_dense.grad.norm()
    assert error.item() < 1e-5, error.item()


# --------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------


def _cuda_x(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(torch.float16).cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("fmt,kw", CPU_CASES)
@pytest.mark.parametrize("m", [1, 7, 33, 130])
def test_quantized_linear_cuda_matches_reference(fmt, kw, m):
    qm, w, b = _layer(fmt, 256, 128, seed=m, device="cuda", **kw)
    layer = torch_ops.QuantizedLinear(qm)
    x = _cuda_x((m, 256), seed=m)
    y = layer(x)
    assert y.is_cuda and y.dtype == torch.float16 and y.shape == (m, 128)
    _assert_close_fp16(y, _expected(x, w, b))


@pytest.mark.gpu
def test_quantized_linear_cuda_force_cuda():
    qm, w, b = _layer("gptq", 256, 128, seed=11, device="cuda", act_order=True)
    layer = torch_ops.QuantizedLinear(qm, force_cuda=True)
    x = _cuda_x((3, 70, 256), seed=11)
    _assert_close_fp16(layer(x), _expected(x, w, b))


@pytest.mark.gpu
def test_compile_fullgraph_cuda():
    torch._dynamo.reset()
    model, oracle = _two_layer_model(12, device="cuda")
    compiled = torch.compile(model, fullgraph=True)
    for m in (1, 5, 80):
        x = _cuda_x((m, 64), seed=m)
        y = compiled(x)
        assert y.dtype == torch.float16
        _assert_close_fp16(y, oracle(x), max_rel=2e-2, rms_rel=4e-3)  # two layers, fp16 in between


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 8, 100])
def test_cuda_graph_capture_and_replay(m):
    model, oracle = _two_layer_model(13, device="cuda")
    static_x = _cuda_x((m, 64), seed=0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up: compiles and loads every kernel before capture
        for _ in range(2):
            model(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = model(static_x)
    for seed in (21, 22):
        fresh = _cuda_x((m, 64), seed=seed)
        static_x.copy_(fresh)
        static_y.fill_(float("nan"))  # poison: replay must overwrite every element
        graph.replay()
        torch.cuda.synchronize()
        _assert_close_fp16(static_y, oracle(fresh), max_rel=2e-2, rms_rel=4e-3)


@pytest.mark.gpu
def test_non_default_stream():
    qm, w, b = _layer("exl2", 256, 128, seed=14, device="cuda")
    layer = torch_ops.QuantizedLinear(qm)
    x = _cuda_x((40, 256), seed=14)
    layer(x)  # warm up on the default stream
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.cuda._sleep(10_000_000)  # keep the stream busy: work on the wrong stream would read early
        x2 = x * 2
        y = layer(x2)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    _assert_close_fp16(y, _expected(x2, w, b))


@pytest.mark.gpu
def test_gradient_flows_to_x_cuda():
    qm, w, _ = _layer("exl2", 256, 128, seed=15, device="cuda")
    layer = torch_ops.QuantizedLinear(qm)
    x = _cuda_x((5, 256), seed=15).requires_grad_()
    g = _cuda_x((5, 128), seed=16)
    (layer(x) * g).sum().backward()
    assert x.grad.dtype == torch.float16
    _assert_close_fp16(x.grad, g.float().cpu() @ torch.from_numpy(w).t())


@pytest.mark.gpu
def test_gpu_layer_refuses_pickling_and_deepcopy_shares_its_matrix():
    qm, w, b = _layer("gptq", 256, 128, seed=35, device="cuda", act_order=True)
    layer = torch_ops.QuantizedLinear(qm)
    with pytest.raises(TypeError, match=r"cannot be pickled.*save_gptq"):
        torch.save(layer, io.BytesIO())
    dup = copy.deepcopy(layer)
    assert dup.qmatrix is qm
    del layer, qm
    gc.collect()
    x = _cuda_x((7, 256), seed=35)
    _assert_close_fp16(dup(x), _expected(x, w, b))


@pytest.mark.filterwarnings("ignore:`torch.jit.trace:DeprecationWarning")
@pytest.mark.gpu
def test_jit_trace_records_the_op_cuda():
    qm, w, b = _layer("exl2", 256, 128, seed=36, device="cuda")
    layer = torch_ops.QuantizedLinear(qm)
    with torch.no_grad():
        traced = torch.jit.trace(layer, _cuda_x((4, 256), seed=36), check_trace=False)
        assert "cupyq::qgemm" in str(traced.graph)
        x = _cuda_x((9, 256), seed=37)
        _assert_close_fp16(traced(x), _expected(x, w, b))
