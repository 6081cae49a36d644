"""The contract between Python and the CUDA sources: kernel families, their template parameters, parameter
lists by name, and the shared-memory formulas the launches rely on.

Each family is declared once here; kernel names for NVRTC, the compile check's instantiation lists and the
launch argument lists are derived from these declarations.
"""

from __future__ import annotations

import dataclasses

CHUNK_ROWS = 64  # rows of one fragment chunk (cupyq/layout.py, cuda_src/qdq.cuh)
QMMA_THREADS = 256  # threads of a qmma, qwgmma or dequant_t CTA (cuda_src/tensor_tiles.cuh)
DEQUANT_T_CHUNKS_PER_CTA = 4  # 64-row chunks one dequant_t CTA writes (cuda_src/qmma.cu)
QMMA_WARPS = QMMA_THREADS // 32
DTYPES = ("__half", "__nv_bfloat16")
CTYPES = {"float16": "__half", "bfloat16": "__nv_bfloat16"}  # kernel element type of each activation dtype
STORAGES = ((False, True), (True, False), (True, True))  # (has 8-bit storage, has 4-bit storage)
GEMV_THREADS = 256  # threads of a qgemv or dequant CTA: 8 warps of 16 output columns (cuda_src/qgemm.cu)
STEP_CHUNKS = 4  # chunks qgemv streams per step; storage segments are whole steps (cupyq/layout.py)

# The constants the CUDA sources share with Python, handed to NVRTC as -DNAME=value options (cupyq.nvrtc's option
# set, which also keys CuPy's kernel cache); cuda_src/qgemm.cu and qdq.cuh do not compile without them.
NVRTC_DEFINES = {
    "CUPYQ_CHUNK_ROWS": CHUNK_ROWS,
    "CUPYQ_GEMV_THREADS": GEMV_THREADS,
    "CUPYQ_STEP_CHUNKS": STEP_CHUNKS,
    "CUPYQ_TC_THREADS": QMMA_THREADS,
    "CUPYQ_DEQUANT_T_CHUNKS": DEQUANT_T_CHUNKS_PER_CTA,
}

# qgemv's parameters, in the order of its __global__ signature (cuda_src/qgemm.cu).
QGEMV_PARAMS = ("x", "w8", "w4", "tile_group", "zs", "bias", "out", "ws", "counters", "M", "K", "N", "Npad", "C8",
                "C4", "chunks_per_split", "x_vec")
QGEMV_INT_PARAMS = frozenset(("M", "K", "N", "Npad", "C8", "C4", "chunks_per_split", "x_vec"))

# dequant (cuda_src/qgemm.cu): the whole matrix in original row order, one CTA row per 64-row chunk.
DEQUANT_PARAMS = ("w8", "w4", "tile_group", "zs", "row_src", "out", "ld_out", "N", "Npad", "C8", "C4")
DEQUANT_INT_PARAMS = frozenset(("ld_out", "N", "Npad", "C8", "C4"))

# gather_columns (cuda_src/qgemm.cu): activations in sorted, padded row order for qgemv.
GATHER_PARAMS = ("x", "row_src", "out", "M", "K", "Kp")
GATHER_INT_PARAMS = frozenset(("M", "K", "Kp"))



def qgemv_smem_bytes(m: int, chunks: int, ctype: str) -> int:
    """Dynamic shared memory of a qgemv CTA for ``m`` batch rows and ``chunks`` 64-row chunks per split: the
    activations as fp16 (each row padded by 8), the chunk and tile groups (5 ints per chunk) and, for bf16
    activations, a word per batch row and step and one per batch row (the row scales; cuda_src/qgemm.cu, the
    comment above qgemv)."""
    smem = m * (chunks * CHUNK_ROWS + 8) * 2 + 5 * chunks * 4
    if ctype == "__nv_bfloat16":
        smem += m * (chunks // STEP_CHUNKS + 1) * 4
    return smem


# qmma's parameters, in the order of its __global__ signature (cuda_src/qmma.cu).
QMMA_PARAMS = ("x", "w8", "w4", "tile_group", "zs", "bias", "out", "ws", "counters", "M", "N", "Npad", "C8", "C4")
QMMA_INT_PARAMS = frozenset(("M", "N", "Npad", "C8", "C4"))

# frag_x writes qmma's activations in A-fragment order (cuda_src/qmma.cu): per 16 batch rows and 64-row chunk,
# FRAG_X_BLOCK_BYTES bytes; one thread per (16-row block, chunk, lane).
FRAG_X_PARAMS = ("x", "row_src", "xf", "M", "K", "chunks", "vec")
FRAG_X_INT_PARAMS = frozenset(("M", "K", "chunks", "vec"))
FRAG_X_BLOCK_BYTES = 16 * CHUNK_ROWS * 2

# qwgmma (cuda_src/qwgmma.cu, sm_90a) takes qmma's parameters; frag_xw writes its activations: per 8 batch rows
# and 64-row chunk WGMMA_X_GROUP_BYTES bytes of core matrices; one thread per 16 bytes.
FRAG_XW_PARAMS = ("x", "row_src", "xf", "M", "K", "chunks")
FRAG_XW_INT_PARAMS = frozenset(("M", "K", "chunks"))
WGMMA_X_GROUP_BYTES = 8 * CHUNK_ROWS * 2
WGMMA_N_TILE = 128  # output columns of a qwgmma CTA per column set (nw): two warpgroups of 64

DEQUANT_T_PARAMS = ("w8", "w4", "tile_group", "zs", "outT", "ld_out", "Npad", "C8", "C4", "chunk_begin",
                    "chunk_end")
DEQUANT_T_INT_PARAMS = frozenset(("ld_out", "Npad", "C8", "C4", "chunk_begin", "chunk_end"))


QMMA_SMEM_LIMIT = 227 * 1024  # dynamic shared memory one CTA may take on sm_80 and sm_90


def _b(v: bool) -> str:
    return "true" if v else "false"


@dataclasses.dataclass(frozen=True)
class QmmaConfig:
    """One tiling of the qmma kernel (template parameters MW, NW, WM, WN, KS, STAGES, MINB).

    A CTA's 8 warps are ``wk`` K slices x ``wm`` x ``wn``; each warp multiplies ``mw`` 16-row batch tiles by
    ``nw`` 16-column tiles; a pipeline stage holds ``ks`` 64-row chunks, ``stages`` of them in flight.
    """

    mw: int
    nw: int
    wm: int
    wn: int
    ks: int
    stages: int
    minb: int

    @property
    def wk(self) -> int:
        return QMMA_WARPS // (self.wm * self.wn)

    @property
    def m_tile(self) -> int:
        return self.wm * self.mw * 16

    @property
    def n_tile(self) -> int:
        return self.wn * self.nw * 16

    def smem_bytes(self, has8: bool, zr: int) -> int:
        """Dynamic shared memory of one CTA: ``Shape<...>::kSmemBytes`` in cuda_src/qmma.cu (``zr``: staged
        scale/zero rows per chunk, 1 or 4)."""
        nt = self.wn * self.nw
        w = nt * self.ks * (64 if has8 else 32) * 16
        x = self.m_tile * self.ks * CHUNK_ROWS * 2
        z = self.ks * zr * (self.n_tile + 8) * 4
        red = (self.wk - 1) * self.m_tile * self.n_tile * 4
        return self.stages * (w + x + z) + red

    def name(self, ctype: str, zr: int, has8: bool, has4: bool) -> str:
        """Template instantiation name of qmma for this tiling (``zr``: see :meth:`smem_bytes`)."""
        return (f"qmma<{ctype}, {self.mw}, {self.nw}, {self.wm}, {self.wn}, {self.ks}, {self.stages}, {zr}, "
                f"{self.minb}, {_b(has8)}, {_b(has4)}>")

    def workspace_floats(self, ctas: int) -> int:
        """fp32 partial sums the kernel may write: two tiles per CTA."""
        return 2 * ctas * self.m_tile * self.n_tile


# Tilings by the largest batch they serve (rows of x); the choice rule is rules.choose_qmma.
QMMA_CONFIGS = {
    16: QmmaConfig(mw=1, nw=1, wm=1, wn=8, ks=4, stages=4, minb=2),
    32: QmmaConfig(mw=2, nw=1, wm=1, wn=8, ks=4, stages=3, minb=2),
    128: QmmaConfig(mw=4, nw=1, wm=1, wn=8, ks=2, stages=4, minb=2),
}


@dataclasses.dataclass(frozen=True)
class WgmmaConfig:
    """One tiling of the sm_90a kernel qwgmma (cuda_src/qwgmma.cu, template parameters NB, NW, KS, STAGES): tiles
    of ``nb`` batch rows x ``nw`` * 128 columns, stages of ``ks`` 64-row chunks, ``stages`` of them in flight."""

    nb: int
    ks: int
    stages: int
    nw: int = 1

    m_tile = property(lambda self: self.nb)
    n_tile = property(lambda self: WGMMA_N_TILE * self.nw)

    def smem_bytes(self, has8: bool, zr: int) -> int:
        """Dynamic shared memory of one CTA: ``WShape<...>::kSmemBytes`` in cuda_src/qwgmma.cu."""
        w = (self.n_tile // 16) * self.ks * (64 if has8 else 32) * 16
        x = (self.nb // 8) * self.ks * WGMMA_X_GROUP_BYTES
        z = self.ks * zr * (self.n_tile + 8) * 4
        return self.stages * (-(-(w + x + z) // 128) * 128)

    def name(self, ctype: str, zr: int, has8: bool, has4: bool) -> str:
        return (f"qwgmma<{ctype}, {self.nb}, {self.nw}, {self.ks}, {self.stages}, {zr}, {_b(has8)}, "
                f"{_b(has4)}>")

    def workspace_floats(self, ctas: int) -> int:
        """fp32 partial sums the kernel may write: two tiles per CTA."""
        return 2 * ctas * self.nb * self.n_tile


# Tilings of qwgmma by name; the choice rule is rules.choose_wgmma, larger batches run several m blocks. The 16-
# and 32-row tiles of four-chunk stages run two CTAs per multiprocessor; the eight-chunk stages ("k8") halve the
# copy and barrier work per weight at one CTA per multiprocessor, which wins on layers too small to fill the GPU
# with tiles. CTAs of two column sets (nw = 2) were measured slower up to m = 192 and are left to
# scripts/tune_qmma.py.
WGMMA_CONFIGS = {
    "wg16": WgmmaConfig(nb=16, ks=4, stages=4),
    "wg16k8": WgmmaConfig(nb=16, ks=8, stages=3),
    "wg32": WgmmaConfig(nb=32, ks=4, stages=3),
    "wg32k8": WgmmaConfig(nb=32, ks=8, stages=2),
    "wg64": WgmmaConfig(nb=64, ks=4, stages=3),
    "wg128": WgmmaConfig(nb=128, ks=2, stages=4),
}


def tiling_misfit(cfg, chunks8: int, chunks4: int, zr: int) -> str | None:
    """Why tiling ``cfg`` (a QmmaConfig or WgmmaConfig) cannot run a layout of ``chunks8`` + ``chunks4`` 64-row
    chunks with ``zr`` scale rows per chunk, or None when it can: a stage must not straddle the end of a storage
    segment (each segment a whole number of stages) and its stages must fit a CTA's shared memory."""
    if chunks8 % cfg.ks or chunks4 % cfg.ks:
        return (f"stages of {cfg.ks} chunks do not divide the storage segments ({chunks8} chunks of 8-bit and "
                f"{chunks4} of 4-bit storage)")
    smem = cfg.smem_bytes(chunks8 > 0, zr)
    if smem > QMMA_SMEM_LIMIT:
        return f"needs {smem} bytes of shared memory, more than {QMMA_SMEM_LIMIT}"
    return None


def frag_xw_name(ctype: str) -> str:
    """Template instantiation name of the kernel that writes qwgmma's activations (core-matrix order)."""
    return f"frag_xw<{ctype}>"


def qwgmma_kernel_names(configs=None) -> list[str]:
    """Every instantiation of cuda_src/qwgmma.cu that dispatch can launch (on sm_90 devices only)."""
    configs = list(WGMMA_CONFIGS.values()) if configs is None else list(configs)
    names = [cfg.name(t, zr, h8, h4) for cfg in dict.fromkeys(configs) for t in DTYPES for zr in (1, 4)
             for h8, h4 in STORAGES]
    return names + [frag_xw_name(t) for t in DTYPES]


def dequant_t_name(ctype: str, has8: bool, has4: bool) -> str:
    """Template instantiation name of the transposed dequantisation kernel."""
    return f"dequant_t<{ctype}, {_b(has8)}, {_b(has4)}>"


def frag_x_name(ctype: str) -> str:
    """Template instantiation name of the kernel that writes qmma's activations in fragment order."""
    return f"frag_x<{ctype}>"


def qmma_kernel_names(configs=None) -> list[str]:
    """Every instantiation of cuda_src/qmma.cu that dispatch can launch."""
    configs = list(QMMA_CONFIGS.values()) if configs is None else list(configs)
    names = []
    for cfg in dict.fromkeys(configs):
        names += [cfg.name(t, zr, h8, h4) for t in DTYPES for zr in (1, 4) for h8, h4 in STORAGES]
    names += [dequant_t_name(t, h8, h4) for t in DTYPES for h8, h4 in STORAGES]
    names += [frag_x_name(t) for t in DTYPES]
    return names


def qgemv_name(ctype: str, mt: int, has8: bool, has4: bool) -> str:
    """Template instantiation name of the small-batch GEMM kernel (``mt`` m8 tiles of batch rows)."""
    return f"qgemv<{ctype}, {mt}, {_b(has8)}, {_b(has4)}>"


def dequant_name(ctype: str, has8: bool, has4: bool) -> str:
    """Template instantiation name of the dequantise kernel."""
    return f"dequant<{ctype}, {_b(has8)}, {_b(has4)}>"


def gather_name(ctype: str) -> str:
    """Template instantiation name of the activation gather kernel."""
    return f"gather_columns<{ctype}>"


def kernel_names(source: str) -> list[str]:
    """Every kernel instantiation a source file provides (what the compile check builds)."""
    if source == "qgemm.cu":
        names = [qgemv_name(t, 1, h8, h4) for t in DTYPES for h8, h4 in STORAGES]
        names.append(qgemv_name("__half", 2, False, True))  # two m8 tiles: fp16, 4-bit storage (plans.py)
        names += [dequant_name(t, h8, h4) for t in DTYPES for h8, h4 in STORAGES]
        names += [gather_name(t) for t in DTYPES]
        return names
    if source == "qmma.cu":
        return qmma_kernel_names()
    if source == "qwgmma.cu":
        return qwgmma_kernel_names()
    return []


# Sources whose kernels need an architecture-specific target: on an sm_90 device qwgmma.cu is built for sm_90a
# (wgmma); for other targets it compiles to kernels that trap, which dispatch never launches.
_SOURCE_TARGETS = {"qwgmma.cu": {"sm_90": "sm_90a"}}


def has_specific_targets(source: str) -> bool:
    """Whether ``source`` is built for an architecture-specific target on some devices."""
    return source in _SOURCE_TARGETS


def target_arch(source: str, arch: str) -> str:
    """The NVRTC target that ``source`` is built for when kernels are compiled for ``arch`` ("sm_NN")."""
    return _SOURCE_TARGETS.get(source, {}).get(arch, arch)
