"""Launch plans: what to launch for a prepared matrix and a batch of m rows. The plan builders turn the kernel the
dispatch rules (:mod:`cupyq.rules`) choose into a :class:`LaunchPlan` (grid, dynamic shared memory, workspace sizes,
the launcher with its argument slots by name), with the geometry that decides them: the small-batch kernel's K
splits, resident CTAs per multiprocessor, the shared-memory limits. Launching a plan is :mod:`cupyq.launch`.

Everything here takes a QMatrix-like object (``layout``, ``device_id``, ``in_features``, ``out_features``, the
bias copies) and imports nothing from ``cupyq.qmatrix``, ``cupyq.dispatch`` or ``cupyq.launch``.
"""

from __future__ import annotations

import ctypes
import functools

from cupyq import kernels, runtime
from cupyq.device import sm_count
from cupyq.rules import choose_kernel, choose_qmma, choose_wgmma, scale_rows_per_chunk

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

        _check_arguments(params, values)
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
        lay = qm.layout
        cfg = choose_wgmma(m, qm.in_features * qm.out_features, lay.chunks8, lay.chunks4, scale_rows_per_chunk(qm))
        return _qmma_plan(qm, m, ctype, cfg)
    return _qmma_plan(qm, m, ctype, choose_qmma(m, qm.in_features * qm.out_features))


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
    misfit = kernels.tiling_misfit(cfg, lay.chunks8, lay.chunks4, zr)
    if misfit:
        raise ValueError(f"qm: {name} cannot run this layout: {misfit}")
    smem = cfg.smem_bytes(has8, zr)
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
    choice = _gemv_splits(steps, col_blocks, m, lambda smem: _ctas_per_sm(fn, qm.device_id, smem) * sms, ctype)
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
    # traffic per 2-byte value.
    p.gather = lay.row_src is not None
    p.x_vec_default = 1 if p.gather or qm.in_features % 8 == 0 else 0
    bias = qm.bias16 if ctype == "__half" else qm.bias_bf16
    values = dict(
        x=0, w8=_ptr(lay.w8), w4=_ptr(lay.w4), tile_group=_ptr(lay.tile_group), zs=_ptr(lay.zs),
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


def _gemv_splits(steps: int, col_blocks: int, m: int, resident_ctas, ctype: str = "__half"):
    """(splits, steps per split, shared bytes) for qgemv: the split of the ``steps`` 256-row steps of each
    column block that minimises waves x (steps per split + a fixed cost per wave), fewer splits on ties, within
    the shared-memory limit. ``resident_ctas(smem)``: CTAs the GPU holds at once with that much shared memory;
    ``ctype``: the activations' kernel type. None when not even one step fits."""
    best = None
    for splits in range(1, steps + 1):
        per_split = -(-steps // splits)
        if splits > 1 and -(-steps // (splits - 1)) == per_split:
            continue  # the same ranges as a smaller split count
        chunks = per_split * _STEP_CHUNKS
        smem = kernels.qgemv_smem_bytes(m, chunks, ctype)
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


def _check_arguments(params, values: dict) -> None:
    """ValueError naming every parameter of ``params`` without a value and every value that is no parameter."""
    if values.keys() != set(params):
        raise ValueError(f"kernel arguments: missing {sorted(set(params) - values.keys())}, "
                         f"unknown {sorted(values.keys() - set(params))}")


def kernel_args(params, int_params, values: dict) -> tuple:
    """The arguments of a CuPy kernel call in signature order: ``params``, the parameter names (a declaration of
    :mod:`cupyq.kernels`); ``int_params``, the 32-bit integer ones (as np.int32; the others are pointers, as
    Python ints); ``values``, name -> value. ValueError naming any parameter missing or unknown."""
    import numpy as np

    _check_arguments(params, values)
    return tuple(np.int32(values[n]) if n in int_params else int(values[n]) for n in params)


def _ptr(a) -> int:
    return 0 if a is None or a.size == 0 else int(a.data.ptr)
