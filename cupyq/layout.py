"""Device layout of a quantized matrix for the cupyq kernels (see cuda_src/qdq.cuh).

Both formats are brought to one form before they reach the GPU:

* rows in *sorted* order (GPTQ: stable sort by ``g_idx``; EXL2: the order stored in ``q_weight``), so each
  quantisation group is a contiguous run of rows;
* every run padded to a multiple of 16 rows (one tensor-core tile) and every storage segment (8-bit storage
  first, then 4-bit storage) padded to a multiple of 256 rows (one kernel step); padding rows have
  ``row_src == -1`` and read a zero activation;
* values of 2, 3 and 4 bits are stored in 4-bit fields, values of 5, 6 and 8 bits in bytes, in the order in
  which each lane of a warp consumes them as an mma A fragment;
* one 32-bit word per (group, column) holds half2(scale, zero constant).

All functions take NumPy or CuPy arrays (``xp``); the packing runs on the GPU when given CuPy arrays.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cupyq import kernels

TILE_ROWS = 16
CHUNK_ROWS = kernels.CHUNK_ROWS
STEP_ROWS = kernels.STEP_CHUNKS * CHUNK_ROWS
CTA_COLS = kernels.GEMV_THREADS // 32 * 16


@dataclasses.dataclass
class DeviceLayout:
    """Arrays and sizes the kernels read. ``w8``/``w4`` are uint32 arrays (possibly empty)."""

    in_features: int  # K, original rows
    out_features: int  # N, stored columns
    padded_rows: int  # Kp
    padded_cols: int  # Npad, a multiple of 16
    chunks8: int  # 64-row chunks of 8-bit storage
    chunks4: int  # 64-row chunks of 4-bit storage
    w8: object
    w4: object
    tile_group: object  # int32 [Kp / 16]
    zs: object  # uint32 [G, Npad]
    row_src: object  # int32 [Kp] (sorted padded row -> original row, -1 for padding) or None for identity


@dataclasses.dataclass
class RowPlan:
    """Where each sorted row goes in the padded order (host NumPy arrays)."""

    position: np.ndarray  # int64 [K]: padded row of sorted row j
    padded_rows: int
    rows8: int  # padded rows of 8-bit storage (a multiple of STEP_ROWS)
    tile_group: np.ndarray  # int32 [Kp / 16]


@dataclasses.dataclass
class LayoutShape:
    """The sizes of a device layout, without its arrays: what the dispatch rules read (host values)."""

    in_features: int
    out_features: int
    padded_rows: int
    padded_cols: int
    chunks8: int
    chunks4: int
    tile_group: np.ndarray  # int32 [Kp / 16]


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


def gptq_rows(g_idx, bits: int):
    """(perm, row_group, storage8) of a GPTQ layer (AWQ too: its g_idx is ``k // group_size``).

    g_idx: int [K] (host array), group of each original row. perm: int64 [K], the original row of each sorted
    row (a stable sort by group), or None when the rows are already sorted; row_group: int64 [K], group of each
    sorted row; storage8: bool [K], True for every row of an 8-bit layer (stored in bytes), False otherwise.
    """
    g = np.asarray(g_idx).astype(np.int64)
    perm = np.argsort(g, kind="stable")
    identity = np.array_equal(perm, np.arange(g.shape[0]))
    return (None if identity else perm), g[perm], np.full(g.shape[0], int(bits) == 8)


def exl2_rows(groups):
    """(row_group, storage8) of an EXL2 layer's sorted rows: groups are the parsed q_groups records (``rows`` and
    ``bits`` of each, widths descending); rows of 5-8-bit groups are stored in bytes, 2-4-bit ones in nibbles."""
    row_group = np.repeat(np.arange(len(groups)), [g.rows for g in groups])
    row_bits = np.repeat([g.bits for g in groups], [g.rows for g in groups])
    return row_group, row_bits > 4


def layout_shape(row_group, storage8, out_features: int) -> LayoutShape:
    """The :class:`LayoutShape` :func:`build_layout` gives rows of these groups and storage widths (host arrays,
    as for :func:`plan_rows`) and ``out_features`` columns, computed without any weights."""
    plan = plan_rows(row_group, storage8)
    return _shape_of(plan, int(np.asarray(row_group).shape[0]), out_features)


def _shape_of(plan: RowPlan, in_features: int, out_features: int) -> LayoutShape:
    return LayoutShape(
        in_features=in_features,
        out_features=out_features,
        padded_rows=plan.padded_rows,
        padded_cols=_round_up(out_features, 16),
        chunks8=plan.rows8 // CHUNK_ROWS,
        chunks4=(plan.padded_rows - plan.rows8) // CHUNK_ROWS,
        tile_group=plan.tile_group,
    )


def plan_rows(row_group: np.ndarray, storage8: np.ndarray) -> RowPlan:
    """Pad runs of equal group to 16 rows and storage segments to 256 rows.

    row_group: int [K], group of each sorted row (runs of equal values are contiguous).
    storage8: bool [K], True for rows stored in bytes; all True rows must come first.
    """
    row_group = np.asarray(row_group, dtype=np.int64)
    storage8 = np.asarray(storage8, dtype=bool)
    k = row_group.shape[0]
    rows8 = int(storage8.sum())
    if rows8 and not storage8[:rows8].all():
        raise ValueError("rows stored in 8-bit fields must precede the 4-bit ones (widths in descending order)")
    position = np.empty(k, dtype=np.int64)
    tile_groups = []
    offset = 0
    padded8 = 0
    for seg_start, seg_end in ((0, rows8), (rows8, k)):
        if seg_end == seg_start:
            continue
        g = row_group[seg_start:seg_end]
        starts = np.flatnonzero(np.concatenate(([True], g[1:] != g[:-1])))
        lengths = np.diff(np.append(starts, g.shape[0]))
        padded = (lengths + TILE_ROWS - 1) // TILE_ROWS * TILE_ROWS
        run_offset = offset + np.concatenate(([0], np.cumsum(padded)[:-1]))
        run_id = np.repeat(np.arange(starts.shape[0]), lengths)
        position[seg_start:seg_end] = run_offset[run_id] + (np.arange(g.shape[0]) - starts[run_id])
        tile_groups.append(np.repeat(g[starts], padded // TILE_ROWS))
        seg_rows = int(padded.sum())
        seg_padded = _round_up(seg_rows, STEP_ROWS)
        tile_groups.append(np.full((seg_padded - seg_rows) // TILE_ROWS, g[-1], dtype=np.int64))
        offset += seg_padded
        if seg_start == 0 and rows8:
            padded8 = seg_padded
    tile_group = np.concatenate(tile_groups).astype(np.int32) if tile_groups else np.zeros(0, np.int32)
    return RowPlan(position, offset, padded8, tile_group)


def pack_fragments4(q, xp):
    """Pack uint8 values [R, Npad] (R % 64 == 0, values < 16) into the 4-bit fragment order: uint32 words
    [Npad/16, R/64, 32 lanes, 4 tiles]."""
    r, n = q.shape
    c, t = r // CHUNK_ROWS, n // 16
    # k = c*64 + l4*16 + kh*8 + j*2 + kodd ; n = t*16 + dnh*8 + lg
    v = q.reshape(c, 4, 2, 4, 2, t, 2, 8)  # c, l4, kh, j, kodd, t, dnh, lg
    v = v.transpose(5, 0, 7, 1, 3, 4, 2, 6)  # t, c, lg, l4, j, kodd, kh, dnh  -> nibble p = kodd*4 + kh*2 + dnh
    # Nibbles 2b and 2b + 1 are byte b of the little-endian word. Two byte-wide operations instead of a widening
    # copy, shifts and a sum: each distinct array operation is one more kernel for CuPy to compile on first use.
    v = v.astype(xp.uint8, copy=False)
    # t, c, lg, l4, j, kodd, kh: the bytes of the words in order (the shift as a function: cupyq.formats.common)
    packed = v[..., 0] | xp.left_shift(v[..., 1], xp.uint8(4))
    return packed.reshape(t, c, 32, 4, 4).view(xp.uint32).reshape(t, c, 32, 4)


def pack_fragments8(q, xp):
    """Pack uint8 values [R, Npad] (R % 64 == 0) into the 8-bit fragment order: uint32 words
    [Npad/16, R/64, 2 halves, 32 lanes, 4 words]."""
    r, n = q.shape
    c, t = r // CHUNK_ROWS, n // 16
    # k = c*64 + l4*16 + kh*8 + (h*2 + jj)*2 + kodd ; n = t*16 + dnh*8 + lg
    v = q.reshape(c, 4, 2, 2, 2, 2, t, 2, 8)  # c, l4, kh, h, jj, kodd, t, dnh, lg
    v = v.transpose(6, 0, 3, 8, 1, 4, 2, 7, 5)  # t, c, h, lg, l4, jj, kh, dnh, kodd
    v = xp.ascontiguousarray(v.astype(xp.uint8))
    return v.reshape(-1).view(xp.uint32).reshape(t, c, 2, 32, 4)


def pack_scale_zero(scales, zeros, padded_cols: int, xp):
    """half2(scale, zc) words [G, Npad]: zc = 1024 + z for columns n % 16 < 8, -(64 + z) otherwise.

    scales: float [G, N]; zeros: integer [G, N] (true zero points).
    """
    g, n = scales.shape
    base, sign = (xp.asarray(row) for row in _zero_constant_rows(padded_cols))
    # Each word is built as its two float16 halves, (scale, zc), viewed as one little-endian uint32: few distinct
    # array operations (CuPy compiles a kernel for each on first use).
    halves = xp.zeros((g, padded_cols, 2), dtype=xp.float16)
    halves[:, :n, 0] = scales
    z = xp.zeros((g, padded_cols), dtype=xp.float32)
    z[:, :n] = zeros
    halves[:, :, 1] = z * sign + base  # exactly 1024 + z and -(64 + z): negation is exact in either order
    return halves.view(xp.uint32).reshape(g, padded_cols)


def _zero_constant_rows(padded_cols: int):
    """Host float32 rows (base, sign) over the padded columns, with zc = base + sign * z (see
    :func:`pack_scale_zero`): (1024, 1) for columns n % 16 < 8, (-64, -1) for the others."""
    low_half = np.arange(padded_cols) % 16 < 8
    return np.where(low_half, 1024.0, -64.0).astype(np.float32), np.where(low_half, 1.0, -1.0).astype(np.float32)


def build_layout(q_sorted, row_perm, row_group, storage8, scales, zeros, xp) -> DeviceLayout:
    """Build the device layout.

    q_sorted: uint8 [K, N] quantized values in sorted row order (xp array).
    row_perm: int [K] original row of each sorted row, or None when sorted order is the original order.
    row_group: int [K] group of each sorted row; storage8: bool [K] (host or xp arrays).
    scales: float [G, N]; zeros: integer [G, N] true zero points (xp arrays).
    """
    k, n = q_sorted.shape
    to_host = (lambda a: a.get()) if hasattr(row_group, "get") else np.asarray
    plan = plan_rows(to_host(row_group), to_host(storage8))
    shape = _shape_of(plan, k, n)
    kp, npad = shape.padded_rows, shape.padded_cols
    position = xp.asarray(plan.position)
    q_pad = xp.zeros((kp, npad), dtype=xp.uint8)
    q_pad[position, :n] = q_sorted
    w8 = pack_fragments8(q_pad[: plan.rows8], xp).reshape(-1) if plan.rows8 else xp.zeros(0, xp.uint32)
    w4 = pack_fragments4(q_pad[plan.rows8 :], xp).reshape(-1) if kp > plan.rows8 else xp.zeros(0, xp.uint32)
    del q_pad

    perm = None if row_perm is None else to_host(row_perm).astype(np.int64)
    identity = (perm is None or np.array_equal(perm, np.arange(k))) and kp == k
    row_src = None
    if not identity:
        src = np.full(kp, -1, dtype=np.int32)
        src[plan.position] = np.arange(k) if perm is None else perm
        row_src = xp.asarray(src)
    return DeviceLayout(
        in_features=k,
        out_features=n,
        padded_rows=kp,
        padded_cols=npad,
        chunks8=shape.chunks8,
        chunks4=shape.chunks4,
        w8=xp.ascontiguousarray(w8),
        w4=xp.ascontiguousarray(w4),
        tile_group=xp.asarray(plan.tile_group),
        zs=xp.ascontiguousarray(pack_scale_zero(scales, zeros, npad, xp)),
        row_src=row_src,
    )


def unpack_layout(layout: DeviceLayout, xp=np):
    """Inverse of the packing, for tests: returns (q_pad uint8 [Kp, Npad], scale float32 [Kp, Npad] of each row's
    group, zero float32 [Kp, Npad]) in sorted padded order. Pure array code; slow for large matrices."""
    kp, npad = layout.padded_rows, layout.padded_cols
    t = npad // 16
    rows8 = layout.chunks8 * CHUNK_ROWS
    q = xp.zeros((kp, npad), dtype=xp.uint8)
    if layout.chunks8:
        v = xp.asarray(layout.w8).view(xp.uint8).reshape(t, layout.chunks8, 2, 8, 4, 2, 2, 2, 2)
        # t, c, h, lg, l4, jj, kh, dnh, kodd -> c, l4, kh, h, jj, kodd, t, dnh, lg
        q[:rows8] = v.transpose(1, 4, 6, 2, 5, 8, 0, 7, 3).reshape(rows8, npad)
    if layout.chunks4:
        words = xp.asarray(layout.w4).reshape(t, layout.chunks4, 8, 4, 4)  # t, c, lg, l4, j
        nib = xp.stack([(words >> (4 * p)) & 15 for p in range(8)], axis=-1).astype(xp.uint8)
        nib = nib.reshape(t, layout.chunks4, 8, 4, 4, 2, 2, 2)  # t, c, lg, l4, j, kodd, kh, dnh
        # -> c, l4, kh, j, kodd, t, dnh, lg
        q[rows8:] = nib.transpose(1, 3, 6, 4, 5, 0, 7, 2).reshape(kp - rows8, npad)
    zs = xp.asarray(layout.zs)
    s = (zs & 0xFFFF).astype(xp.uint16).view(xp.float16).astype(xp.float32)
    zc = (zs >> 16).astype(xp.uint16).view(xp.float16).astype(xp.float32)
    low_half = (xp.arange(npad) % 16) < 8
    z = xp.where(low_half[None, :], zc - 1024.0, -zc - 64.0)
    groups = xp.asarray(layout.tile_group).repeat(16)
    return q, s[groups], z[groups]
