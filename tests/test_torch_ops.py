"""cupyq.torch_ops: the cupyq::qgemm custom op, its handle registry and QuantizedLinear.

CPU tests run the float32 reference path through the op; GPU tests (marked ``gpu``) run the kernels,
also under torch.compile, CUDA-graph capture and a non-default stream. Every result is compared with
an independent float32 NumPy oracle: ``cupyq.reference`` dequantisation and matmul.
"""

from __future__ import annotations

import gc

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
