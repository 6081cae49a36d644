"""The per-call host path of eager torch calls: gemm's cached fast path per (matrix, x.shape, x.dtype), the launch
plan's workspace binding, the launcher, and scripts/host_breakdown.py.

CPU tests drive the fast path with a stand-in launch plan whose launcher records instead of launching (the
script's ``stand_in_fast_path``) on a CPU matrix, so that routing and fall-back are checked without a GPU; GPU
tests (marked ``gpu``) check the fast path's results against the float32 reference (tolerance as in
test_gpu_kernels.py: fp16 weights and output, fp32 accumulation), that it keeps every check of the checked path,
streams, CUDA-graph capture, the torch modules, and that steady-state calls allocate nothing.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import cupyq  # noqa: E402
from cupyq import dispatch, launch, plans, reference, scratch, torch_ops  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "host_breakdown.py"
REL_TOL = 4e-3


def _script():
    spec = importlib.util.spec_from_file_location("host_breakdown", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _gptq_tensors(rng, k, n, act_order=False):
    from cupyq.formats import gptq as G

    q = rng.integers(0, 16, size=(k, n))
    zeros = rng.integers(0, 16, size=(k // 128, n))
    scales = (rng.uniform(0.5, 1.5, size=(k // 128, n)) * 0.003).astype(np.float16)
    g_idx = ((rng.permutation(k) if act_order else np.arange(k)) // 128).astype(np.int32)
    return dict(qweight=G.pack_qweight(q, 4), qzeros=G.pack_qzeros(zeros, 4), scales=scales, g_idx=g_idx)


def _ref_weight(t):
    return reference.dequantize_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits=4)


# ------------------------------------------------------------------------------------------------ CPU
def test_dry_run_script(tmp_path):
    pytest.importorskip("cupy_backends.cuda.api.driver")  # the launcher binds the driver's launch when it is made
    report_path = tmp_path / "breakdown.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--rounds", "1", "--calls", "500", "--json",
                           str(report_path)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(report_path.read_text())
    assert report["mode"] == "dry-run" and report["shape"] == {"k": 4096, "n": 4096, "m": 1}
    steps = {row["step"]: row for row in report["steps"]}
    for step in ("x.get_device()", "lock acquire + release", "launch._launch_plan", "cupyq.gemm(x, qm, out=out)",
                 "cupyq.gemm(x, qm)", "QuantizedLinear.forward(x)", "tiny op small.add_(0)"):
        assert steps[step]["us"] is not None and steps[step]["us"] > 0, steps[step]
    assert "cupyq.gemm(x, qm, out=out)" in done.stdout


@pytest.fixture
def routed(monkeypatch):
    """(CPU matrix with a stand-in fast path for x's shape and fp16, x, launches recorded as (stream, x, out))."""
    pytest.importorskip("cupy_backends.cuda.api.driver")
    monkeypatch.setattr(dispatch, "_Tensor", torch.Tensor)
    monkeypatch.setattr(launch, "_device_count", 1)
    t = _gptq_tensors(np.random.default_rng(3), 256, 64)
    qm = cupyq.QMatrix.from_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits=4)
    x = torch.from_numpy(np.random.default_rng(4).standard_normal((3, 256)).astype(np.float16))
    launches = []

    def record(stream_ptr, params_ptr, flags):
        launches.append((stream_ptr, plan.x.value, plan.out.value))

    stand_in, plan = _script().stand_in_fast_path(torch, x, 64, record)
    qm._fast_paths = stand_in._fast_paths
    return qm, x, launches


def test_fast_path_launches_with_the_tensors_pointers(routed):
    qm, x, launches = routed
    out = torch.empty(3, 64, dtype=torch.float16)
    assert cupyq.gemm(x, qm, out=out) is out
    assert launches == [(0, x.data_ptr(), out.data_ptr())]
    y = cupyq.gemm(x, qm)
    assert y.shape == (3, 64) and y.dtype == torch.float16 and y.is_contiguous()
    assert launches[-1] == (0, x.data_ptr(), y.data_ptr())
    y = torch_ops.QuantizedLinear(qm)(x)
    assert launches[-1] == (0, x.data_ptr(), y.data_ptr()) and len(launches) == 3


@pytest.mark.filterwarnings("ignore:cupyq. no GPU kernel ran")
@pytest.mark.parametrize("case, make_out, exc_type, match", [
    ("out-dtype", lambda: torch.empty(3, 64, dtype=torch.float32), TypeError, r"out: expected dtype torch.float16"),
    ("out-shape", lambda: torch.empty(3, 65, dtype=torch.float16), ValueError, r"out: expected shape \(3, 64\)"),
    ("out-dims", lambda: torch.empty(1, 3, 64, dtype=torch.float16), ValueError, r"out: expected shape \(3, 64\)"),
    ("out-strided", lambda: torch.empty(64, 3, dtype=torch.float16).t(), ValueError, r"out: expected a contiguous"),
])
def test_fast_path_hands_bad_outputs_to_the_checked_path(routed, case, make_out, exc_type, match):
    qm, x, launches = routed
    out = make_out()
    with pytest.raises(exc_type, match=match):
        cupyq.gemm(x, qm, out=out)
    assert launches == []


@pytest.mark.filterwarnings("ignore:cupyq. no GPU kernel ran")
def test_fast_path_hands_strided_x_to_the_checked_path(routed):
    qm, x, launches = routed
    strided = torch.empty(3, 512, dtype=torch.float16)[:, ::2]
    strided.copy_(x)
    assert strided.shape == x.shape and not strided.is_contiguous()
    y = cupyq.gemm(strided, qm)  # the checked path: here the CPU reference (a GPU matrix raises "contiguous")
    assert launches == []
    expected = qm.reference_product(x.float().numpy())
    np.testing.assert_allclose(y.float().numpy(), expected, rtol=2 ** -10, atol=1e-3)


class _FakeArray:
    def __init__(self, ptr):
        self.data = type("Ptr", (), {"ptr": ptr})()


class _CountingWorkspace:
    """Workspace stand-in: counts ensure() calls, hands out the given pointers, has a version like Workspace."""

    def __init__(self, partials_ptr, counters_ptr):
        self.version, self.calls = 0, 0
        self.buffers = (_FakeArray(partials_ptr), _FakeArray(counters_ptr))

    def ensure(self, partial_floats, counters, capturing):
        self.calls += 1
        return self.buffers


def test_launch_plan_binds_a_workspace_once_per_version(monkeypatch):
    pytest.importorskip("cupy_backends.cuda.api.driver")
    monkeypatch.setattr(launch, "_device_count", 1)
    x = torch.empty(1, 256, dtype=torch.float16)
    stand_in, plan = _script().stand_in_fast_path(torch, x, 64, lambda *args: None)
    plan.partial_floats, plan.counters_n = 1024, 16
    stream = type("Stream", (), {"ptr": 0})()
    a, b = _CountingWorkspace(4096, 8192), _CountingWorkspace(12288, 16384)

    def call(ws):
        launch._launch_plan(stand_in, plan, 256, 512, 1, "__half", stream, lambda: False, ws)
        return ws.calls, plan.ws.value, plan.counters.value

    assert call(a) == (1, 4096, 8192)
    assert call(a) == (1, 4096, 8192)  # bound already: no ensure
    assert call(b) == (1, 12288, 16384)  # another stream's workspace
    assert call(a) == (2, 4096, 8192)
    a.version += 1  # a's buffers were replaced
    a.buffers = (_FakeArray(20480), _FakeArray(24576))
    assert call(a) == (3, 20480, 24576)
    assert (plan.x.value, plan.out.value) == (256, 512)


def test_launcher_calls_the_driver_with_its_arguments_in_order(monkeypatch):
    driver = pytest.importorskip("cupy_backends.cuda.api.driver")
    calls = []
    monkeypatch.setattr(driver, "launchKernel", lambda *args: calls.append(args))
    kernel = type("Kernel", (), {"kernel": type("Ptr", (), {"ptr": 1234})()})()
    launcher = plans._Launcher(kernel, (3, 2, 1), (256, 1, 1), 4096, ("x", "M"), {"x": 7, "M": 5}, {"M"})
    launcher.launch(99)
    assert calls == [(1234, 3, 2, 1, 256, 1, 1, 4096, 99, launcher.params_ptr, 0)]
    assert launcher.slot("x").value == 7 and launcher.slot("M").value == 5


def test_package_attributes_are_kept_after_the_first_lookup():
    gemm = cupyq.gemm
    assert vars(cupyq)["gemm"] is gemm is dispatch.gemm


# ------------------------------------------------------------------------------------------------ GPU
K, N = 1024, 256


def _gpu_matrix(seed, act_order):
    t = _gptq_tensors(np.random.default_rng(seed), K, N, act_order)
    qm = cupyq.QMatrix.from_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits=4, device=0)
    return qm, _ref_weight(t).astype(np.float64)


def _rel(y, x, w):
    ref = x.double().cpu().numpy().reshape(-1, K) @ w
    got = y.double().cpu().numpy().reshape(-1, N)
    assert np.isfinite(got).all(), "unwritten (NaN) outputs"
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def _x(gen, shape):
    return torch.randn(shape, device="cuda", dtype=torch.float16, generator=gen)


def _poisoned(shape):
    return torch.full(shape, float("nan"), device="cuda", dtype=torch.float16)


@pytest.mark.gpu
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("shape", [(1, K), (5, K), (12, K), (40, K), (2, 3, K)])
def test_fast_path_matches_reference(act_order, shape):
    qm, w = _gpu_matrix(50 + len(shape) + shape[0], act_order)
    gen = torch.Generator(device="cuda").manual_seed(shape[0])
    key = (torch.Size(shape), torch.float16)
    x0 = _x(gen, shape)
    assert key not in qm._fast_paths
    y0 = cupyq.gemm(x0, qm)  # the checked path, which leaves a fast path behind
    assert key in qm._fast_paths
    assert _rel(y0, x0, w) < REL_TOL
    for _ in range(3):
        x = _x(gen, shape)
        out = _poisoned(shape[:-1] + (N,))
        assert cupyq.gemm(x, qm, out=out) is out
        assert _rel(out, x, w) < REL_TOL
        y = cupyq.gemm(x, qm)
        assert y.shape == out.shape and y.dtype == torch.float16 and y.is_contiguous()
        assert _rel(y, x, w) < REL_TOL


@pytest.mark.gpu
def test_fast_path_keeps_the_checks():
    qm, w = _gpu_matrix(60, True)
    gen = torch.Generator(device="cuda").manual_seed(60)
    x = _x(gen, (3, K))
    cupyq.gemm(x, qm, out=_poisoned((3, N)))
    assert (x.shape, x.dtype) in qm._fast_paths
    strided = torch.empty(3, 2 * K, device="cuda", dtype=torch.float16)[:, ::2]
    cases = [
        ((strided, None), ValueError, "x: expected a contiguous tensor"),
        ((x, _poisoned((3, N)).float()), TypeError, "out: expected dtype torch.float16"),
        ((x, _poisoned((3, N + 1))), ValueError, r"out: expected shape \(3, 256\)"),
        ((x, _poisoned((1, 3, N))), ValueError, r"out: expected shape \(3, 256\)"),
        ((x, _poisoned((N, 3)).t()), ValueError, "out: expected a contiguous"),
        ((x, torch.full((3, N), float("nan"), dtype=torch.float16)), ValueError, "out: expected a tensor on cuda:0"),
        ((x.cpu(), None), ValueError, "x: the matrix lives on cuda:0"),
    ]
    for (xx, out), exc_type, match in cases:
        with pytest.raises(exc_type, match=match):
            cupyq.gemm(xx, qm, out=out)
        if out is not None:
            torch.cuda.synchronize()
            assert torch.isnan(out.float()).all(), match  # nothing written
    out = _poisoned((3, N))
    assert _rel(cupyq.gemm(x, qm, out=out), x, w) < REL_TOL


@pytest.mark.gpu
def test_fast_path_follows_the_current_stream():
    qm, w = _gpu_matrix(61, True)
    gen = torch.Generator(device="cuda").manual_seed(61)
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    cases = []
    for _ in range(3):
        for s in streams:
            with torch.cuda.stream(s):
                torch.cuda._sleep(1_000_000)  # a busy stream: a launch on the wrong one would read x too early
                x = _x(gen, (5, K))
                out = _poisoned((5, N))
                cupyq.gemm(x, qm, out=out)
                cases.append((x, out))
    torch.cuda.synchronize()
    assert max(_rel(out, x, w) for x, out in cases) < REL_TOL
    path = qm._fast_paths[(torch.Size((5, K)), torch.float16)]
    for s in streams:
        stream, ws = path.streams[s.cuda_stream]
        assert stream.ptr == s.cuda_stream and ws is scratch.workspace(0, s.cuda_stream)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [3, 12])
def test_fast_path_under_cuda_graph_capture(m):
    qm, w = _gpu_matrix(62 + m, True)
    gen = torch.Generator(device="cuda").manual_seed(62)
    static_x = _x(gen, (m, K))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # the checked call, then the fast path
            cupyq.gemm(static_x, qm)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = cupyq.gemm(static_x, qm)
    for _ in range(2):
        static_x.copy_(_x(gen, (m, K)))
        static_y.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert _rel(static_y, static_x, w) < REL_TOL


@pytest.mark.gpu
def test_modules_and_op_take_the_fast_path(monkeypatch):
    from cupyq import exllamav2

    qm, w = _gpu_matrix(63, False)
    gen = torch.Generator(device="cuda").manual_seed(63)
    layer = torch_ops.QuantizedLinear(qm)
    x = _x(gen, (4, K))
    layer(x)  # the checked path, once

    def checked(*args):
        raise AssertionError("the checked path ran again")

    monkeypatch.setattr(dispatch, "_gemm_torch", checked)
    with torch.no_grad():
        results = [layer(x), layer.forward(x), torch.ops.cupyq.qgemm(x, layer.handle, False),
                   exllamav2.ext_gemm_half_q_half(x, qm, N), torch_ops.apply_qgemm(x, layer.handle)]
    ptrs = {y.data_ptr() for y in results}
    assert len(ptrs) == len(results)  # fresh outputs, never a shared or reused buffer
    for y in results:
        assert y.shape == (4, N) and y.dtype == torch.float16 and y.is_contiguous()
        assert _rel(y, x, w) < REL_TOL


@pytest.mark.gpu
def test_steady_state_calls_allocate_nothing():
    import cupy

    qm, w = _gpu_matrix(64, True)  # act-order: gathered activations and split-K partials
    gen = torch.Generator(device="cuda").manual_seed(64)
    x = _x(gen, (2, K))
    out = _poisoned((2, N))
    for _ in range(2):
        cupyq.gemm(x, qm, out=out)
        cupyq.gemm(x, qm)
    torch.cuda.synchronize()
    ws = scratch.workspace(0, torch.cuda.current_stream().cuda_stream)
    before = (torch.cuda.memory_allocated(), cupy.get_default_memory_pool().used_bytes(), len(scratch._retired),
              ws.version, ws.sizes(), len(qm._plans), len(qm._fast_paths))
    for _ in range(50):
        cupyq.gemm(x, qm, out=out)
        cupyq.gemm(x, qm)
    torch.cuda.synchronize()
    after = (torch.cuda.memory_allocated(), cupy.get_default_memory_pool().used_bytes(), len(scratch._retired),
             ws.version, ws.sizes(), len(qm._plans), len(qm._fast_paths))
    assert after == before
    assert _rel(out, x, w) < REL_TOL
    qm.close()
    assert qm._fast_paths == {} and qm._plans == {}
