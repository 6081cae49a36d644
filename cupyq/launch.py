"""Kernel launches for a prepared matrix: launch plans (grid, shared memory, argument slots by name) of the kernel
the dispatch rules (:mod:`cupyq.rules`) choose, the launcher, the GEMM / dequantise / gather launches, and
warm-up.

Everything here takes a QMatrix-like object (``layout``, ``device_id``, ``in_features``, ``out_features``, the
bias copies and the plan cache ``_plans``) and imports nothing from ``cupyq.qmatrix`` or ``cupyq.dispatch``.
"""

from __future__ import annotations

import ctypes
import functools
import threading

import numpy as np

from cupyq import kernels, runtime
from cupyq.device import sm_count
from cupyq.rules import (
    _warmup_batches, choose_kernel, choose_qmma, choose_wgmma, dense_threshold, scale_rows_per_chunk,
)
from cupyq.scratch import workspace

_GEMV_SMEM_LIMIT = 112 * 1024  # per CTA, so that two fit in a multiprocessor's 228 KB

_THREADS = kernels.GEMV_THREADS
_STEP_CHUNKS = kernels.STEP_CHUNKS
_STATIC_SMEM_LIMIT = 48 * 1024



class _Launcher:
    """Launches one kernel with a fixed argument list through the driver API, rewriting only the argument
    slots that change between calls (CuPy's generic launcher converts every argument on every call).

    params: the kernel's parameter names in signature order; values: name -> value; int_params: the names of
    32-bit integer parameters (the others are pointers)."""

    def __init__(self, kernel, grid, block, smem, params, values, int_params):
        from cupy_backends.cuda.api import driver

        missing = set(params) - set(values)
        if missing:
            raise ValueError(f"kernel arguments missing: {sorted(missing)}")
        self.f = kernel.kernel.ptr
        self.grid = tuple(int(v) for v in grid)
        self.block = tuple(int(v) for v in block)
        self.smem = int(smem)
        self._slots = {
            name: ctypes.c_int32(int(values[name])) if name in int_params else ctypes.c_uint64(int(values[name]))
            for name in params
        }
        self.params = (ctypes.c_void_p * len(params))(*[ctypes.addressof(self._slots[n]) for n in params])
        self.params_ptr = ctypes.addressof(self.params)
        # The workspace whose buffers the ws and counters slots point into, and its version then (_launch_plan).
        self.ws_bound = None
        self.ws_version = -1
        # Everything but the stream bound once: a launch is one call into the driver binding.
        self._launch = functools.partial(driver.launchKernel, self.f, *self.grid, *self.block, self.smem)

    def slot(self, name: str):
        """The ctypes object holding parameter ``name`` (assign ``.value`` before a launch)."""
        return self._slots[name]

    def launch(self, stream_ptr: int):
        self._launch(stream_ptr, self.params_ptr, 0)


class LaunchPlan:
    """A launch plan: the launcher with its argument slots, and what a call must provide.

    x, out, ws, counters, x_vec: the ctypes slots of those parameters (x_vec: None for kernels that need
    16-byte aligned activations, which are gathered into a copy when misaligned). partial_floats, counters_n:
    workspace sizes (0: the launch needs no workspace). gather: activations must be gathered into sorted
    padded order first. x_vec_default: the x_vec value for aligned activations. frag: None, or the launcher of
    frag_x / frag_xw, which writes the activations in the tensor-core kernel's order into frag_halves elements of
    the workspace (gather is then False: it reads through the row permutation itself); frag_x, frag_xf: its
    input and output slots; frag_vec: its 16-byte-load flag slot, None where it never applies.
    """

    __slots__ = ("kernel", "partial_floats", "counters_n", "gather", "x_vec_default", "launcher", "x", "out", "ws",
                 "counters", "x_vec", "frag", "frag_halves", "frag_x", "frag_xf", "frag_vec")


def _qgemm_plan(qm, m: int, ctype: str) -> LaunchPlan:
    """The plan of the quantized kernel choose_kernel names for m rows (as with force_cuda: a batch reaches the
    quantized kernel only when the dense path was not taken)."""
    kernel, _ = choose_kernel(qm, m, ctype, force_cuda=True)
    if kernel in ("qgemv", "qgemv2"):
        return _qgemv_plan(qm, m, ctype)
    if kernel == "qwgmma":
        return _qmma_plan(qm, m, ctype, choose_wgmma(m, qm.in_features * qm.out_features))
    return _qmma_plan(qm, m, ctype, choose_qmma(m, qm.in_features * qm.out_features))


QMMA_SMEM_LIMIT = 227 * 1024  # dynamic shared memory one CTA may take on sm_80 and sm_90


def _qmma_plan(qm, m: int, ctype: str, cfg) -> LaunchPlan:
    """Launch plan of qmma (cfg: a kernels.QmmaConfig) or of qwgmma on sm_90 (cfg: a kernels.WgmmaConfig): one CTA
    per resident slot (stream-K over the tile iterations), after frag_x / frag_xw has written the activations in
    the kernel's order."""
    lay = qm.layout
    has8, has4 = lay.chunks8 > 0, lay.chunks4 > 0
    zr = scale_rows_per_chunk(qm)
    name = cfg.name(ctype, zr, has8, has4)
    wgmma = isinstance(cfg, kernels.WgmmaConfig)
    if wgmma:
        fn = runtime.get_function("qwgmma.cu", name, qm.device_id)
        ffn = runtime.get_function("qwgmma.cu", kernels.frag_xw_name(ctype), qm.device_id)
    else:
        fn = runtime.get_function("qmma.cu", name, qm.device_id)
        ffn = runtime.get_function("qmma.cu", kernels.frag_x_name(ctype), qm.device_id)
    smem = cfg.smem_bytes(has8, zr)
    if smem > QMMA_SMEM_LIMIT:
        raise ValueError(f"qm: {name} needs {smem} bytes of shared memory, more than {QMMA_SMEM_LIMIT}")
    _allow_smem(fn, smem)
    chunks = lay.chunks8 + lay.chunks4
    ksteps = chunks // cfg.ks
    nblocks = -(-(lay.padded_cols // 16) // (cfg.n_tile // 16))
    mblocks = -(-m // cfg.m_tile)
    total = mblocks * nblocks * ksteps
    resident = _ctas_per_sm(fn, qm.device_id, smem) * sm_count(qm.device_id)
    if resident < 1:
        raise RuntimeError(f"qm: kernel {name} does not fit a multiprocessor")
    ctas = min(total, resident)
    bias = qm.bias16 if ctype == "__half" else qm.bias_bf16
    values = dict(
        x=0, w8=_ptr(lay.w8), w4=_ptr(lay.w4), tile_group=_ptr(lay.tile_group), zs=_ptr(lay.zs), bias=_ptr(bias),
        out=0, ws=0, counters=0, M=m, N=qm.out_features, Npad=lay.padded_cols, C8=lay.chunks8, C4=lay.chunks4,
    )
    launcher = _Launcher(fn, (ctas, 1, 1), (kernels.QMMA_THREADS, 1, 1), smem, kernels.QMMA_PARAMS, values,
                         kernels.QMMA_INT_PARAMS)
    p = LaunchPlan()
    p.kernel = name
    p.launcher = launcher
    p.partial_floats = cfg.workspace_floats(ctas)
    p.counters_n = mblocks * nblocks
    p.gather = False
    p.x_vec_default = None
    p.x, p.out, p.ws, p.counters = (launcher.slot(k) for k in ("x", "out", "ws", "counters"))
    p.x_vec = None
    frag_values = dict(x=0, row_src=_ptr(lay.row_src), xf=0, M=m, K=qm.in_features, chunks=chunks)
    if wgmma:
        rows = -(-m // 8)
        threads = rows * chunks * kernels.WGMMA_X_GROUP_BYTES // 16
        p.frag = _Launcher(ffn, (-(-threads // kernels.QMMA_THREADS), 1, 1), (kernels.QMMA_THREADS, 1, 1), 0,
                           kernels.FRAG_XW_PARAMS, frag_values, kernels.FRAG_XW_INT_PARAMS)
        p.frag_halves = rows * chunks * kernels.WGMMA_X_GROUP_BYTES // 2
        p.frag_vec = None
    else:
        blocks16 = -(-m // 16)
        threads = blocks16 * chunks * 32
        p.frag = _Launcher(ffn, (-(-threads // kernels.QMMA_THREADS), 1, 1), (kernels.QMMA_THREADS, 1, 1), 0,
                           kernels.FRAG_X_PARAMS, dict(frag_values, vec=0), kernels.FRAG_X_INT_PARAMS)
        p.frag_halves = blocks16 * chunks * kernels.FRAG_X_BLOCK_BYTES // 2
        p.frag_vec = p.frag.slot("vec") if lay.row_src is None and qm.in_features % 8 == 0 else None
    p.frag_x, p.frag_xf = p.frag.slot("x"), p.frag.slot("xf")
    return p


def _qgemv_plan(qm, m: int, ctype: str) -> LaunchPlan:
    """Launch plan of the small-batch kernel (see :func:`_gemv_splits`)."""
    lay = qm.layout
    col_blocks = -(-(lay.padded_cols // 16) // 8)
    steps = (lay.chunks8 + lay.chunks4) // _STEP_CHUNKS  # storage segments are whole steps
    mt = 1 if m <= 8 else 2
    fn = runtime.get_function("qgemm.cu", kernels.qgemv_name(ctype, mt, lay.chunks8 > 0, lay.chunks4 > 0),
                              qm.device_id)
    sms = sm_count(qm.device_id)
    choice = _gemv_splits(steps, col_blocks, m, lambda smem: _ctas_per_sm(fn, qm.device_id, smem) * sms)
    if choice is None:
        raise ValueError(f"qm: {qm.in_features} rows do not fit the small-batch kernel's shared memory")
    splits, per_split, smem = choice
    return _finish_plan(qm, m, ctype, fn, (col_blocks, splits, 1), smem, per_split, splits * mt * 8 * lay.padded_cols,
                        col_blocks)


def _finish_plan(qm, m: int, ctype: str, fn, grid, smem: int, steps_per_split: int, partial_floats: int,
                 counters: int) -> LaunchPlan:
    """The launch plan of qgemv for the given grid (column blocks, K splits, 1), dynamic shared memory, and
    workspace sizes (used only with more than one split)."""
    lay = qm.layout
    p = LaunchPlan()
    _allow_smem(fn, smem)
    splits = grid[1]
    p.kernel = getattr(fn, "name", "qgemm")
    p.partial_floats = partial_floats if splits > 1 else 0
    p.counters_n = counters if splits > 1 else 0
    # Permuted (act-order, EXL2) or padded activations are gathered once into sorted order by a small kernel:
    # every column block reads the same rows, and gathering them in each CTA costs a 32-byte sector of L2
    # traffic per 2-byte value. The kernels' row_src parameter therefore stays null.
    p.gather = lay.row_src is not None
    p.x_vec_default = 1 if p.gather or qm.in_features % 8 == 0 else 0
    bias = qm.bias16 if ctype == "__half" else qm.bias_bf16
    values = dict(
        x=0, row_src=0, w8=_ptr(lay.w8), w4=_ptr(lay.w4), tile_group=_ptr(lay.tile_group), zs=_ptr(lay.zs),
        bias=_ptr(bias), out=0, ws=0, counters=0, M=m, K=lay.padded_rows if p.gather else qm.in_features,
        N=qm.out_features, Npad=lay.padded_cols, C8=lay.chunks8, C4=lay.chunks4,
        chunks_per_split=steps_per_split * _STEP_CHUNKS, x_vec=p.x_vec_default,
    )
    p.launcher = _Launcher(fn, grid, (_THREADS, 1, 1), smem, kernels.QGEMV_PARAMS, values, kernels.QGEMV_INT_PARAMS)
    p.x, p.out, p.ws, p.counters, p.x_vec = (p.launcher.slot(k) for k in ("x", "out", "ws", "counters", "x_vec"))
    p.frag = None
    return p


# Fixed cost of a wave of qgemv CTAs (staging, first loads, split-K reduction), in steps of streaming.
_WAVE_OVERHEAD_STEPS = 2


def _gemv_splits(steps: int, col_blocks: int, m: int, resident_ctas):
    """(splits, steps per split, shared bytes) for qgemv: the split of the ``steps`` 256-row steps of each
    column block that minimises waves x (steps per split + a fixed cost per wave), fewer splits on ties, within
    the shared-memory limit. ``resident_ctas(smem)``: CTAs the GPU holds at once with that much shared memory.
    None when not even one step fits."""
    best = None
    for splits in range(1, steps + 1):
        per_split = -(-steps // splits)
        if splits > 1 and -(-steps // (splits - 1)) == per_split:
            continue  # the same ranges as a smaller split count
        chunks = per_split * _STEP_CHUNKS
        smem = m * (chunks * 64 + 8) * 2 + 5 * chunks * 4  # activations, chunk groups, tile groups
        if smem > _GEMV_SMEM_LIMIT:
            continue
        used = -(-steps // per_split)
        waves = -(-(col_blocks * used) // max(1, resident_ctas(smem)))
        cost = waves * (per_split + _WAVE_OVERHEAD_STEPS)
        if best is None or cost < best[0]:
            best = (cost, used, per_split, smem)
    return None if best is None else best[1:]


_occupancy: dict = {}


def _ctas_per_sm(fn, device_id: int, smem: int) -> int:
    """Resident CTAs of ``fn`` per multiprocessor with ``smem`` bytes of dynamic shared memory."""
    key = (id(fn), smem)
    n = _occupancy.get(key)
    if n is None:
        import cupy
        from cupy_backends.cuda.api import driver

        _allow_smem(fn, smem)
        with cupy.cuda.Device(device_id):
            n = _occupancy[key] = driver.occupancyMaxActiveBlocksPerMultiprocessor(fn.kernel.ptr, _THREADS, smem)
    return n


def _allow_smem(fn, smem: int):
    """Let ``fn`` take ``smem`` bytes of dynamic shared memory (the limit only ever grows: launch plans of other
    matrices may rely on it)."""
    if smem > _STATIC_SMEM_LIMIT and smem > fn.max_dynamic_shared_size_bytes:
        fn.max_dynamic_shared_size_bytes = smem


def _ptr(a) -> int:
    return 0 if a is None or a.size == 0 else int(a.data.ptr)


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
    at least in_features rows, row stride buf.shape[1] >= padded columns. (The kernel's other mode, a block of
    sorted rows, is no longer launched: the dense path uses dequant_t for that.)"""
    lay = qm.layout
    chunks = lay.chunks8 + lay.chunks4
    fn = runtime.get_function("qgemm.cu", kernels.dequant_name(ctype, lay.chunks8 > 0, lay.chunks4 > 0),
                              qm.device_id)
    grid = (-(-(lay.padded_cols // 16) // 8), chunks, 1)
    args = (
        _ptr(lay.w8), _ptr(lay.w4), _ptr(lay.tile_group), _ptr(lay.zs), _ptr(lay.row_src), int(buf.data.ptr),
        np.int32(buf.shape[1]), np.int32(min(buf.shape[1], lay.padded_cols)), np.int32(lay.padded_cols),
        np.int32(lay.chunks8), np.int32(lay.chunks4), np.int32(0), np.int32(1),  # chunk_begin, scatter
    )
    fn(grid, (_THREADS, 1, 1), args, stream=stream)


def _gather_columns(qm, x_ptr: int, out_ptr: int, m: int, ctype: str, stream):
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
    args = (
        _ptr(lay.w8), _ptr(lay.w4), _ptr(lay.tile_group), _ptr(lay.zs), int(buf.data.ptr), np.int32(buf.shape[1]),
        np.int32(lay.padded_cols), np.int32(lay.chunks8), np.int32(lay.chunks4), np.int32(chunk_begin),
        np.int32(chunk_end),
    )
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
