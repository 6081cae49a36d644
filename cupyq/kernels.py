"""The contract between Python and the CUDA sources: kernel families, their template parameters, parameter
lists by name, and the shared-memory formulas the launches rely on.

Each family is declared once here; kernel names for NVRTC, the compile check's instantiation lists and the
launch argument lists are derived from these declarations.
"""

from __future__ import annotations

import dataclasses

CHUNK_ROWS = 64  # rows of one fragment chunk (cupyq/layout.py, cuda_src/qdq.cuh)
QMMA_THREADS = 256
QMMA_WARPS = QMMA_THREADS // 32
DTYPES = ("__half", "__nv_bfloat16")
STORAGES = ((False, True), (True, False), (True, True))  # (has 8-bit storage, has 4-bit storage)
GEMV_THREADS = 256  # threads of a qgemv or dequant CTA: 8 warps of 16 output columns (cuda_src/qgemm.cu)
STEP_CHUNKS = 4  # chunks qgemv streams per step; storage segments are whole steps (cupyq/layout.py)

# The constants the CUDA sources share with Python, handed to NVRTC as -DNAME=value options (cupyq.nvrtc's option
# set, which also keys CuPy's kernel cache); cuda_src/qgemm.cu and qdq.cuh do not compile without them.
NVRTC_DEFINES = {
    "CUPYQ_CHUNK_ROWS": CHUNK_ROWS,
    "CUPYQ_GEMV_THREADS": GEMV_THREADS,
    "CUPYQ_STEP_CHUNKS": STEP_CHUNKS,
}

# qgemv's parameters, in the order of its __global__ signature (cuda_src/qgemm.cu).
QGEMV_PARAMS = ("x", "row_src", "w8", "w4", "tile_group", "zs", "bias", "out", "ws", "counters", "M", "K", "N",
                "Npad", "C8", "C4", "chunks_per_split", "x_vec")
QGEMV_INT_PARAMS = frozenset(("M", "K", "N", "Npad", "C8", "C4", "chunks_per_split", "x_vec"))

# qmma's parameters, in the order of its __global__ signature (cuda_src/qmma.cu).
QMMA_PARAMS = ("x", "w8", "w4", "tile_group", "zs", "bias", "out", "ws", "counters",
               "M", "ldx", "N", "Npad", "C8", "C4")
QMMA_INT_PARAMS = frozenset(("M", "ldx", "N", "Npad", "C8", "C4"))

DEQUANT_T_PARAMS = ("w8", "w4", "tile_group", "zs", "outT", "ld_out", "Npad", "C8", "C4", "chunk_begin",
                    "chunk_end")
DEQUANT_T_INT_PARAMS = frozenset(("ld_out", "Npad", "C8", "C4", "chunk_begin", "chunk_end"))
DEQUANT_T_CHUNKS_PER_CTA = 4


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
        x = self.m_tile * (self.ks * CHUNK_ROWS + 8) * 2
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


# Tilings by the largest batch they serve (rows of x); the choice rule is launch.choose_qmma.
QMMA_CONFIGS = {
    16: QmmaConfig(mw=1, nw=1, wm=1, wn=8, ks=4, stages=4, minb=2),
    32: QmmaConfig(mw=2, nw=1, wm=1, wn=8, ks=4, stages=3, minb=2),
    128: QmmaConfig(mw=4, nw=2, wm=1, wn=8, ks=2, stages=3, minb=1),
}


def dequant_t_name(ctype: str, has8: bool, has4: bool) -> str:
    """Template instantiation name of the transposed dequantisation kernel."""
    return f"dequant_t<{ctype}, {_b(has8)}, {_b(has4)}>"


def qmma_kernel_names(configs=None) -> list[str]:
    """Every instantiation of cuda_src/qmma.cu that dispatch can launch."""
    configs = list(QMMA_CONFIGS.values()) if configs is None else list(configs)
    names = []
    for cfg in dict.fromkeys(configs):
        names += [cfg.name(t, zr, h8, h4) for t in DTYPES for zr in (1, 4) for h8, h4 in STORAGES]
    names += [dequant_t_name(t, h8, h4) for t in DTYPES for h8, h4 in STORAGES]
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
        names.append(qgemv_name("__half", 2, False, True))  # two m8 tiles: fp16, 4-bit storage (launch.py)
        names += [dequant_name(t, h8, h4) for t in DTYPES for h8, h4 in STORAGES]
        names += [gather_name(t) for t in DTYPES]
        return names
    if source == "qmma.cu":
        return qmma_kernel_names()
    return []
