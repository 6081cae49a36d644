"""Which kernel a batch gets: the dispatch rules, in order, with the reason for each choice; the tilings of the
tensor-core kernels by batch and layer size; the kernels a matrix's calls need (for warm-up and the compile
lists), found without compiling anything.

Every function takes a QMatrix-like object (``in_features``, ``out_features``, ``device_id``, ``layout`` with
``chunks8``, ``chunks4``, ``tile_group``, and the cache ``_plans``); :func:`explain` answers for a named
architecture without a device.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np

from cupyq import kernels
from cupyq.device import architecture_key
from cupyq.device import compute_capability as device_compute_capability

# Batches of more rows than this go through dequantise + dense matmul unless force_cuda is given. Measured on an
# H200 (BENCHMARKS.md): qmma wins up to m = 128 on layers of 32 M weights or more, and up to m = 64 on smaller
# ones, where the dense product is cheap and the quantized kernel's work per weight dominates; where qwgmma runs
# (sm_90), it wins up to m = 256 and 128.
DENSE_THRESHOLD = int(os.environ.get("CUPYQ_DENSE_THRESHOLD", 128))
SMALL_LAYER_WEIGHTS = 1 << 25
SMALL_LAYER_THRESHOLD = min(64, DENSE_THRESHOLD)
WGMMA_DENSE_THRESHOLD = int(os.environ.get("CUPYQ_WGMMA_DENSE_THRESHOLD", 256))
WGMMA_SMALL_LAYER_THRESHOLD = min(128, WGMMA_DENSE_THRESHOLD)
# On layers of at least WIDE_TILE_WEIGHTS weights qwgmma's 16-row tile beats the two-tile qgemv from this many rows
# on (below, and on smaller layers, qgemv stays faster for the batches it takes).
WGMMA_LARGE_LAYER_MIN_M = 13


def dense_threshold(qm) -> int:
    """Largest batch (rows of x) that :func:`gemm` sends to the quantized kernel for this matrix."""
    small = qm.in_features * qm.out_features < SMALL_LAYER_WEIGHTS
    if wgmma_supported(qm):
        return WGMMA_SMALL_LAYER_THRESHOLD if small else WGMMA_DENSE_THRESHOLD
    return SMALL_LAYER_THRESHOLD if small else DENSE_THRESHOLD


def wgmma_supported(qm) -> bool:
    """Whether qwgmma can run ``qm``: an sm_90 device (any storage: 4-bit, 8-bit, or EXL2 mixes of both, whose
    stages never straddle the two since each storage segment is whole steps of 256 rows). ValueError for a matrix
    that runs no kernel (a CPU matrix, or a closed one)."""
    _kernel_layout(qm)
    return device_compute_capability(qm.device_id) == (9, 0)


# Batches of at most this many rows (two m8 tiles; see _two_tile_gemv for 9-16) use the streaming kernel qgemv:
# whole waves of CTAs (normally one), each warp running through a long range of rows, only the M activation
# rows in shared memory.
GEMV_MAX_M = 16


def choose_kernel(qm, m: int, ctype: str, force_cuda: bool = False) -> tuple:
    """(kernel, reason): which path :func:`gemm` takes for ``m`` rows of ``ctype`` activations, by rules in
    order. Kernels: "qgemv" (streaming, one m8 tile), "qgemv2" (two m8 tiles), "qwgmma" (warpgroup tensor-core
    kernel, sm_90, from m = 9 where qgemv2 does not run), "qmma" (pipelined tensor-core kernel), "dense"
    (dequantise into scratch + dense matmul; falls back to the quantized kernel when the scratch cannot hold a
    chunk of 64 rows). A CPU matrix runs no kernel (it multiplies by the float32 reference): ValueError, pointing
    to :func:`explain`, which answers for it on a named architecture."""
    _kernel_layout(qm)
    if m <= 8:
        return "qgemv", "m <= 8: the streaming kernel with one m8 tile"
    weights = qm.in_features * qm.out_features
    wgmma = wgmma_supported(qm)
    note = ""
    if m <= GEMV_MAX_M and _two_tile_gemv(qm, ctype):
        if not (wgmma and m >= WGMMA_LARGE_LAYER_MIN_M and weights >= WIDE_TILE_WEIGHTS):
            return "qgemv2", "9-16 rows of fp16 on 4-bit storage: the streaming kernel with two m8 tiles"
        note = f" (faster than the two-tile streaming kernel from {WGMMA_LARGE_LAYER_MIN_M} rows on this large layer)"
    if m > dense_threshold(qm) and not force_cuda:
        return "dense", f"m > {dense_threshold(qm)}: dequantise and multiply densely (compute-bound batches)"
    if wgmma:
        cfg = choose_wgmma(m, weights, qm.layout.chunks8, qm.layout.chunks4, scale_rows_per_chunk(qm))
        if weights < SMALL_LAYER_WEIGHTS and cfg.m_tile < m:
            note = " (a layer below 32 M weights: more, smaller tiles fill the GPU)"
        return "qwgmma", (f"m = {m} on sm_90: qwgmma with {cfg.m_tile}x{cfg.n_tile} tiles, stages of {cfg.ks} "
                          f"chunks{note}")
    cfg = choose_qmma(m, weights)
    return "qmma", f"m = {m}: qmma with {cfg.m_tile}x{cfg.n_tile} tiles"


def explain(qm, m: int, ctype: str, compute_capability, force_cuda: bool = False) -> tuple:
    """(kernel, reason) of :func:`choose_kernel` for ``qm`` as if it were on a device of ``compute_capability``
    ((major, minor), e.g. (9, 0)), asking no device and compiling nothing. ``qm`` needs only ``in_features``,
    ``out_features`` and a ``layout`` with ``chunks8``, ``chunks4``, ``padded_rows``, ``padded_cols`` and
    ``tile_group``: a GPU QMatrix's device layout, or a checkpoint layer's :class:`cupyq.layout.LayoutShape` worked
    out on the CPU (:func:`cupyq.explain.layer_shape`); a CPU QMatrix answers with the LayoutShape its device
    layout would have (``CpuQMatrix.layout_shape()``). ctype: ``"__half"`` or ``"__nv_bfloat16"``."""
    layout = getattr(qm, "layout", None)
    if layout is None and callable(getattr(qm, "layout_shape", None)):
        layout = qm.layout_shape()
    if layout is None:
        raise ValueError(f"qm: expected a QMatrix or an object with a layout, got a {type(qm).__name__} without one "
                         "(a closed matrix?)")
    # The rules read the architecture through the device id: a stand-in id answers without a device.
    on_arch = SimpleNamespace(in_features=qm.in_features, out_features=qm.out_features, layout=layout,
                              device_id=architecture_key(compute_capability), _plans={})
    return choose_kernel(on_arch, m, ctype, force_cuda)


def _kernel_layout(qm):
    """The device layout of a matrix that runs the kernels; ValueError naming ``qm`` for one on the CPU (the float32
    reference, no kernel) or a closed one."""
    layout = getattr(qm, "layout", None)
    if getattr(qm, "device_id", None) is None:
        raise ValueError("qm: the matrix lives on the CPU and runs the float32 reference, no kernel; "
                         "rules.explain(qm, m, ctype, compute_capability) says which kernel it would run on a GPU of "
                         "that architecture")
    if layout is None:
        raise ValueError("qm: the matrix was closed (it has no device layout)")
    return layout


# Layers of at least this many weights take the 64-row qmma tile from m = 33 on: enough tiles to fill the GPU.
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


def choose_wgmma(m: int, weights: int = WIDE_TILE_WEIGHTS, chunks8: int = 0, chunks4: int = 0,
                 zr: int = 1) -> kernels.WgmmaConfig:
    """The qwgmma tiling for ``m`` rows of a layer of ``weights`` weights (measured on an H200, BENCHMARKS.md).

    Layers of WIDE_TILE_WEIGHTS or more: the smallest batch tile of 16, 32, 64 or 128 rows that holds the batch.
    Layers below SMALL_LAYER_WEIGHTS: 16-row tiles of eight-chunk stages up to m = 32, 32-row ones above (more,
    smaller tiles fill the GPU). Layers between: eight-chunk stages up to m = 32, then 64-row tiles. An
    eight-chunk tiling that cannot run the layout (``chunks8`` / ``chunks4``: its 64-row chunks of 8-bit and 4-bit
    storage; ``zr``: scale rows per chunk, see :func:`scale_rows_per_chunk`; :func:`kernels.tiling_misfit`) gives
    way to the four-chunk tiling of its batch tile, which runs every layout.
    """
    cfgs = kernels.WGMMA_CONFIGS
    if weights < SMALL_LAYER_WEIGHTS:
        names = ("wg16k8", "wg16") if m <= 32 else ("wg32k8", "wg32")
    elif weights < WIDE_TILE_WEIGHTS and m <= 32:
        names = ("wg16k8", "wg16") if m <= 16 else ("wg32k8", "wg32")
    else:
        nb = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 or weights < WIDE_TILE_WEIGHTS else 128
        names = (f"wg{nb}",)
    fitting = [cfgs[n] for n in names if kernels.tiling_misfit(cfgs[n], chunks8, chunks4, zr) is None]
    return fitting[0] if fitting else cfgs[names[-1]]


def scale_rows_per_chunk(qm) -> int:
    """The tensor-core kernels' ZR: 1 when the four 16-row tiles of every 64-row chunk share one group (GPTQ with
    groups of 64 rows or more and no act-order), so a stage holds one row of scale/zero words per chunk; else 4."""
    cached = qm._plans.get("chunk_uniform")
    if cached is None:
        tg = qm.layout.tile_group
        tg = (tg.get() if hasattr(tg, "get") else np.asarray(tg)).reshape(-1, 4)
        cached = qm._plans["chunk_uniform"] = bool((tg == tg[:, :1]).all())
    return 1 if cached else 4


def _two_tile_gemv(qm, ctype: str) -> bool:
    """Whether batches of 9-16 rows take qgemv with two m8 tiles: measured faster than qmma for fp16 activations
    and weights in 4-bit storage (2-4 bits); other matrices run qmma for them."""
    return ctype == "__half" and qm.layout.chunks8 == 0


def _warmup_batches(max_m: int) -> list:
    """Batch sizes warm-up runs: the largest of each kernel variant needs the largest workspace."""
    return [m for m in sorted({1, 2, 3, 4, 8, 9, 12, 13, 16, 17, 32, 33, 64, 65, 128, 129, 256, max_m}) if m <= max_m]


def needed_kernels(qm, *, max_m: int = 64, dtypes=("float16",)) -> set:
    """(source, kernel name) of every kernel ``qm``'s calls of up to ``max_m`` rows use, found by the dispatch
    rules without compiling anything."""
    lay = qm.layout
    has8, has4 = lay.chunks8 > 0, lay.chunks4 > 0
    zr = scale_rows_per_chunk(qm)
    weights = qm.in_features * qm.out_features
    names = set()
    for dt in dtypes:
        ctype = kernels.CTYPES[str(dt).removeprefix("torch.")]
        for m in _warmup_batches(max_m):
            kernel, _ = choose_kernel(qm, m, ctype)
            if kernel == "dense":
                names.add(("qmma.cu", kernels.dequant_t_name(ctype, has8, has4)))
            elif kernel == "qwgmma":
                cfg = choose_wgmma(m, weights, lay.chunks8, lay.chunks4, zr)
                names.add(("qwgmma.cu", cfg.name(ctype, zr, has8, has4)))
                names.add(("qwgmma.cu", kernels.frag_xw_name(ctype)))
            elif kernel in ("qgemv", "qgemv2"):
                names.add(("qgemm.cu", kernels.qgemv_name(ctype, 1 if kernel == "qgemv" else 2, has8, has4)))
            else:
                names.add(("qmma.cu", choose_qmma(m, weights).name(ctype, zr, has8, has4)))
                names.add(("qmma.cu", kernels.frag_x_name(ctype)))
        names.add(("qgemm.cu", kernels.dequant_name(ctype, has8, has4)))
        names.add(("qgemm.cu", kernels.gather_name(ctype)))
    return names
