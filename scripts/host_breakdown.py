"""Host time of each step of an eager ``cupyq.gemm`` call, next to torch's own per-call costs.

  python scripts/host_breakdown.py [--json FILE] [--k 4096] [--n 4096] [--m 1] [--rounds 7]
  python scripts/host_breakdown.py --dry-run [--json FILE]

On a GPU it builds a K x N GPTQ matrix (4-bit, group 128, no act-order; 4096 x 4096 by default), runs each call
once, then times each step of the hot path on its own with timeit: tensor attribute reads, the current-stream
handle, the CuPy stream and workspace look-ups, the launch lock, the plan and fast-path look-ups, the launcher and
the driver's launch alone, then ``cupyq.gemm`` with and without ``out``, ``QuantizedLinear``, the custom op, the
exllamav2 layer, and the torch references (a tiny in-place op, ``torch.empty``, ``F.linear`` on the same input).
Each figure is the median over ``--rounds`` rounds of many calls, in µs per call, including the ~0.05 µs of
calling a lambda (the "timer" row); rounds of launching steps end with a synchronisation, outside the timing.
``cupyq.bench.host_overhead`` (the project's measure of the targets) is run as well.

``--dry-run`` needs no GPU or CUDA torch, only CuPy installed: it times on the CPU what needs no CUDA (tensor
attribute reads, the lock, look-ups, filling a plan's slots, and gemm's whole fast path on a stand-in matrix whose
launcher does not launch), so that the Python part of the path can be worked on anywhere.

The table goes to stdout and the JSON report ({"mode", "shape", "steps": [{"group", "step", "us"}], ...}) to
``--json FILE``, or to ``$OUT/host_breakdown.json`` when the environment variable OUT names a directory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import timeit
from types import SimpleNamespace

import numpy as np

PURE_CALLS = 20000  # default calls per round of a step that launches nothing (--calls)
LAUNCH_SHARE = 50  # a step that launches kernels makes 1/50 as many (400): the GPU queue is drained between rounds


def time_us(fn, number: int, rounds: int, sync=None) -> float:
    """Median over ``rounds`` of the mean µs per call of ``fn()`` over ``number`` calls (``sync()`` after each
    round, untimed)."""
    timer = timeit.Timer(fn)
    samples = []
    for _ in range(rounds):
        samples.append(timer.timeit(number) / number * 1e6)
        if sync is not None:
            sync()
    return statistics.median(samples)


class Table:
    """Collects timed steps; a step whose set-up or first call fails is recorded as unavailable, with why."""

    def __init__(self, rounds: int, calls: int = PURE_CALLS, sync=None):
        self.rounds, self.calls, self.sync, self.rows = rounds, calls, sync, []

    def add(self, group: str, step: str, fn, *, launches: bool = False):
        try:
            fn()  # first call outside the timing: plans, caches, fast paths
            if launches and self.sync is not None:
                self.sync()
            number = max(1, self.calls // LAUNCH_SHARE) if launches else self.calls
            us = time_us(fn, number, self.rounds, self.sync if launches else None)
            self.rows.append({"group": group, "step": step, "us": round(us, 3)})
        except Exception as exc:  # a step the installed cupyq or torch does not offer
            self.rows.append({"group": group, "step": step, "us": None, "error": f"{type(exc).__name__}: {exc}"})

    def us(self, step: str):
        for row in self.rows:
            if row["step"] == step:
                return row["us"]
        return None

    def render(self) -> str:
        width = max(len(r["step"]) for r in self.rows)
        lines, group = [], None
        for r in self.rows:
            if r["group"] != group:
                group = r["group"]
                lines.append(f"-- {group}")
            value = f"{r['us']:9.3f}" if r["us"] is not None else "      n/a  " + r["error"][:70]
            lines.append(f"  {r['step']:<{width}}  {value}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- stand-ins
class StandInMatrix:
    """What gemm's fast path reads from a QMatrix, for a CPU run: in/out features and the fast-path table."""

    def __init__(self, in_features: int, out_features: int):
        self.in_features, self.out_features = in_features, out_features
        self.device_id = -1  # what get_device() says of a CPU tensor
        self._fast_paths = {}


def stand_in_fast_path(torch, x, out_features: int, launch_fn):
    """(matrix, plan): a stand-in matrix whose fast path for x's shape and dtype runs on the CPU — x's device
    (-1), CPU outputs, stream handle 0 — with the streaming kernel's launch plan, made by the plan builder from a
    stand-in layout (no row permutation, no split), whose launcher calls ``launch_fn(stream_ptr, params_ptr, 0)``
    instead of the driver."""
    from cupyq import dispatch, plans, scratch

    k = x.shape[-1]
    m = x.numel() // k
    qm = StandInMatrix(k, out_features)
    qm.layout = SimpleNamespace(w8=None, w4=None, tile_group=None, zs=None, row_src=None, padded_rows=k,
                                padded_cols=out_features, chunks8=0, chunks4=k // 64)
    qm.bias16 = qm.bias_bf16 = None
    kernel = SimpleNamespace(kernel=SimpleNamespace(ptr=0), name="stand-in", max_dynamic_shared_size_bytes=0)
    plan = plans._finish_plan(qm, m, "__half", kernel, (1, 1, 1), 0, k // 256, 0, 0)
    plan.launcher._launch = launch_fn
    out_shape = torch.Size(tuple(x.shape[:-1]) + (out_features,))
    path = dispatch._TorchFastPath(torch, plan, m, "__half", x.dtype, out_shape, 0)
    path.device = -1
    path.raw_stream = lambda dev: 0
    path.streams = {0: (SimpleNamespace(ptr=0), scratch.Workspace(-1))}
    qm._fast_paths[(x.shape, x.dtype)] = path
    return qm, plan


def _no_launch(stream_ptr, params_ptr, flags):
    return None


# ---------------------------------------------------------------------------------------------- CPU
def _timer_and_tensor_attributes(table, x, group: str, extra=()):
    """The first rows of both runs: the timer's own cost, then the tensor attributes a call reads (and ``extra``
    (name, fn) pairs), under ``group``."""
    table.add("timer", "empty lambda", lambda: None)
    for step, fn in (("x.device", lambda: x.device), ("x.get_device()", lambda: x.get_device()),
                     ("x.is_contiguous()", lambda: x.is_contiguous()), ("x.shape[-1]", lambda: x.shape[-1]),
                     ("x.shape", lambda: x.shape), ("x.dtype", lambda: x.dtype), ("x.numel()", lambda: x.numel()),
                     ("x.data_ptr()", lambda: x.data_ptr()), *extra):
        table.add(group, step, fn)


def dry_run(args) -> dict:
    import torch
    import torch.nn.functional as F

    from cupyq import dispatch, launch, scratch, torch_ops

    k, n, m = args.k, args.n, args.m
    table = Table(args.rounds, args.calls)
    x = torch.randn(m, k, dtype=torch.float16)
    out = torch.empty(m, n, dtype=torch.float16)
    small = torch.randn(m, 256)
    w_small = torch.randn(256, 256)
    dispatch._Tensor = torch.Tensor  # what the first checked call of a torch tensor records
    saved_count = launch._device_count
    launch._device_count = 1  # one device: no current-device query (none can be made without CUDA)
    try:
        qm, plan = stand_in_fast_path(torch, x, n, _no_launch)
        ws = scratch.Workspace(-1)
        stream = SimpleNamespace(ptr=0)
        lock = threading.Lock()
        key_table = {(x.shape, x.dtype): 1}
        slot = plan.x
        h = torch_ops.register_qmatrix(qm)
        layer = torch_ops.QuantizedLinear(qm)
        _timer_and_tensor_attributes(table, x, "tensor attributes (CPU tensor)",
                                     (("type(x) is torch.Tensor", lambda: type(x) is torch.Tensor),))
        g = "look-ups and locks"
        table.add(g, "fast-path key lookup {(x.shape, x.dtype)}", lambda: key_table.get((x.shape, x.dtype)))
        table.add(g, "workspace(dev, ptr) lookup", lambda: scratch.workspace(-1, 12345))
        table.add(g, "lock acquire + release", lambda: (lock.acquire(), lock.release()))
        table.add(g, "with lock", lambda: _with(lock))
        table.add(g, "ctypes slot write", lambda: setattr(slot, "value", 123456789))
        g = "cupyq hot path (stand-in matrix, no launch)"
        table.add(g, "_Launcher.launch (no driver call)", lambda: plan.launcher.launch(0))
        table.add(g, "launch._launch_plan", lambda: launch._launch_plan(qm, plan, 4096, 8192, m, "__half", stream,
                                                                        _never, ws))
        table.add(g, "cupyq.gemm(x, qm, out=out)", lambda: dispatch.gemm(x, qm, out=out))
        table.add(g, "cupyq.gemm(x, qm)", lambda: dispatch.gemm(x, qm))
        table.add(g, "torch_ops.apply_qgemm(x, h)", lambda: torch_ops.apply_qgemm(x, h))
        table.add(g, "QuantizedLinear.forward(x)", lambda: layer.forward(x))
        table.add(g, "QuantizedLinear(x) (module call)", lambda: layer(x))
        g = "torch references (CPU)"
        table.add(g, "torch.empty(out shape, dtype, device)",
                  lambda: torch.empty((m, n), dtype=x.dtype, device=x.device))
        table.add(g, "x.new_empty(out shape)", lambda: x.new_empty((m, n)))
        table.add(g, "tiny op small.add_(0)", lambda: small.add_(0))
        table.add(g, "F.linear (m x 256 @ 256 x 256, fp32)", lambda: F.linear(small, w_small))
    finally:
        launch._device_count = saved_count
    return {"mode": "dry-run", "steps": table.rows, "table": table}


def _with(lock):
    with lock:
        pass


def _never():
    return False


# ---------------------------------------------------------------------------------------------- GPU
def gpu_run(args) -> dict:
    import torch
    import torch.nn.functional as F

    import cupyq
    from cupyq import bench, device, launch, scratch, torch_ops

    k, n, m, dev = args.k, args.n, args.m, args.device
    torch.cuda.set_device(dev)
    rng = np.random.default_rng(0)
    t = bench._random_gptq(rng, k, n, False)
    qm = cupyq.QMatrix.from_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], device=dev)
    x = torch.randn(m, k, device=f"cuda:{dev}", dtype=torch.float16)
    out = torch.empty(m, n, device=f"cuda:{dev}", dtype=torch.float16)
    small = torch.randn(m, 8, device=f"cuda:{dev}", dtype=torch.float16)
    w16 = (torch.randn(n, k, device=f"cuda:{dev}", dtype=torch.float16) * 0.01)
    lin = torch.nn.Linear(k, n, bias=False, device=f"cuda:{dev}", dtype=torch.float16)
    cupyq.gemm(x, qm, out=out)
    torch.cuda.synchronize()
    sync = torch.cuda.synchronize
    table = Table(args.rounds, args.calls, sync)
    ptr = torch._C._cuda_getCurrentRawStream(dev)
    stream = device.torch_stream(dev)
    capturing = torch.cuda.is_current_stream_capturing
    plan = launch._plan_for(qm, m, "__half")
    launcher = plan.launcher
    from cupy_backends.cuda.api import driver

    raw_args = (launcher.f, *launcher.grid, *launcher.block, launcher.smem)
    h = torch_ops.register_qmatrix(qm)
    layer = torch_ops.QuantizedLinear(qm)
    ex_layer = _exllamav2_layer(torch, t, dev)
    lock = launch._launch_lock

    _timer_and_tensor_attributes(table, x, "tensor attributes")
    g = "streams, workspaces, locks, plans"
    table.add(g, "torch._C._cuda_getCurrentRawStream(dev)", lambda: torch._C._cuda_getCurrentRawStream(dev))
    table.add(g, "torch.cuda.current_stream().cuda_stream", lambda: torch.cuda.current_stream().cuda_stream)
    table.add(g, "device.torch_stream(dev)", lambda: device.torch_stream(dev))
    table.add(g, "workspace(dev, ptr) lookup", lambda: scratch.workspace(dev, ptr, capturing))
    table.add(g, "torch.cuda.is_current_stream_capturing()", capturing)
    table.add(g, "launch lock acquire + release", lambda: (lock.acquire(), lock.release()))
    table.add(g, "with launch lock", lambda: _with(lock))
    table.add(g, "plan lookup launch._plan_for", lambda: launch._plan_for(qm, m, "__half"))
    table.add(g, "fast-path lookup qm._fast_paths.get", lambda: qm._fast_paths.get((x.shape, x.dtype)))
    g = "launches"
    table.add(g, "driver.launchKernel (cupy_backends)", lambda: driver.launchKernel(
        *raw_args, ptr, launcher.params_ptr, 0), launches=True)
    table.add(g, "_Launcher.launch", lambda: launcher.launch(ptr), launches=True)
    table.add(g, "launch._launch_plan", lambda: launch._launch_plan(
        qm, plan, x.data_ptr(), out.data_ptr(), m, "__half", stream, capturing), launches=True)
    g = "cupyq entry points"
    table.add(g, "cupyq.gemm(x, qm, out=out)", lambda: cupyq.gemm(x, qm, out=out), launches=True)
    table.add(g, "cupyq.gemm(x, qm)", lambda: cupyq.gemm(x, qm), launches=True)
    table.add(g, "torch_ops.apply_qgemm(x, h)", lambda: torch_ops.apply_qgemm(x, h), launches=True)
    table.add(g, "torch.ops.cupyq.qgemm(x, h, False) (dispatcher)", lambda: torch.ops.cupyq.qgemm(x, h, False),
              launches=True)
    table.add(g, "QuantizedLinear.forward(x)", lambda: layer.forward(x), launches=True)
    table.add(g, "QuantizedLinear(x) (module call)", lambda: layer(x), launches=True)
    table.add(g, "exllamav2 QuantLinear.forward(x)", lambda: ex_layer.forward(x), launches=True)
    table.add(g, "exllamav2 QuantLinear(x) (module call)", lambda: ex_layer(x), launches=True)
    g = "torch references"
    table.add(g, "tiny op small.add_(0)", lambda: small.add_(0), launches=True)
    table.add(g, "torch.empty(out shape, dtype, device)", lambda: torch.empty((m, n), dtype=x.dtype, device=x.device))
    table.add(g, "torch.empty(out shape, dtype, device index)", lambda: torch.empty((m, n), dtype=x.dtype, device=dev))
    table.add(g, "x.new_empty(out shape)", lambda: x.new_empty((m, n)))
    table.add(g, "F.linear(x, w16) (same input)", lambda: F.linear(x, w16), launches=True)
    table.add(g, "nn.Linear(x) (module call)", lambda: lin(x), launches=True)
    torch.cuda.synchronize()
    report = {"mode": "gpu", "device": torch.cuda.get_device_name(dev), "steps": table.rows, "table": table}
    report["host_overhead"] = bench.host_overhead(k=k, n=n, m=m, device=dev)
    return report


def _exllamav2_layer(torch, t, dev):
    """A cupyq.exllamav2 QuantLinear (LoRAX signature) of the same GPTQ tensors, built by one forward."""
    from cupyq import exllamav2

    tt = {name: torch.from_numpy(np.ascontiguousarray(v)).cuda(dev) for name, v in t.items()}
    layer = exllamav2.QuantLinear(tt["qweight"], tt["qzeros"], tt["scales"], tt["g_idx"], None, 4, 128)
    return layer


def targets(table: Table) -> dict:
    """The per-call targets of the hot path, measured (µs) and met or not (None where a figure is missing)."""
    def diff(a, b):
        ua, ub = table.us(a), table.us(b)
        return None if ua is None or ub is None else round(ua - ub, 3)

    linear = "F.linear(x, w16) (same input)"
    rows = {
        "gemm(x, qm, out=out) <= 6": (table.us("cupyq.gemm(x, qm, out=out)"), 6.0),
        "gemm(x, qm) <= 8": (table.us("cupyq.gemm(x, qm)"), 8.0),
        "QuantizedLinear.forward - F.linear <= 3": (diff("QuantizedLinear.forward(x)", linear), 3.0),
        "exllamav2 forward - F.linear <= 3": (diff("exllamav2 QuantLinear.forward(x)", linear), 3.0),
    }
    return {name: {"us": us, "limit": limit, "met": None if us is None else us <= limit}
            for name, (us, limit) in rows.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", "--cpu", dest="dry_run", action="store_true",
                   help="time the steps that need no CUDA, on the CPU (no GPU or CUDA torch needed)")
    p.add_argument("--k", type=int, default=4096, help="in_features (default 4096)")
    p.add_argument("--n", type=int, default=4096, help="out_features (default 4096)")
    p.add_argument("--m", type=int, default=1, help="rows of x (default 1)")
    p.add_argument("--rounds", type=int, default=7, help="rounds per step; the median is reported (default 7)")
    p.add_argument("--calls", type=int, default=PURE_CALLS,
                   help=f"calls per round of a step that launches nothing (default {PURE_CALLS}; launching steps "
                        f"make 1/{LAUNCH_SHARE} as many)")
    p.add_argument("--device", type=int, default=0, help="CUDA device index (default 0)")
    p.add_argument("--json", default=None,
                   help="write the report here (default: $OUT/host_breakdown.json when OUT is set)")
    a = p.parse_args(argv)
    report = dry_run(a) if a.dry_run else gpu_run(a)
    table = report.pop("table")
    report.update(shape={"k": a.k, "n": a.n, "m": a.m}, python=platform.python_version(),
                  torch=__import__("torch").__version__)
    if report["mode"] == "gpu":
        report["targets"] = targets(table)
    print(f"host µs per call ({report['mode']}, K={a.k} N={a.n} m={a.m}; median of {a.rounds} rounds)")
    print(table.render())
    for name, target in report.get("targets", {}).items():
        print(f"target {name}: {target['us']} -> {'met' if target['met'] else 'NOT met'}")
    if "host_overhead" in report:
        print("cupyq.bench.host_overhead:", report["host_overhead"])
    path = a.json
    if path is None and os.environ.get("OUT") and os.path.isdir(os.environ["OUT"]):
        path = os.path.join(os.environ["OUT"], "host_breakdown.json")
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
        print("report:", path, file=sys.stderr)


if __name__ == "__main__":
    main()
