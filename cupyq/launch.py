"""Kernel launches for a prepared matrix: the plan cache (:func:`_plan_for`, which builds plans with
:mod:`cupyq.plans` and counts the devices with the first one, as the launch reads that count), the launch of a plan
(workspace binding, activation preparation, the driver call), the dequantise / gather launches, and warm-up.

Everything here takes a QMatrix-like object (``layout``, ``device_id``, ``in_features``, ``out_features``, the
bias copies and the plan cache ``_plans``) and imports nothing from ``cupyq.qmatrix`` or ``cupyq.dispatch``.
"""

from __future__ import annotations

import threading

import numpy as np

from cupyq import kernels, runtime
from cupyq.plans import _THREADS, LaunchPlan, _ptr, _qgemm_plan, kernel_args
from cupyq.rules import _warmup_batches, dense_threshold
from cupyq.scratch import workspace


def _plan_for(qm, m: int, ctype: str) -> LaunchPlan:
    """The launch plan of ``qm`` for ``m`` rows of ``ctype`` activations, made once and kept on the matrix."""
    plan = qm._plans.get((m, ctype))
    if plan is None:
        _count_devices()
        plan = qm._plans[(m, ctype)] = _qgemm_plan(qm, m, ctype)
    return plan


def _count_devices():
    global _device_count
    if not _device_count:
        import cupy

        _device_count = cupy.cuda.runtime.getDeviceCount()


# A plan's argument slots are shared by every caller of the matrix, and a stream's workspace by every thread
# launching on that stream: filling the slots (or the scratch) and launching is one step.
_launch_lock = threading.Lock()


def _launch_qgemm(qm, x_ptr: int, out_ptr: int, m: int, ctype: str, stream, capturing):
    """Launch the quantized GEMM; ``stream`` is a CuPy stream object, ``capturing()`` tells whether a CUDA graph
    is being captured on it (asked only when a buffer must grow)."""
    _launch_plan(qm, _plan_for(qm, m, ctype), x_ptr, out_ptr, m, ctype, stream, capturing)


def _launch_plan(qm, plan: LaunchPlan, x_ptr: int, out_ptr: int, m: int, ctype: str, stream, capturing, ws=None):
    """Launch ``plan`` on ``stream``; ``ws``: the stream's workspace, when the caller has it at hand. Workspaces
    belong to the stream, so launches on different streams never share partial sums or counters.

    Under the launch lock, in steps: the stream's workspace is bound to the launcher's ws/counters slots (once
    per workspace and version of its buffers); the activations are prepared (the ``if plan.gather ...`` block:
    a copy in the workspace where the kernel needs one, x_ptr then pointing at it); the x_vec, x and out slots
    are filled; the kernel is launched (in the matrix's device context when another device is current).
    """
    if ws is None:
        ws = workspace(qm.device_id, stream.ptr, capturing)
    _launch_lock.acquire()  # (a with block costs more per call)
    try:
        launcher = plan.launcher
        if plan.partial_floats and (launcher.ws_bound is not ws or launcher.ws_version != ws.version):
            partials, counters = ws.ensure(plan.partial_floats, plan.counters_n, capturing)
            launcher.ws_bound, launcher.ws_version = ws, ws.version
            plan.ws.value = partials.data.ptr
            plan.counters.value = counters.data.ptr
        # Activations: qmma's in fragment order; the streaming kernel's in sorted order when permuted, padded or
        # misaligned.
        frag = plan.frag
        if frag is not None:
            buf = ws.gather_buffer(plan.frag_halves, capturing).data.ptr
            plan.frag_x.value = x_ptr
            plan.frag_xf.value = buf
            if plan.frag_vec is not None:
                plan.frag_vec.value = 0 if x_ptr & 15 else 1
            x_ptr = buf
        elif plan.gather or (plan.x_vec is None and x_ptr & 15):
            gathered = ws.gather_buffer(m * qm.layout.padded_rows, capturing)
            _gather_columns(qm, x_ptr, gathered.data.ptr, m, ctype, stream)
            x_ptr = gathered.data.ptr
        if plan.x_vec is not None:
            plan.x_vec.value = 0 if x_ptr & 15 else plan.x_vec_default  # misaligned rows: element-wise staging
        plan.x.value = x_ptr
        plan.out.value = out_ptr
        if _device_count != 1 and _get_device() != qm.device_id:  # the driver launches in the current device's context
            import cupy

            with cupy.cuda.Device(qm.device_id):
                if frag is not None:
                    frag.launch(stream.ptr)
                plan.launcher.launch(stream.ptr)
            return
        if frag is not None:
            frag.launch(stream.ptr)
        plan.launcher.launch(stream.ptr)
    finally:
        _launch_lock.release()


_device_count = 0  # visible CUDA devices, counted with the first launch plan (0: not yet)


def _get_device() -> int:
    """The current CUDA device of this thread."""
    global _get_device
    from cupy_backends.cuda.api import runtime as cuda_runtime

    _get_device = cuda_runtime.getDevice  # bound once: an import statement per call costs a microsecond
    return _get_device()


def dequantize_into(qm, buf, ctype: str, stream):
    """Dequantise the whole of ``qm`` into ``buf`` in original row order: a CuPy 2-D array of 2-byte elements,
    [in_features, padded_cols] (a narrower one receives its first buf.shape[1] columns)."""
    lay = qm.layout
    chunks = lay.chunks8 + lay.chunks4
    fn = runtime.get_function("qgemm.cu", kernels.dequant_name(ctype, lay.chunks8 > 0, lay.chunks4 > 0),
                              qm.device_id)
    grid = (-(-(lay.padded_cols // 16) // 8), chunks, 1)
    args = kernel_args(kernels.DEQUANT_PARAMS, kernels.DEQUANT_INT_PARAMS, dict(
        w8=_ptr(lay.w8), w4=_ptr(lay.w4), tile_group=_ptr(lay.tile_group), zs=_ptr(lay.zs),
        row_src=_ptr(lay.row_src), out=buf.data.ptr, ld_out=buf.shape[1], N=min(buf.shape[1], lay.padded_cols),
        Npad=lay.padded_cols, C8=lay.chunks8, C4=lay.chunks4))
    fn(grid, (_THREADS, 1, 1), args, stream=stream)


def _gather_columns(qm, x_ptr: int, out_ptr: int, m: int, ctype: str, stream):
    """Activations [m, in_features] at x_ptr into sorted, padded row order [m, padded_rows] at out_ptr.

    On the streaming kernel's path of every act-order call, so the arguments are written out in the order of
    kernels.GATHER_PARAMS (tests/test_kernel_contract.py checks it) rather than looked up by name."""
    lay = qm.layout
    fn = runtime.get_function("qgemm.cu", kernels.gather_name(ctype), qm.device_id)
    grid = (-(-lay.padded_rows // 256), m, 1)
    fn(grid, (256, 1, 1), (x_ptr, _ptr(lay.row_src), out_ptr, np.int32(m), np.int32(qm.in_features),
                           np.int32(lay.padded_rows)), stream=stream)


def dequantize_t_into(qm, buf, ctype: str, stream, chunk_begin: int, chunk_end: int):
    """Dequantise sorted chunks [chunk_begin, chunk_end) of ``qm`` transposed: ``buf`` (a CuPy 2-D array of
    2-byte elements, at least padded_cols rows, row stride a multiple of 8 and at least the chunks' rows)
    receives W^T[n, j - 64 * chunk_begin] for the sorted padded rows j, padding rows zero."""
    lay = qm.layout
    fn = runtime.get_function("qmma.cu", kernels.dequant_t_name(ctype, lay.chunks8 > 0, lay.chunks4 > 0),
                              qm.device_id)
    blocks = -(-(chunk_end - chunk_begin) // kernels.DEQUANT_T_CHUNKS_PER_CTA)
    grid = (-(-(lay.padded_cols // 16) // kernels.QMMA_WARPS), blocks, 1)
    args = kernel_args(kernels.DEQUANT_T_PARAMS, kernels.DEQUANT_T_INT_PARAMS, dict(
        w8=_ptr(lay.w8), w4=_ptr(lay.w4), tile_group=_ptr(lay.tile_group), zs=_ptr(lay.zs), outT=buf.data.ptr,
        ld_out=buf.shape[1], Npad=lay.padded_cols, C8=lay.chunks8, C4=lay.chunks4, chunk_begin=chunk_begin,
        chunk_end=chunk_end))
    fn(grid, (kernels.QMMA_THREADS, 1, 1), args, stream=stream)


def warmup_matrix(qm, *, max_m: int = 64, dtypes=("float16",)):
    """Compile the kernels ``qm`` uses for batches up to max_m and size the workspaces (that of the current
    CuPy stream and the device's spare, which a stream capturing a CUDA graph takes)."""
    import cupy

    with cupy.cuda.Device(qm.device_id):
        ws = workspace(qm.device_id, cupy.cuda.get_current_stream().ptr)
        for dt in dtypes:
            ctype = kernels.CTYPES[str(dt).removeprefix("torch.")]
            for m in _warmup_batches(max_m):
                if m > dense_threshold(qm):
                    runtime.get_function("qmma.cu", kernels.dequant_t_name(ctype, qm.layout.chunks8 > 0,
                                                                           qm.layout.chunks4 > 0), qm.device_id)
                    continue
                plan = _plan_for(qm, m, ctype)
                if plan.partial_floats:
                    ws.ensure(plan.partial_floats, plan.counters_n, lambda: False)
                ws.gather_buffer(max(m * qm.layout.padded_rows, plan.frag_halves if plan.frag else 0), lambda: False)
            runtime.get_function("qgemm.cu", kernels.dequant_name(ctype, qm.layout.chunks8 > 0,
                                                                  qm.layout.chunks4 > 0), qm.device_id)
            runtime.get_function("qgemm.cu", kernels.gather_name(ctype), qm.device_id)
