"""EXL2 checkpoint layouts: mixed-width packed weights, row permutation, scale codes, validation.

Tensors of one linear layer (K = in_features, N = stored out_features, G = groups):

- ``q_weight`` int32 [Q, N]: rows in *sorted* (permuted) order, group after group; group ``g`` has width
  ``b_g`` and occupies packed rows ``[qrow_start_g, qrow_start_{g+1})``, each column a little-endian bit
  stream of ``b_g``-bit values (:mod:`cupyq.formats.bitstream`). Widths appear in descending order.
- ``q_groups`` int16 [2G]: pairs ``(b_g, qrow_start_g)``.
- ``q_invperm`` int [K]: ``q_invperm[original_row] = sorted_row``; ``perm = argsort(q_invperm)``.
- ``q_scale`` int32 [G, N/8]: 4-bit scale codes packed along the columns (column ``n`` at word ``n // 8``,
  shift ``4 * (n % 8)``); ``q_scale_max`` float16 [G].

Dequantised weight: ``W_sorted[j, n] = (q[j, n] - 2**(b_g - 1)) * (code[g, n] + 1)**2 * q_scale_max[g] / 256``
for sorted row ``j`` of group ``g``, and ``W[i] = W_sorted[q_invperm[i]]`` in original row order.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from cupyq.formats.bitstream import (
    pack_bitstream,
    pack_bitstream_columns,
    unpack_bitstream,
    unpack_bitstream_columns,
)
from cupyq.formats.common import (
    is_int,
    require_dtype,
    require_finite,
    require_integer,
    require_ndim,
    require_shape,
    resolve_xp,
    to_host_ints,
    unit_rows,
)

__all__ = [
    "EXL2_BITS",
    "MAX_EXL2_ROWS",
    "Exl2Group",
    "Exl2Layout",
    "parse_q_groups",
    "make_group_map",
    "perm_from_invperm",
    "unpack_q_weight",
    "pack_q_weight",
    "decode_scales",
    "encode_scale_codes",
    "check_exl2",
    "exl2_out_features",
]

EXL2_BITS = (8, 6, 5, 4, 3, 2)
# The kernels hold row indices as uint16.
MAX_EXL2_ROWS = 65535
_INT16_MAX = 32767


class Exl2Group(NamedTuple):
    """One EXL2 group: width, packed-row range ``[qrow_start, qrow_start + qrows)`` and sorted-row range
    ``[row_start, row_start + rows)`` (``rows`` counts logical rows; the last group may use fewer rows than
    its packed rows could hold)."""

    bits: int
    qrow_start: int
    qrows: int
    row_start: int
    rows: int


class Exl2Layout(NamedTuple):
    """Shape facts of a validated EXL2 layer; ``groups`` is the tuple of parsed :class:`Exl2Group`."""

    in_features: int
    out_features: int
    groups: tuple


def _parse_pairs(q_groups, num_qrows):
    """Validate the (bits, first packed row) pairs; return (bits, qrow_starts, qrows) lists."""
    values = to_host_ints(q_groups, "q_groups")
    if not values or len(values) % 2:
        raise ValueError(f"q_groups: expected a non-empty even number of entries (pairs of width, first packed row), got {len(values)}")
    num_qrows = int(num_qrows)
    widths, starts = values[0::2], values[1::2]
    for i, b in enumerate(widths):
        if b not in EXL2_BITS:
            raise ValueError(f"q_groups: group {i} has width {b}, expected one of {EXL2_BITS}")
        if i and b > widths[i - 1]:
            raise ValueError(
                f"q_groups: widths must be in descending order {EXL2_BITS}; group {i} has width {b} after {widths[i - 1]}"
            )
    if starts[0] != 0:
        raise ValueError(f"q_groups: the first group must start at packed row 0, got {starts[0]}")
    ends = starts[1:] + [num_qrows]
    qrows = []
    for i, (b, start, end) in enumerate(zip(widths, starts, ends)):
        if end <= start:
            what = f"the {num_qrows} rows of q_weight" if i == len(widths) - 1 else f"group {i + 1}'s start {end}"
            raise ValueError(f"q_groups: group {i} starts at packed row {start}, not before {what}")
        if i < len(widths) - 1 and (end - start) * 32 % b:
            need = unit_rows(b) * b // 32
            raise ValueError(
                f"q_groups: group {i} ({b}-bit) spans {end - start} packed rows, not a multiple of {need} "
                f"(a whole number of {b}-bit rows)"
            )
        qrows.append(end - start)
    return widths, starts, qrows


def parse_q_groups(q_groups, num_qrows, height) -> list[Exl2Group]:
    """Row ranges of every EXL2 group.

    q_groups: int16/int32 [2G] pairs ``(bits, first packed row)`` (NumPy, CuPy, torch or a sequence); widths in
        ``EXL2_BITS``, non-increasing; starts strictly increasing from 0.
    num_qrows: ``q_weight.shape[0]``; height: K (the length of ``q_invperm``).
    Group ``g`` holds ``qrows_g * 32 // bits_g`` rows, except the last, which holds ``height - rows_so_far``
    (between 1 and its capacity). Raises ValueError naming ``q_groups``.
    """
    widths, starts, qrows = _parse_pairs(q_groups, num_qrows)
    height = int(height)
    groups, row = [], 0
    last = len(widths) - 1
    for i, (b, start, nq) in enumerate(zip(widths, starts, qrows)):
        capacity = nq * 32 // b
        rows = capacity if i < last else height - row
        if i == last and not 1 <= rows <= capacity:
            raise ValueError(
                f"q_groups: the groups hold {row + capacity} rows but q_invperm has {height}; "
                f"the last group ({b}-bit, {nq} packed rows) must take 1..{capacity} rows, got {rows}"
            )
        groups.append(Exl2Group(b, start, nq, row, rows))
        row += rows
    return groups


def make_group_map(q_groups, num_qrows, xp=None):
    """Per sorted row: (group index, rows left in the group counting this row), as the kernels read it.

    q_groups: int16/int32 [2G]; num_qrows: ``q_weight.shape[0]``. Every group, the last included, counts its
    full capacity ``qrows * 32 // bits`` (so for a partial last group the map is longer than 2K).
    Returns int16 [2 * total_rows], interleaved ``[g0, left0, g1, left1, ...]``; ``xp`` defaults to the module
    of ``q_groups``.
    """
    xp = resolve_xp(q_groups, xp)
    widths, _, qrows = _parse_pairs(q_groups, num_qrows)
    rows = [nq * 32 // b for b, nq in zip(widths, qrows)]
    if max(rows) > _INT16_MAX:
        raise ValueError(f"q_groups: a group of {max(rows)} rows does not fit the int16 group map")
    # Built on the host (at most 2 * 65535 entries) and moved to xp once.
    rows = np.asarray(rows, dtype=np.int32)
    group = np.repeat(np.arange(len(rows), dtype=np.int32), rows)
    end = np.cumsum(rows, dtype=np.int32)
    left = end[group] - np.arange(int(end[-1]), dtype=np.int32)
    return xp.asarray(np.stack([group, left], axis=1).astype(np.int16).reshape(-1))


def _host_or_self(a):
    # torch tensors are validated through a NumPy copy (q_invperm is small: K <= 65535).
    if hasattr(a, "detach"):
        return a.detach().cpu().numpy()
    return a


def perm_from_invperm(q_invperm, xp=None, *, name="q_invperm"):
    """``perm`` with ``perm[sorted_row] = original_row`` from ``q_invperm[original_row] = sorted_row``.

    q_invperm: int16/uint16/int32/int64 [K], a permutation of ``0..K-1``. 16-bit input is read as unsigned
    (as the kernels read it), then widened to int32 before inverting, so K up to 65535 is safe; the range is
    checked on the stored values, before int64 input is narrowed.
    Returns int32 [K]. Raises ValueError unless ``q_invperm`` is a permutation. name: the tensor the errors name
    (``"q_perm"`` where the same rule inverts a ``q_perm`` into its ``q_invperm``).
    """
    q_invperm = _host_or_self(q_invperm)
    xp = resolve_xp(q_invperm, xp)
    dtype = require_dtype(name, q_invperm, ("int16", "uint16", "int32", "int64"))
    require_ndim(name, q_invperm, 1)
    inv = xp.asarray(q_invperm)
    if dtype == "int16":
        inv = inv.astype(xp.int32) & 0xFFFF
    k = int(inv.shape[0])
    if k == 0:
        return inv.astype(xp.int32)
    lo, hi = int(inv.min()), int(inv.max())
    if lo < 0 or hi >= k:
        at = int(xp.argmin(inv)) if lo < 0 else int(xp.argmax(inv))
        raise ValueError(
            f"{name}: not a permutation of 0..{k - 1}: values range over [{lo}, {hi}] "
            f"(value {int(inv[at])} at row {at})"
        )
    inv = inv.astype(xp.int32)
    perm = xp.full(k, -1, dtype=xp.int32)
    perm[inv] = xp.arange(k, dtype=xp.int32)
    if int(perm.min()) < 0:  # K values into K slots: an empty slot means a repeated value
        raise ValueError(f"{name}: not a permutation of 0..{k - 1}: some values repeat")
    return perm


def _runs(groups):
    """Merge consecutive same-width groups whose bit streams continue each other into (bits, qs, qe, rs, rows)."""
    runs = []
    for g in groups:
        if runs:
            b, qs, qe, rs, rows, whole = runs[-1]
            if b == g.bits and whole and qe == g.qrow_start and rs + rows == g.row_start:
                runs[-1] = (b, qs, qe + g.qrows, rs, rows + g.rows, g.rows * g.bits == g.qrows * 32)
                continue
        runs.append((g.bits, g.qrow_start, g.qrow_start + g.qrows, g.row_start, g.rows, g.rows * g.bits == g.qrows * 32))
    return [r[:5] for r in runs]


def unpack_q_weight(q_weight, groups, xp=None):
    """Unpack EXL2 ``q_weight`` into integers in sorted row order.

    q_weight: int32 [Q, N]; groups: the :class:`Exl2Group` list from :func:`parse_q_groups`.
    Returns uint8 [K, N] with ``K = sum(g.rows)``; row ``j`` of group ``g`` is in ``[0, 2**g.bits)``.
    """
    xp = resolve_xp(q_weight, xp)
    require_dtype("q_weight", q_weight, ("int32", "uint32"))
    require_ndim("q_weight", q_weight, 2)
    groups = [Exl2Group(*g) for g in groups]
    if not groups:
        raise ValueError("groups: expected at least one group")
    row = 0
    for i, g in enumerate(groups):
        if g.row_start != row or g.rows < 1 or g.rows * g.bits > g.qrows * 32:
            raise ValueError(f"groups: group {i} {g} does not follow the previous group or overflows its packed rows")
        if g.qrow_start + g.qrows > q_weight.shape[0]:
            raise ValueError(f"q_weight: group {i} needs packed rows up to {g.qrow_start + g.qrows}, got {q_weight.shape[0]} rows")
        row += g.rows
    out = xp.empty((row, q_weight.shape[1]), dtype=xp.uint8)
    for bits, qs, qe, rs, rows in _runs(groups):
        out[rs : rs + rows] = unpack_bitstream(q_weight[qs:qe], bits, rows, xp=xp)
    return out


def pack_q_weight(q, group_bits, group_rows, xp=None):
    """Pack integer weights (sorted row order) into EXL2 ``q_weight`` and ``q_groups``.

    q: integer [K, N]; rows of group ``g`` hold values in ``[0, 2**group_bits[g])``.
    group_bits: widths per group, each in ``EXL2_BITS``, non-increasing.
    group_rows: rows per group, summing to K; every group but the last a multiple of
        ``32 // gcd(bits, 32)`` rows (16 for 2/6-bit, 32 for 3/5-bit, 8 for 4-bit, 4 for 8-bit). The last group
        is padded to that multiple with rows of ``2**(bits-1)`` (which dequantise to 0).
    Returns (q_weight int32 [Q, N], q_groups int16 [2G]).
    """
    xp = resolve_xp(q, xp)
    require_integer("q", q)
    require_ndim("q", q, 2)
    widths, rows = [int(b) for b in group_bits], [int(r) for r in group_rows]
    if not widths or len(widths) != len(rows):
        raise ValueError(f"group_rows: expected one row count per width ({len(widths)} widths), got {len(rows)}")
    for i, b in enumerate(widths):
        if b not in EXL2_BITS:
            raise ValueError(f"group_bits: group {i} has width {b}, expected one of {EXL2_BITS}")
        if i and b > widths[i - 1]:
            raise ValueError(f"group_bits: widths must be in descending order {EXL2_BITS}; group {i} has width {b} after {widths[i - 1]}")
    if sum(rows) != q.shape[0]:
        raise ValueError(f"group_rows: the groups hold {sum(rows)} rows, q has {q.shape[0]}")
    last = len(rows) - 1
    for i, (b, r) in enumerate(zip(widths, rows)):
        if r < 1:
            raise ValueError(f"group_rows: group {i} must have at least one row, got {r}")
        if i < last and r % unit_rows(b):
            raise ValueError(f"group_rows: group {i} ({b}-bit) has {r} rows; every group but the last needs a multiple of {unit_rows(b)} rows")
    pairs, pieces, qrow, row = [], [], 0, 0
    i = 0
    while i < len(widths):  # one bit stream per run of same-width groups
        b, j = widths[i], i
        while j + 1 < len(widths) and widths[j + 1] == b:
            j += 1
        run_rows = sum(rows[i : j + 1])
        values = q[row : row + run_rows]
        if values.size:
            lo, hi = int(values.min()), int(values.max())
            if lo < 0 or hi >= 1 << b:
                raise ValueError(f"q: rows {row}..{row + run_rows - 1} are {b}-bit, values must lie in [0, {1 << b}), got range [{lo}, {hi}]")
        pad = -run_rows % unit_rows(b)  # only the last group can leave a partial unit
        if pad:
            values = xp.concatenate([values, xp.full((pad, q.shape[1]), 1 << (b - 1), dtype=values.dtype)])
        pieces.append(pack_bitstream(values, b, xp=xp))
        for g in range(i, j + 1):
            pairs += [b, qrow]
            qrow += -(-rows[g] // unit_rows(b)) * unit_rows(b) * b // 32
        row += run_rows
        i = j + 1
    if qrow > _INT16_MAX:
        raise ValueError(f"q: {qrow} packed rows do not fit the int16 q_groups")
    q_weight = pieces[0] if len(pieces) == 1 else xp.concatenate(pieces)
    return q_weight, xp.asarray(pairs, dtype=xp.int16)


def decode_scales(q_scale, q_scale_max, xp=None):
    """Per-(group, column) scales of an EXL2 layer.

    q_scale: int32 [G, N/8], 4-bit codes packed along the columns (column ``n`` = field ``n % 8`` of word
    ``n // 8``); q_scale_max: float16/float32 [G] as stored (before any division by 256).
    Returns float32 [G, N]: ``(code + 1)**2 * q_scale_max[g] / 256``.
    """
    xp = resolve_xp(q_scale, xp)
    require_dtype("q_scale", q_scale, ("int32", "uint32"))
    require_ndim("q_scale", q_scale, 2)
    require_dtype("q_scale_max", q_scale_max, ("float16", "float32"))
    require_shape("q_scale_max", q_scale_max, (q_scale.shape[0],))
    codes = unpack_bitstream_columns(q_scale, 4, q_scale.shape[1] * 8, xp=xp).astype(xp.float32)
    codes += 1
    codes *= codes
    codes *= xp.true_divide(xp.asarray(q_scale_max).astype(xp.float32)[:, None], 256)  # see cupyq.formats.common
    return codes


def encode_scale_codes(codes, xp=None):
    """Pack 4-bit scale codes (0..15, stored as is) into EXL2 ``q_scale``.

    codes: integer [G, N], N a multiple of 8. Returns int32 [G, N/8] (column ``n`` at word ``n // 8``,
    shift ``4 * (n % 8)``); inverse of the unpack in :func:`decode_scales`.
    """
    xp = resolve_xp(codes, xp)
    require_integer("codes", codes)
    require_ndim("codes", codes, 2)
    if codes.shape[1] % 8:
        raise ValueError(f"codes: expected a column count that is a multiple of 8, got {codes.shape[1]}")
    try:
        return pack_bitstream_columns(codes, 4, xp=xp)
    except ValueError as err:
        raise ValueError(str(err).replace("values:", "codes:", 1)) from None


def _group_count(q_scale, q_scale_max, q_groups) -> int:
    """G, the rows of ``q_scale``; unless ``q_scale_max`` ([G]) and ``q_groups`` ([2G]) agree on another count, when
    ``q_scale`` is the tensor out of step and the shape checks name it."""
    groups = int(q_scale.shape[0])
    lengths = [int(t.shape[0]) if len(t.shape) == 1 else None for t in (q_scale_max, q_groups)]
    if lengths[0] is not None and lengths[0] != groups and lengths[1] == 2 * lengths[0]:
        return lengths[0]
    return groups


def check_exl2(q_weight, q_invperm, q_scale, q_scale_max, q_groups) -> Exl2Layout:
    """Validate the tensors of one EXL2 layer and return its :class:`Exl2Layout`.

    q_weight: int32 [Q, N] (N a multiple of 8); q_invperm: int16/int32/int64 [K], a permutation of 0..K-1,
    1 <= K <= 65535; q_scale: int32 [G, N/8]; q_scale_max: float16/float32 [G]; q_groups: int16/int32 [2G]
    (widths in ``EXL2_BITS``, descending, rows consistent with Q and K). Works on NumPy, CuPy and torch.
    Raises TypeError (dtype) or ValueError (shape, order, range, NaN/Inf q_scale_max) naming the tensor.
    """
    require_dtype("q_weight", q_weight, "int32")
    require_ndim("q_weight", q_weight, 2)
    require_dtype("q_invperm", q_invperm, ("int16", "uint16", "int32", "int64"))
    require_ndim("q_invperm", q_invperm, 1)
    require_dtype("q_scale", q_scale, "int32")
    require_ndim("q_scale", q_scale, 2)
    require_dtype("q_scale_max", q_scale_max, ("float16", "float32"))
    require_dtype("q_groups", q_groups, ("int16", "int32"))
    num_qrows, out_features = int(q_weight.shape[0]), int(q_weight.shape[1])
    if num_qrows == 0 or out_features == 0:
        raise ValueError(f"q_weight: expected a non-empty matrix, got shape {tuple(q_weight.shape)}")
    if out_features % 8:
        raise ValueError(f"q_weight: expected a column count that is a multiple of 8, got {out_features}")
    in_features = int(q_invperm.shape[0])
    if not 1 <= in_features <= MAX_EXL2_ROWS:
        raise ValueError(f"q_invperm: expected 1..{MAX_EXL2_ROWS} rows, got {in_features}")
    num_groups = _group_count(q_scale, q_scale_max, q_groups)
    require_shape("q_scale", q_scale, (num_groups, out_features // 8))
    require_shape("q_scale_max", q_scale_max, (num_groups,))
    require_shape("q_groups", q_groups, (2 * num_groups,))
    groups = parse_q_groups(q_groups, num_qrows, in_features)
    perm_from_invperm(q_invperm)
    require_finite("q_scale_max", q_scale_max)
    return Exl2Layout(in_features, out_features, tuple(groups))


def exl2_out_features(stored: int, bias=None, out_features=None) -> int:
    """The true output width of an EXL2 layer whose q_weight has ``stored`` columns (see ``QMatrix.from_exl2``):
    ``out_features`` when given (an int, ``stored - 31 .. stored``); else the length of a 1-D ``bias`` within that
    range (the bias is the one tensor of the true width), else ``stored``. Raises ValueError naming
    ``out_features``."""
    lowest = max(1, stored - 31)
    if out_features is None:
        shape = np.shape(bias) if bias is not None else ()
        return int(shape[0]) if len(shape) == 1 and lowest <= shape[0] <= stored else stored
    if not is_int(out_features) or not lowest <= out_features <= stored:
        raise ValueError(f"out_features: expected {lowest}..{stored} (q_weight's {stored} columns, fewer than 32 of "
                         f"them padding), got {out_features!r}")
    return int(out_features)
