"""Per-rank slices of GPTQ, EXL2 and AWQ layer tensors (NumPy; no torch needed).

Every function takes one layer's tensors, either a mapping with the checkpoint's keys (NumPy, CuPy or
torch arrays, never modified) or a :class:`CheckpointLayer` (which reads only the rank's slices from the
safetensors files), and returns a dict of new NumPy arrays with the same keys for one rank. ``mode`` is
``"column"`` (split the outputs N) or ``"row"`` (split the inputs K: rank ``r`` keeps original input rows
``[r*K/W, (r+1)*K/W)``). The package docstring explains the scheme.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from cupyq.distributed.source import CheckpointLayer, _read, _require_shapes, _shape
from cupyq.formats import exl2 as _exl2
from cupyq.formats import gptq as _gptq
from cupyq.formats.common import is_int, unit_rows

__all__ = ["CheckpointLayer", "shard_gptq", "shard_exl2", "shard_awq", "shard_range", "MODES"]

MODES = ("column", "row")


def _require_keys(tensors, keys, what):
    if not isinstance(tensors, Mapping):
        raise TypeError(f"tensors: expected a mapping of a layer's tensors or a CheckpointLayer, got {type(tensors).__name__}")
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise ValueError(f"tensors: a {what} layer needs {list(keys)}; missing {missing} (got {sorted(tensors)})")


def _check_int(name, value) -> int:
    """``value`` as an int; TypeError naming the argument for anything but an int (bool included)."""
    if not is_int(value):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    return int(value)


def _check_rank(rank, world_size, mode=MODES[0]):
    rank, world_size = _check_int("rank", rank), _check_int("world_size", world_size)
    if world_size < 1:
        raise ValueError(f"world_size: expected at least 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank: expected 0..{world_size - 1}, got {rank}")
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    return rank, world_size


def shard_range(size, rank, world_size, *, multiple=1, what="size"):
    """``(start, stop)`` of rank's equal part of ``size`` elements; the part must be a multiple of ``multiple``.

    size, multiple: positive ints; rank: ``0 .. world_size - 1``. Raises ValueError naming ``what`` when ``size``
    does not split into ``world_size`` such parts, TypeError or ValueError naming a bad argument.
    """
    rank, world_size = _check_rank(rank, world_size)
    size, multiple = _check_int("size", size), _check_int("multiple", multiple)
    if size < 1 or multiple < 1:
        raise ValueError(f"size, multiple: expected positive ints, got {size} and {multiple}")
    part, rest = divmod(size, world_size)
    if rest or part % multiple or part == 0:
        raise ValueError(
            f"{what}: {size} does not split into {world_size} equal parts of a multiple of {multiple} "
            f"(needed by the packing)"
        )
    return rank * part, (rank + 1) * part


def _copy_other(tensors, out, keys):
    for k in keys:
        if k in tensors and k not in out:
            out[k] = _read(tensors, k)
    return out


# ------------------------------------------------------------------------------------------------ GPTQ
def _gptq_bits(tensors, bits):
    if bits is None and isinstance(tensors, CheckpointLayer):
        bits = tensors.info.bits[0]
    if bits is None and "g_idx" in tensors:
        qrows, k = _shape(tensors, "qweight")[0], _shape(tensors, "g_idx")[0]
        bits = qrows * 32 // k if k and (qrows * 32) % k == 0 else None
    if bits is None:
        raise ValueError("bits: required for a GPTQ layer without g_idx (or pass a CheckpointLayer)")
    bits = _check_int("bits", bits)
    if bits not in _gptq.GPTQ_BITS:
        raise ValueError(f"bits: expected one of {_gptq.GPTQ_BITS}, got {bits!r}")
    return bits


def shard_gptq(tensors, *, rank, world_size, mode, bits=None, group_size=None) -> dict:
    """One rank's part of a GPTQ layer.

    tensors: ``qweight`` int32 [K*b/32, N], ``qzeros`` int32 [G, N*b/32], ``scales`` float [G, N], optional
        ``g_idx`` int [K] and ``bias`` [N] (a mapping or a :class:`CheckpointLayer`).
    bits: 2, 3, 4 or 8 (None: from the CheckpointLayer, or from qweight and g_idx).
    group_size: rows per group (-1: one group) of a layer without g_idx, where the group count alone does not
        fix it (:func:`cupyq.formats.gptq.check_group_size`); checked against the groups when given.
    mode ``"column"``: outputs ``[r*N/W, (r+1)*N/W)`` of qweight, scales and bias and the matching qzeros
        words (N/W must be a multiple of ``32 // gcd(b, 32)`` so the zero fields of a rank fill whole words);
        ``g_idx`` whole.
    mode ``"row"``: input rows ``[r*K/W, (r+1)*K/W)`` of qweight and g_idx (K/W a multiple of the packing
        unit: 32 // b rows, 32 for 3-bit). When the rank's g_idx does not decrease (no act-order) its groups
        are the contiguous range ``[g_idx[r0], g_idx[r1-1]]``: qzeros and scales keep those rows and g_idx is
        rebased to start at 0. With act-order qzeros and scales stay whole and g_idx keeps its absolute
        groups; the rank's QMatrix sorts its own rows by group. ``bias`` is returned whole: add it once,
        after the partial products are summed.
    Returns a dict of new NumPy arrays with the keys of ``tensors`` (a missing g_idx is added when the
    rank's rows start inside a group, where the implied ``k // group_size`` would be wrong). Raises ValueError
    naming the tensor when the shapes of qzeros, scales, g_idx or bias do not fit qweight.
    """
    _require_keys(tensors, ("qweight", "qzeros", "scales"), "GPTQ")
    rank, world_size = _check_rank(rank, world_size, mode)
    bits = _gptq_bits(tensors, bits)
    qrows, n = _shape(tensors, "qweight")
    groups = _shape(tensors, "qzeros")[0]
    k = qrows * 32 // bits
    _require_shapes(tensors, {"qzeros": (groups, -(-n * bits // 32)), "scales": (groups, n), "g_idx": (k,),
                              "bias": (n,)})
    if group_size is not None:  # checked in both modes, as the docstring says
        group_size = _check_int("group_size", group_size)
        _gptq.check_group_size(k, groups, group_size)
    unit = unit_rows(bits)
    out = {}
    if mode == "column":
        c0, c1 = shard_range(n, rank, world_size, multiple=unit, what="qweight out_features")
        out["qweight"] = _read(tensors, "qweight", cols=slice(c0, c1))
        out["qzeros"] = _read(tensors, "qzeros", cols=slice(c0 * bits // 32, c1 * bits // 32))
        out["scales"] = _read(tensors, "scales", cols=slice(c0, c1))
        if "bias" in tensors:
            out["bias"] = _read(tensors, "bias", rows=slice(c0, c1))
        return _copy_other(tensors, out, ("g_idx",))

    r0, r1 = shard_range(k, rank, world_size, multiple=unit, what="qweight in_features")
    out["qweight"] = _read(tensors, "qweight", rows=slice(r0 * bits // 32, r1 * bits // 32))
    gs = None if "g_idx" in tensors and group_size is None else _gptq.check_group_size(k, groups, group_size)
    if "g_idx" in tensors:
        g = _read(tensors, "g_idx", rows=slice(r0, r1)).astype(np.int32)
    else:
        g = _gptq.default_g_idx(k, gs)[r0:r1]
    if g.size and (int(g.min()) < 0 or int(g.max()) >= groups):
        raise ValueError(f"g_idx: values must lie in [0, {groups}) (the number of groups), got [{int(g.min())}, {int(g.max())}]")
    if np.all(np.diff(g) >= 0):  # groups are a contiguous range: keep and rebase them
        lo, hi = int(g[0]), int(g[-1]) + 1
        out["qzeros"] = _read(tensors, "qzeros", rows=slice(lo, hi))
        out["scales"] = _read(tensors, "scales", rows=slice(lo, hi))
        g = g - np.int32(lo)
        if "g_idx" in tensors or not np.array_equal(g, _gptq.default_g_idx(r1 - r0, gs)):
            out["g_idx"] = g
    else:  # act-order: absolute groups, all of them
        out["qzeros"] = _read(tensors, "qzeros")
        out["scales"] = _read(tensors, "scales")
        out["g_idx"] = g
    return _copy_other(tensors, out, ("bias",))


# ------------------------------------------------------------------------------------------------ EXL2
def shard_exl2(tensors, *, rank, world_size, mode) -> dict:
    """One rank's part of an EXL2 layer.

    tensors: ``q_weight`` int32 [Q, N], ``q_invperm`` int [K], ``q_scale`` int32 [G, N/8], ``q_scale_max``
        float16 [G], ``q_groups`` int16 [2G], optional ``q_perm`` int [K] and ``bias`` [N] (N: stored width; a
        bias stored unpadded, fewer than 32 short, gets zeros for the padding columns, as checkpoints read it).
    mode ``"column"``: columns ``[r*N/W, (r+1)*N/W)`` of q_weight and bias and the matching q_scale words
        (N/W a multiple of 8); q_invperm, q_perm, q_scale_max and q_groups whole.
    mode ``"row"``: a new EXL2 layer holding the rank's original rows ``[r0, r1) = [r*K/W, (r+1)*K/W)``.
        Each original group that holds some of those rows gives one group of the shard with the same scale
        codes and q_scale_max, its rows in stored order. Every group but the last must fill whole packing
        units (``32 // gcd(bits, 32)`` rows), so a group that does not is stored at the width the kernels
        use for it anyway (4 bits for 2/3/4-bit values, 8 for 5/6/8-bit ones: the same values, exactly,
        with the smallest units) and followed by padding rows that hold the zero value ``2**(bits-1)``;
        widths still descend. The padding rows become original rows ``K/W ..`` of the shard, so
        ``q_invperm`` (int32) has ``K/W + padding`` entries: build the matrix with
        ``QMatrix.from_exl2(..., in_features=K // W)``, which makes the kernels read no input for them.
        ``bias`` is returned whole (add it once, after the reduce).
    Returns a dict of new NumPy arrays with the keys of ``tensors``; ValueError naming the tensor when a shape
    does not fit q_weight. Reads all of q_weight in row mode (the rank's rows are spread over every group).
    """
    parts = ("q_weight", "q_invperm", "q_scale", "q_scale_max", "q_groups")
    _require_keys(tensors, parts, "EXL2")
    rank, world_size = _check_rank(rank, world_size, mode)
    qrows, n = _shape(tensors, "q_weight")
    out = {}
    if mode == "column":
        groups, k = _shape(tensors, "q_scale_max")[0], _shape(tensors, "q_invperm")[0]
        _require_shapes(tensors, {"q_scale": (groups, n // 8), "q_groups": (2 * groups,), "q_perm": (k,)})
        c0, c1 = shard_range(n, rank, world_size, multiple=8, what="q_weight out_features")
        out["q_weight"] = _read(tensors, "q_weight", cols=slice(c0, c1))
        out["q_scale"] = _read(tensors, "q_scale", cols=slice(c0 // 8, c1 // 8))
        if "bias" in tensors:
            out["bias"] = _exl2_bias(tensors, n)[c0:c1]
        return _copy_other(tensors, out, ("q_invperm", "q_perm", "q_scale_max", "q_groups"))

    full = {p: _read(tensors, p) for p in parts}
    layout = _exl2.check_exl2(*(full[p] for p in parts))
    k = layout.in_features
    r0, r1 = shard_range(k, rank, world_size, what="q_invperm in_features")
    inv = full["q_invperm"].astype(np.int64)
    if full["q_invperm"].dtype == np.int16:
        inv &= 0xFFFF
    q_sorted = _exl2.unpack_q_weight(full["q_weight"], layout.groups, xp=np)
    stored = np.sort(inv[r0:r1])  # the rank's rows in stored order
    local_of_stored = np.empty(k, dtype=np.int64)
    local_of_stored[inv[r0:r1]] = np.arange(r1 - r0)

    kept, group_bits, group_rows, pieces, sorted_local = [], [], [], [], []
    for gi, g in enumerate(layout.groups):
        mine = stored[np.searchsorted(stored, g.row_start) : np.searchsorted(stored, g.row_start + g.rows)]
        if mine.size:
            kept.append(gi)
            group_bits.append(g.bits)
            group_rows.append(int(mine.size))
            pieces.append(q_sorted[mine])
            sorted_local.append(local_of_stored[mine])
    widths = _padded_widths(group_bits, group_rows)
    padding = 0
    for i, b in enumerate(widths):
        if b != group_bits[i]:  # same values at the wider width: shift by the difference of the zero points
            pieces[i] = (pieces[i] + np.uint8((1 << (b - 1)) - (1 << (group_bits[i] - 1)))).astype(np.uint8)
        pad = -group_rows[i] % unit_rows(b) if i < len(widths) - 1 else 0  # the last group may stay partial
        if pad:
            pieces[i] = np.concatenate([pieces[i], np.full((pad, n), 1 << (b - 1), dtype=np.uint8)])
            local = np.arange(r1 - r0 + padding, r1 - r0 + padding + pad)
            sorted_local[i] = np.concatenate([sorted_local[i], local])
            group_rows[i] += pad
            padding += pad
    group_bits = widths
    q_weight, q_groups = _exl2.pack_q_weight(np.concatenate(pieces), group_bits, group_rows, xp=np)
    local = np.concatenate(sorted_local)  # original (local) row of each new stored row
    q_invperm = np.empty(local.shape[0], dtype=np.int32)
    q_invperm[local] = np.arange(local.shape[0], dtype=np.int32)
    out["q_weight"] = np.ascontiguousarray(q_weight, dtype=np.int32)
    out["q_invperm"] = q_invperm
    out["q_scale"] = full["q_scale"][kept]
    out["q_scale_max"] = full["q_scale_max"][kept]
    out["q_groups"] = q_groups.astype(np.int16)
    if "q_perm" in tensors:
        out["q_perm"] = _exl2.perm_from_invperm(q_invperm, xp=np)
    if "bias" in tensors:
        out["bias"] = _exl2_bias(tensors, n)
    return out


def _exl2_bias(tensors, n):
    """The bias of an EXL2 layer at the stored width ``n``: one stored unpadded (converters pad N to a multiple
    of 32) gets zeros for the padding columns, as :meth:`CheckpointLayer.read` and ``Checkpoint.load_layer`` give
    it, so that every column shard holds the bias of its own columns."""
    width = _shape(tensors, "bias")
    if len(width) != 1 or not n - 31 <= width[0] <= n:
        raise ValueError(f"bias: expected shape ({n},) (q_weight's columns, or fewer than 32 less), got {width}")
    bias = _read(tensors, "bias")
    if width[0] == n:
        return bias
    padded = np.zeros(n, dtype=bias.dtype)
    padded[: width[0]] = bias
    return padded


def _padded_widths(group_bits, group_rows):
    """Width of each group of a row shard. A group whose rows do not fill whole packing units of its width is
    stored at the width the kernels store it with anyway (2/3/4-bit values in 4-bit fields, 5/6/8-bit values in
    bytes), whose units are smallest (8 and 4 rows), so it needs the fewest padding rows; earlier groups are
    widened where needed to keep widths descending."""
    last = len(group_bits) - 1
    widths = [
        (4 if b <= 4 else 8) if i < last and r % unit_rows(b) else b for i, (b, r) in enumerate(zip(group_bits, group_rows))
    ]
    for i in range(last - 1, -1, -1):
        widths[i] = max(widths[i], widths[i + 1])
    return widths


# ------------------------------------------------------------------------------------------------ AWQ
def shard_awq(tensors, *, rank, world_size, mode, group_size=None) -> dict:
    """One rank's part of an AutoAWQ GEMM layer (4-bit).

    tensors: ``qweight`` int32 [K, N/8] (8 outputs per word, packed along the outputs in AWQ's interleaved
        nibble order), ``qzeros`` int32 [K/gs, N/8] (same packing), ``scales`` float16 [K/gs, N], optional
        ``bias`` [N]; no g_idx: row ``k`` is in group ``k // gs``.
    group_size: rows per group, an int (None: K / groups; -1 or K for one group).
    mode ``"column"``: outputs ``[r*N/W, (r+1)*N/W)`` (N/W a multiple of 8, so whole words of qweight and
        qzeros; the nibble order lies within a word and is kept).
    mode ``"row"``: input rows ``[r0, r1)`` of qweight and the rows of qzeros and scales of their groups;
        K/W must be a multiple of gs, because the layout has no g_idx to say where a group starts. One group
        (gs = K) stays whole. ``bias`` is returned whole (add it once, after the reduce).
    Returns a dict of new NumPy arrays with the keys of ``tensors``.
    """
    _require_keys(tensors, ("qweight", "qzeros", "scales"), "AWQ")
    rank, world_size = _check_rank(rank, world_size, mode)
    if group_size is not None:
        group_size = _check_int("group_size", group_size)
    k, words = _shape(tensors, "qweight")
    groups, n = _shape(tensors, "scales")
    if n != words * 8:
        raise ValueError(f"scales: expected {words * 8} columns (8 per qweight word), got {n}")
    _require_shapes(tensors, {"qzeros": (groups, words), "bias": (n,)})
    if group_size is None or group_size == -1:
        group_size = k if groups == 1 else k // groups
    if group_size <= 0 or -(-k // group_size) != groups:
        raise ValueError(f"group_size: {group_size} gives {-(-k // max(group_size, 1))} groups for {k} rows, scales has {groups}")
    out = {}
    if mode == "column":
        c0, c1 = shard_range(n, rank, world_size, multiple=8, what="scales out_features")
        out["qweight"] = _read(tensors, "qweight", cols=slice(c0 // 8, c1 // 8))
        out["qzeros"] = _read(tensors, "qzeros", cols=slice(c0 // 8, c1 // 8))
        out["scales"] = _read(tensors, "scales", cols=slice(c0, c1))
        if "bias" in tensors:
            out["bias"] = _read(tensors, "bias", rows=slice(c0, c1))
        return out
    r0, r1 = shard_range(k, rank, world_size, what="qweight in_features")
    out["qweight"] = _read(tensors, "qweight", rows=slice(r0, r1))
    if groups == 1:
        out["qzeros"], out["scales"] = _read(tensors, "qzeros"), _read(tensors, "scales")
    else:
        if (r1 - r0) % group_size:
            raise ValueError(
                f"qweight: a row shard of {r1 - r0} rows does not hold whole groups of {group_size} rows "
                "(AWQ has no g_idx, so each rank's rows must start a group)"
            )
        g0, g1 = r0 // group_size, r1 // group_size
        out["qzeros"] = _read(tensors, "qzeros", rows=slice(g0, g1))
        out["scales"] = _read(tensors, "scales", rows=slice(g0, g1))
    return _copy_other(tensors, out, ("bias",))
