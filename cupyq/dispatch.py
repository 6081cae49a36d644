"""``gemm(x, qm)``: x @ W + bias for a quantized matrix, on the GPU kernels or the float32 reference."""

from __future__ import annotations

import ctypes
import os
import warnings

import numpy as np

import threading

from cupyq import kernels, runtime
from cupyq.qmatrix import QMatrix, _kind
from cupyq.scratch import default_scratch, workspace

# Batches of more rows than this go through dequantise + dense matmul unless force_cuda is given. Measured on an
# H200 (BENCHMARKS.md): qmma wins up to m = 128 on layers of 32 M weights or more, and up to m = 64 on smaller
# ones, where the dense product is cheap and the quantized kernel's work per weight dominates.
DENSE_THRESHOLD = int(os.environ.get("CUPYQ_DENSE_THRESHOLD", 128))
SMALL_LAYER_WEIGHTS = 1 << 25
SMALL_LAYER_THRESHOLD = min(64, DENSE_THRESHOLD)


def dense_threshold(qm: QMatrix) -> int:
    """Largest batch (rows of x) that :func:`gemm` sends to the quantized kernel for this matrix."""
    if qm.in_features * qm.out_features < SMALL_LAYER_WEIGHTS:
        return SMALL_LAYER_THRESHOLD
    return DENSE_THRESHOLD


# Batches of at most this many rows (two m8 tiles; see _two_tile_gemv for 9-16) use the streaming kernel qgemv:
# whole waves of CTAs (normally one), each warp running through a long range of rows, only the M activation
# rows in shared memory.
GEMV_MAX_M = 16
_GEMV_SMEM_LIMIT = 112 * 1024  # per CTA, so that two fit in a multiprocessor's 228 KB

_THREADS = 256
_STEP_CHUNKS = 4
_STATIC_SMEM_LIMIT = 48 * 1024

_warned_cpu = False


def gemm(x, qm: QMatrix, out=None, *, force_cuda: bool = False):
    """``x @ W + bias`` for a quantized matrix.

    x: [..., K] float16 or bfloat16 (GPU), contiguous; torch CUDA tensor or CuPy array on the matrix's device.
       NumPy arrays (or CPU torch tensors) with a CPU matrix run the float32 reference; the result has x's dtype.
    qm: a :class:`~cupyq.QMatrix`.
    out: optional output [..., N] of x's dtype and kind (contiguous), written in place and returned.
    force_cuda: always use the quantized kernel, for any number of rows (default: batches of more than
       :func:`dense_threshold` rows dequantise into scratch and call the dense matmul, in row chunks when the
       scratch is smaller than the matrix; a scratch too small for one chunk of 64 rows falls back to the
       quantized kernel).
    Returns [..., N] of the same kind (torch -> torch, CuPy -> CuPy, NumPy -> NumPy) and dtype as x. GPU kernels
    launch on torch's current stream for torch tensors and on CuPy's current stream for CuPy arrays.
    """
    if not isinstance(qm, QMatrix):
        raise TypeError(f"qm: expected a cupyq.QMatrix, got {type(qm).__name__}")
    kind = _kind(x)
    if kind == "numpy" and not isinstance(x, np.ndarray):
        raise TypeError(f"x: expected a torch tensor, a CuPy array or a NumPy array, got {type(x).__name__}")
    if kind == "torch":
        if x.device.type != "cuda":
            return _gemm_reference(x, qm, out, kind)
        return _gemm_torch(x, qm, out, force_cuda)
    if kind == "cupy":
        return _gemm_cupy(x, qm, out, force_cuda)
    return _gemm_reference(x, qm, out, kind)


# ------------------------------------------------------------------------------------------------ checks
def _check_input(x, qm: QMatrix, on_gpu: bool):
    if qm.device_id is None and on_gpu:
        raise ValueError("qm: the matrix lives on the CPU but x is on a GPU; build it with device='cuda:N'")
    if x.ndim < 1 or x.shape[-1] != qm.in_features:
        raise ValueError(f"x: expected shape (..., {qm.in_features}), got {tuple(x.shape)}")


def _check_out(out, x, qm: QMatrix, is_contiguous):
    expected = tuple(x.shape[:-1]) + (qm.out_features,)
    if tuple(out.shape) != expected:
        raise ValueError(f"out: expected shape {expected}, got {tuple(out.shape)}")
    if out.dtype != x.dtype:
        raise TypeError(f"out: expected dtype {x.dtype}, got {out.dtype}")
    if not is_contiguous(out):
        raise ValueError("out: expected a contiguous array")


# ------------------------------------------------------------------------------------------------ CPU
def _gemm_reference(x, qm: QMatrix, out, kind):
    global _warned_cpu
    if qm.device_id is not None:
        raise ValueError(f"x: the matrix lives on cuda:{qm.device_id}; expected a CUDA tensor or CuPy array")
    _check_input(x, qm, on_gpu=False)
    if not _warned_cpu:
        warnings.warn("cupyq: no GPU kernel ran; the product was computed by the float32 reference", RuntimeWarning,
                      stacklevel=3)
        _warned_cpu = True
    if kind == "torch":
        import torch

        x_np = x.detach().float().numpy()
        y = torch.from_numpy(qm.reference_product(x_np)).to(x.dtype)
        if out is not None:
            _check_out(out, x, qm, lambda t: t.is_contiguous())
            out.copy_(y)
            return out
        return y
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"x: expected a floating dtype, got {x.dtype}")
    y = qm.reference_product(x).astype(x.dtype, copy=False)
    if out is not None:
        _check_out(out, x, qm, lambda a: a.flags.c_contiguous)
        out[...] = y
        return out
    return y


# ------------------------------------------------------------------------------------------------ GPU
_CTYPES = {"float16": "__half", "bfloat16": "__nv_bfloat16"}
_torch_ctypes: dict = {}


def _torch_ctype(dtype):
    """Kernel element type of a torch dtype, or None (cached per dtype object: ``str(dtype)`` is slow)."""
    ctype = _torch_ctypes.get(dtype)
    if ctype is None and dtype not in _torch_ctypes:
        ctype = _torch_ctypes[dtype] = _CTYPES.get(str(dtype).removeprefix("torch."))
    return ctype


def _gemm_torch(x, qm: QMatrix, out, force_cuda):
    import torch

    _check_input(x, qm, on_gpu=True)
    ctype = _torch_ctype(x.dtype)
    if ctype is None:
        raise TypeError(f"x: expected dtype float16 or bfloat16, got {x.dtype}")
    if not x.is_contiguous():
        raise ValueError("x: expected a contiguous tensor (call .contiguous())")
    dev = x.get_device()
    if dev != qm.device_id:
        raise ValueError(f"x: expected a tensor on cuda:{qm.device_id}, got {x.device}")
    n = qm.out_features
    m = x.numel() // qm.in_features
    if out is None:
        out = torch.empty(x.shape[:-1] + (n,), dtype=x.dtype, device=x.device)
    else:
        _check_out(out, x, qm, lambda t: t.is_contiguous())
        if out.device != x.device:
            raise ValueError(f"out: expected a tensor on {x.device}, got {out.device}")
    if m == 0:
        return out
    stream = runtime.torch_stream(dev)
    dense = m > dense_threshold(qm) and not force_cuda
    capturing = torch.cuda.is_current_stream_capturing
    if not (dense and _dense(x.view(m, qm.in_features), out.view(m, n), qm, ctype, stream,
                             _TorchDense(qm, ctype, x.dtype), capturing)):
        _launch_qgemm(qm, x.data_ptr(), out.data_ptr(), m, ctype, stream, capturing)
    return out


def _gemm_cupy(x, qm: QMatrix, out, force_cuda):
    import cupy

    _check_input(x, qm, on_gpu=True)
    ctype = _CTYPES.get(str(x.dtype))
    if ctype is None:
        raise TypeError(f"x: expected dtype float16 (CuPy), got {x.dtype}")
    if not x.flags.c_contiguous:
        raise ValueError("x: expected a C-contiguous array (cupy.ascontiguousarray)")
    if x.device.id != qm.device_id:
        raise ValueError(f"x: expected an array on device {qm.device_id}, got device {x.device.id}")
    n = qm.out_features
    m = x.size // qm.in_features
    with cupy.cuda.Device(qm.device_id):
        if out is None:
            out = cupy.empty(x.shape[:-1] + (n,), dtype=x.dtype)
        else:
            _check_out(out, x, qm, lambda a: a.flags.c_contiguous)
        if m == 0:
            return out
        stream = cupy.cuda.get_current_stream()
        dense = m > dense_threshold(qm) and not force_cuda
        if not (dense and _dense(x.reshape(m, qm.in_features), out.reshape(m, n), qm, ctype, stream,
                                 _CupyDense(qm), stream.is_capturing)):
            _launch_qgemm(qm, x.data.ptr, out.data.ptr, m, ctype, stream, stream.is_capturing)
    return out


class _Launcher:
    """Launches one kernel with a fixed argument list through the driver API, rewriting only the argument
    slots that change between calls (CuPy's generic launcher converts every argument on every call).

    params: the kernel's parameter names in signature order; values: name -> value; int_params: the names of
    32-bit integer parameters (the others are pointers)."""

    def __init__(self, kernel, grid, block, smem, params, values, int_params):
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

    def slot(self, name: str):
        """The ctypes object holding parameter ``name`` (assign ``.value`` before a launch)."""
        return self._slots[name]

    def launch(self, stream_ptr: int):
        from cupy_backends.cuda.api import driver

        g, b = self.grid, self.block
        driver.launchKernel(self.f, g[0], g[1], g[2], b[0], b[1], b[2], self.smem, stream_ptr, self.params_ptr, 0)


class _Plan:
    """A launch plan: the launcher with its argument slots, and what a call must provide.

    x, out, ws, counters, x_vec: the ctypes slots of those parameters (x_vec: None for kernels that need
    16-byte aligned activations, which are gathered into a copy when misaligned). partial_floats, counters_n:
    workspace sizes (0: the launch needs no workspace). gather: activations must be gathered into sorted
    padded order first. x_vec_default: the x_vec value for aligned activations.
    """

    __slots__ = ("kernel", "partial_floats", "counters_n", "gather", "x_vec_default", "launcher", "x", "out", "ws",
                 "counters", "x_vec")


def choose_kernel(qm: QMatrix, m: int, ctype: str, force_cuda: bool = False) -> tuple:
    """(kernel, reason): which path :func:`gemm` takes for ``m`` rows of ``ctype`` activations, by rules in
    order. Kernels: "qgemv" (streaming, one m8 tile), "qgemv2" (two m8 tiles), "qmma" (pipelined tensor-core
    kernel), "dense" (dequantise into scratch + dense matmul; falls back to qmma when the scratch cannot hold a
    chunk of 64 rows)."""
    if m <= 8:
        return "qgemv", "m <= 8: the streaming kernel with one m8 tile"
    if m <= GEMV_MAX_M and _two_tile_gemv(qm, ctype):
        return "qgemv2", "9-16 rows of fp16 on 4-bit storage: the streaming kernel with two m8 tiles"
    if m > dense_threshold(qm) and not force_cuda:
        return "dense", f"m > {dense_threshold(qm)}: dequantise and multiply densely (compute-bound batches)"
    cfg = choose_qmma(m, qm.in_features * qm.out_features)
    return "qmma", f"m = {m}: qmma with {cfg.m_tile}x{cfg.n_tile} tiles"


def _qgemm_plan(qm: QMatrix, m: int, ctype: str) -> _Plan:
    if m <= 8 or (m <= GEMV_MAX_M and _two_tile_gemv(qm, ctype)):
        return _qgemv_plan(qm, m, ctype)
    return _qmma_plan(qm, m, ctype, choose_qmma(m, qm.in_features * qm.out_features))


QMMA_SMEM_LIMIT = 227 * 1024  # dynamic shared memory one CTA may take on sm_80 and sm_90


# Layers of at least this many weights take the 64 x 256 qmma tile from m = 33 on: enough tiles to fill the GPU.
WIDE_TILE_WEIGHTS = 1 << 27


def choose_qmma(m: int, weights: int = WIDE_TILE_WEIGHTS) -> kernels.QmmaConfig:
    """The qmma tiling for a batch of ``m`` rows of a layer of ``weights`` (K x N) weights: the smallest tile
    that holds the batch, except that layers below WIDE_TILE_WEIGHTS keep the 32-row tile up to m = 64 (the
    wide tile leaves them too few tiles per multiprocessor); larger batches run several m blocks."""
    limits = sorted(kernels.QMMA_CONFIGS)
    if 32 < m <= 64 and weights < WIDE_TILE_WEIGHTS:
        return kernels.QMMA_CONFIGS[32]
    for limit in limits:
        if m <= limit:
            return kernels.QMMA_CONFIGS[limit]
    return kernels.QMMA_CONFIGS[limits[-1]]


def _qmma_plan(qm: QMatrix, m: int, ctype: str, cfg: kernels.QmmaConfig) -> _Plan:
    """Launch plan of qmma: one CTA per resident slot (stream-K over the tile iterations)."""
    lay = qm.layout
    has8, has4 = lay.chunks8 > 0, lay.chunks4 > 0
    zr = 1 if _chunk_uniform_groups(qm) else 4
    name = cfg.name(ctype, zr, has8, has4)
    fn = runtime.get_function("qmma.cu", name, qm.device_id)
    smem = cfg.smem_bytes(has8, zr)
    if smem > QMMA_SMEM_LIMIT:
        raise ValueError(f"qm: {name} needs {smem} bytes of shared memory, more than {QMMA_SMEM_LIMIT}")
    _allow_smem(fn, smem)
    chunks = lay.chunks8 + lay.chunks4
    ksteps = chunks // cfg.ks
    nblocks = -(-(lay.padded_cols // 16) // (cfg.wn * cfg.nw))
    mblocks = -(-m // cfg.m_tile)
    total = mblocks * nblocks * ksteps
    resident = _ctas_per_sm(fn, qm.device_id, smem) * runtime.sm_count(qm.device_id)
    if resident < 1:
        raise RuntimeError(f"qm: kernel {name} does not fit a multiprocessor")
    ctas = min(total, resident)
    bias = qm.bias16 if ctype == "__half" else qm.bias_bf16
    values = dict(
        x=0, w8=_ptr(lay.w8), w4=_ptr(lay.w4), tile_group=_ptr(lay.tile_group), zs=_ptr(lay.zs), bias=_ptr(bias),
        out=0, ws=0, counters=0, M=m, ldx=lay.padded_rows, N=qm.out_features, Npad=lay.padded_cols,
        C8=lay.chunks8, C4=lay.chunks4,
    )
    launcher = _Launcher(fn, (ctas, 1, 1), (kernels.QMMA_THREADS, 1, 1), smem, kernels.QMMA_PARAMS, values,
                         kernels.QMMA_INT_PARAMS)
    p = _Plan()
    p.kernel = name
    p.launcher = launcher
    p.partial_floats = cfg.workspace_floats(ctas)
    p.counters_n = mblocks * nblocks
    p.gather = lay.row_src is not None
    p.x_vec_default = None
    p.x, p.out, p.ws, p.counters = (launcher.slot(k) for k in ("x", "out", "ws", "counters"))
    p.x_vec = None
    return p


def _chunk_uniform_groups(qm: QMatrix) -> bool:
    """Whether the four 16-row tiles of every 64-row chunk share one group (GPTQ with groups of 64 rows or more
    and no act-order): qmma then stages one row of scale/zero words per chunk instead of four."""
    cached = qm._plans.get("chunk_uniform")
    if cached is None:
        tg = qm.layout.tile_group
        tg = (tg.get() if hasattr(tg, "get") else np.asarray(tg)).reshape(-1, 4)
        cached = qm._plans["chunk_uniform"] = bool((tg == tg[:, :1]).all())
    return cached


def _two_tile_gemv(qm: QMatrix, ctype: str) -> bool:
    """Whether batches of 9-16 rows take qgemv with two m8 tiles: measured faster than qmma for fp16 activations
    and weights in 4-bit storage (2-4 bits); other matrices run qmma for them."""
    return ctype == "__half" and qm.layout.chunks8 == 0


def _qgemv_plan(qm: QMatrix, m: int, ctype: str) -> _Plan:
    """Launch plan of the small-batch kernel (see :func:`_gemv_splits`)."""
    lay = qm.layout
    col_blocks = -(-(lay.padded_cols // 16) // 8)
    steps = (lay.chunks8 + lay.chunks4) // _STEP_CHUNKS  # storage segments are whole steps
    mt = 1 if m <= 8 else 2
    fn = runtime.get_function("qgemm.cu", runtime.qgemv_name(ctype, mt, lay.chunks8 > 0, lay.chunks4 > 0),
                              qm.device_id)
    sms = runtime.sm_count(qm.device_id)
    choice = _gemv_splits(steps, col_blocks, m, lambda smem: _ctas_per_sm(fn, qm.device_id, smem) * sms)
    if choice is None:
        raise ValueError(f"qm: {qm.in_features} rows do not fit the small-batch kernel's shared memory")
    splits, per_split, smem = choice
    return _finish_plan(qm, m, ctype, fn, (col_blocks, splits, 1), smem, per_split, splits * mt * 8 * lay.padded_cols,
                        col_blocks)


# qgemm's and qgemv's parameters, in the order of their __global__ signatures (cuda_src/qgemm.cu).
_QGEMM_PARAMS = ("x", "row_src", "w8", "w4", "tile_group", "zs", "bias", "out", "ws", "counters", "M", "K", "N",
                 "Npad", "C8", "C4", "chunks_per_split", "x_vec")
_QGEMM_INT_PARAMS = frozenset(("M", "K", "N", "Npad", "C8", "C4", "chunks_per_split", "x_vec"))


def _finish_plan(qm: QMatrix, m: int, ctype: str, fn, grid, smem: int, steps_per_split: int, partial_floats: int,
                 counters: int) -> _Plan:
    """The launch plan of qgemm or qgemv (they take the same parameters) for the given grid (column blocks,
    K splits, m blocks), dynamic shared memory, and workspace sizes (used only with more than one split)."""
    lay = qm.layout
    p = _Plan()
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
    p.launcher = _Launcher(fn, grid, (_THREADS, 1, 1), smem, _QGEMM_PARAMS, values, _QGEMM_INT_PARAMS)
    p.x, p.out, p.ws, p.counters, p.x_vec = (p.launcher.slot(k) for k in ("x", "out", "ws", "counters", "x_vec"))
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


def _plan_for(qm: QMatrix, m: int, ctype: str) -> _Plan:
    """The launch plan of ``qm`` for ``m`` rows of ``ctype`` activations, made once and kept on the matrix."""
    plan = qm._plans.get((m, ctype))
    if plan is None:
        plan = qm._plans[(m, ctype)] = _qgemm_plan(qm, m, ctype)
    return plan


# A plan's argument slots are shared by every caller of the matrix, and a stream's workspace by every thread
# launching on that stream: filling the slots (or the scratch) and launching is one step.
_launch_lock = threading.Lock()


def _launch_qgemm(qm: QMatrix, x_ptr: int, out_ptr: int, m: int, ctype: str, stream, capturing):
    """Launch the quantized GEMM; ``stream`` is a CuPy stream object, ``capturing()`` tells whether a CUDA graph
    is being captured on it (asked only when a buffer must grow)."""
    _launch_plan(qm, _plan_for(qm, m, ctype), x_ptr, out_ptr, m, ctype, stream, capturing)


def _launch_plan(qm: QMatrix, plan: _Plan, x_ptr: int, out_ptr: int, m: int, ctype: str, stream, capturing):
    """Launch ``plan`` on ``stream``. Workspaces belong to the stream, so launches on different streams never
    share partial sums or counters."""
    ws = workspace(qm.device_id, stream.ptr, capturing)
    with _launch_lock:
        if plan.partial_floats:
            partials, counters = ws.ensure(plan.partial_floats, plan.counters_n, capturing)
            plan.ws.value = partials.data.ptr
            plan.counters.value = counters.data.ptr
        if plan.gather or (plan.x_vec is None and x_ptr & 15):
            gathered = ws.gather_buffer(m * qm.layout.padded_rows, capturing)
            _gather_columns(qm, x_ptr, gathered.data.ptr, m, ctype, stream)
            x_ptr = gathered.data.ptr
        if plan.x_vec is not None:
            plan.x_vec.value = 0 if x_ptr & 15 else plan.x_vec_default  # misaligned rows: element-wise staging
        plan.x.value = x_ptr
        plan.out.value = out_ptr
        if _get_device() != qm.device_id:  # the driver launches in the current device's context
            import cupy

            with cupy.cuda.Device(qm.device_id):
                plan.launcher.launch(stream.ptr)
            return
        plan.launcher.launch(stream.ptr)


def _get_device() -> int:
    from cupy_backends.cuda.api import runtime as cuda_runtime

    return cuda_runtime.getDevice()


def dequantize_into(qm: QMatrix, buf, ctype: str, stream, *, chunk_begin: int = 0, chunk_end: int | None = None,
                    scatter: bool = True):
    """Dequantise sorted chunks [chunk_begin, chunk_end) of ``qm`` into ``buf`` (a CuPy 2-D array of 2-byte
    elements, row stride buf.shape[1] >= padded columns): with scatter, whole matrix in original row order;
    otherwise a block of sorted rows starting at row 0 of buf, padding rows zero."""
    lay = qm.layout
    chunks = lay.chunks8 + lay.chunks4
    chunk_end = chunks if chunk_end is None else chunk_end
    fn = runtime.get_function("qgemm.cu", runtime.dequant_name(ctype, lay.chunks8 > 0, lay.chunks4 > 0),
                              qm.device_id)
    grid = (-(-(lay.padded_cols // 16) // 8), chunk_end - chunk_begin, 1)
    args = (
        _ptr(lay.w8), _ptr(lay.w4), _ptr(lay.tile_group), _ptr(lay.zs), _ptr(lay.row_src), int(buf.data.ptr),
        np.int32(buf.shape[1]), np.int32(min(buf.shape[1], lay.padded_cols)), np.int32(lay.padded_cols),
        np.int32(lay.chunks8), np.int32(lay.chunks4), np.int32(chunk_begin), np.int32(1 if scatter else 0),
    )
    fn(grid, (_THREADS, 1, 1), args, stream=stream)


def _gather_columns(qm: QMatrix, x_ptr: int, out_ptr: int, m: int, ctype: str, stream):
    lay = qm.layout
    fn = runtime.get_function("qgemm.cu", runtime.gather_name(ctype), qm.device_id)
    grid = (-(-lay.padded_rows // 256), m, 1)
    fn(grid, (256, 1, 1), (x_ptr, _ptr(lay.row_src), out_ptr, np.int32(m), np.int32(qm.in_features),
                           np.int32(lay.padded_rows)), stream=stream)


def dequantize_t_into(qm: QMatrix, buf, ctype: str, stream, chunk_begin: int, chunk_end: int):
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


def _dense_buffers(qm: QMatrix, m: int, stream_ptr: int, capturing):
    """(scratch uint8 CuPy buffer, bytes of gathered activations at its start, rows of W^T per chunk), or None
    when the scratch cannot hold one chunk of 64 rows next to the gathered activations."""
    lay = qm.layout
    gathered = -(-(m * lay.padded_rows * 2) // 256) * 256 if lay.row_src is not None else 0
    column_bytes = lay.padded_cols * 2
    full = gathered + lay.padded_rows * column_bytes
    buf = qm._scratch if qm._scratch is not None else default_scratch(qm.device_id, full, stream_ptr, capturing)
    rows = (buf.size - gathered) // column_bytes // 64 * 64
    if rows < 64:
        return None
    return buf, gathered, min(rows, lay.padded_rows)


def _half_view(buf, offset: int, rows: int, cols: int):
    return buf[offset: offset + rows * cols * 2].view(np.float16).reshape(rows, cols)


class _CudaArray:
    """Exposes a CuPy array through ``__cuda_array_interface__`` version 2 (no stream field): torch wraps it
    without the cross-stream synchronisation DLPack performs, which would break CUDA-graph capture."""

    def __init__(self, a):
        self.__cuda_array_interface__ = {
            "shape": tuple(a.shape), "typestr": a.dtype.str, "data": (int(a.data.ptr), False),
            "strides": tuple(a.strides), "version": 2,
        }


def _torch_view(torch, a, dtype):
    t = torch.as_tensor(_CudaArray(a), device=torch.device("cuda", a.device.id))
    return t.view(dtype) if dtype == torch.bfloat16 else t


class _TorchDense:
    """The dense products of the dequantise path on torch tensors (fp16 or bf16), through cuBLAS."""

    def __init__(self, qm: QMatrix, ctype: str, dtype):
        import torch

        self.torch, self.dtype = torch, dtype
        self.bias = None
        if qm._bias_host is not None:
            self.bias = self.wrap(qm.bias16 if ctype == "__half" else qm.bias_bf16.view(np.float16))

    def wrap(self, a):
        return _torch_view(self.torch, a, self.dtype)

    @staticmethod
    def ptr(x) -> int:
        return x.data_ptr()

    def product(self, x, w, out, *, accumulate=False, bias=False):
        """out = x @ w (+ bias), or out += x @ w."""
        if accumulate:
            out.addmm_(x, w)
        elif bias and self.bias is not None:
            self.torch.addmm(self.bias, x, w, out=out)
        else:
            self.torch.mm(x, w, out=out)

    def add_bias(self, out):
        if self.bias is not None:
            out.add_(self.bias)


class _CupyDense:
    """The same on CuPy arrays (fp16), through cupy.matmul."""

    def __init__(self, qm: QMatrix):
        self.bias = qm.bias16

    @staticmethod
    def wrap(a):
        return a

    @staticmethod
    def ptr(x) -> int:
        return x.data.ptr

    def product(self, x, w, out, *, accumulate=False, bias=False):
        import cupy

        if accumulate:
            out += cupy.matmul(x, w)
            return
        cupy.matmul(x, w, out=out)
        if bias:
            self.add_bias(out)

    def add_bias(self, out):
        if self.bias is not None:
            out += self.bias


def _dense(x2, out2, qm: QMatrix, ctype: str, stream, ops, capturing) -> bool:
    """out2 = x2 @ W + bias by dequantising into scratch and dense products (``ops``: _TorchDense or _CupyDense):
    W^T in sorted padded row order (in chunks of rows when the scratch is smaller than the matrix, activations
    gathered into the same order for permuted matrices), or W in original row order for a permuted matrix that
    fits whole. Returns False, having done nothing, when the scratch cannot hold one chunk of 64 rows."""
    found = _dense_buffers(qm, x2.shape[0], stream.ptr, capturing)
    if found is None:
        return False
    # The stream's scratch holds gathered activations and dequantised weights from the first launch to the
    # last product: threads sharing the stream must not interleave their launches in between.
    with _launch_lock:
        _dense_launches(x2, out2, qm, ctype, stream, ops, found)
    return True


def _dense_launches(x2, out2, qm: QMatrix, ctype: str, stream, ops, found):
    lay = qm.layout
    n = qm.out_features
    m = x2.shape[0]
    buf, offset, rows = found
    if lay.row_src is not None and buf.size >= qm.in_features * lay.padded_cols * 2:
        # Permuted rows, whole matrix in scratch: W in original row order, so x needs no gather (gathering a
        # large batch costs more than it saves).
        w = _half_view(buf, 0, qm.in_features, lay.padded_cols)
        dequantize_into(qm, w, ctype, stream)
        ops.product(x2, ops.wrap(w)[:, :n], out2, bias=True)
        return
    xs = x2
    if lay.row_src is not None:  # sorted, padded activations to pair with the sorted weight rows
        g = _half_view(buf, 0, m, lay.padded_rows)
        _gather_columns(qm, ops.ptr(x2), int(g.data.ptr), m, ctype, stream)
        xs = ops.wrap(g)
    chunks = lay.chunks8 + lay.chunks4
    step = rows // 64
    for c0 in range(0, chunks, step):
        c1 = min(chunks, c0 + step)
        wt = _half_view(buf, offset, lay.padded_cols, rows)
        dequantize_t_into(qm, wt, ctype, stream, c0, c1)
        r0, r1 = c0 * 64, min(c1 * 64, xs.shape[1])
        w = ops.wrap(wt)[:n, : r1 - r0].T
        ops.product(xs[:, r0:r1], w, out2, accumulate=c0 > 0, bias=c1 == chunks and c0 == 0)
    if chunks > step:
        ops.add_bias(out2)


def warmup_matrix(qm: QMatrix, *, max_m: int = 64, dtypes=("float16",)):
    """Compile the kernels ``qm`` uses for batches up to max_m and size the workspaces (that of the current
    CuPy stream and the device's spare, which a stream capturing a CUDA graph takes)."""
    import cupy

    with cupy.cuda.Device(qm.device_id):
        ws = workspace(qm.device_id, cupy.cuda.get_current_stream().ptr)
        for dt in dtypes:
            ctype = _CTYPES[str(dt).removeprefix("torch.")]
            # Within each kernel variant the largest batch needs the largest workspace.
            for m in sorted({1, 2, 3, 4, 8, 9, 16, 17, 32, 33, 64, 65, 128, 129, 256, max_m}):
                if m > max_m:
                    continue
                if m > dense_threshold(qm):
                    runtime.get_function("qmma.cu", kernels.dequant_t_name(ctype, qm.layout.chunks8 > 0,
                                                                           qm.layout.chunks4 > 0), qm.device_id)
                    continue
                plan = _plan_for(qm, m, ctype)
                if plan.partial_floats:
                    ws.ensure(plan.partial_floats, plan.counters_n, lambda: False)
                ws.gather_buffer(m * qm.layout.padded_rows, lambda: False)
            runtime.get_function("qgemm.cu", runtime.dequant_name(ctype, qm.layout.chunks8 > 0,
                                                                  qm.layout.chunks4 > 0), qm.device_id)
            runtime.get_function("qgemm.cu", runtime.gather_name(ctype), qm.device_id)
