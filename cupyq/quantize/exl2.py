"""Round-to-nearest EXL2 quantizer (see :mod:`cupyq.quantize`)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from cupyq.formats import exl2 as _exl2
from cupyq.formats.common import is_int
from cupyq.quantize.common import (
    _bias_float16,
    _check_fp16_magnitude,
    _fp16_at_least,
    _importance_order,
    _weight_float32,
)


def _exl2_widths(bits, proportions, group_sizes):
    """Validated (widths, proportions, group size per width)."""
    raw_widths = np.atleast_1d(np.asarray(bits)).tolist()
    props = tuple(float(p) for p in np.atleast_1d(np.asarray(proportions, dtype=np.float64)).tolist())
    if not raw_widths:
        raise ValueError("bits: expected at least one width")
    for b in raw_widths:
        if b not in _exl2.EXL2_BITS:
            raise ValueError(f"bits: expected widths from {_exl2.EXL2_BITS}, got {tuple(raw_widths)}")
    widths = tuple(int(b) for b in raw_widths)
    if any(a <= b for a, b in zip(widths, widths[1:])):
        raise ValueError(f"bits: expected strictly descending widths, got {widths}")
    if len(props) != len(widths):
        raise ValueError(f"proportions: expected {len(widths)} values (one per width), got {len(props)}")
    if any(not (p > 0) for p in props) or abs(sum(props) - 1.0) > 1e-6:
        raise ValueError(f"proportions: expected positive fractions summing to 1, got {props}")
    if group_sizes is not None and not isinstance(group_sizes, Mapping):
        raise TypeError(f"group_sizes: expected a dict width -> group size, got {type(group_sizes).__name__}")
    sizes = {}
    for b in widths:
        # Entries for widths not in `bits` are ignored, so one dict can serve several configurations.
        gs = 32 if group_sizes is None or b not in group_sizes else group_sizes[b]
        step = 16 if b == 2 else 32
        if not isinstance(gs, (int, np.integer)) or isinstance(gs, bool) or gs <= 0 or gs % step:
            raise ValueError(f"group_sizes[{b}]: expected a positive multiple of {step}, got {gs!r}")
        sizes[b] = int(gs)
    return widths, props, sizes


def exl2_group_plan(in_features, bits=(4,), proportions=(1.0,), group_sizes=None):
    """Split ``in_features`` sorted rows into EXL2 groups.

    Width ``b`` with fraction ``p`` gets ``ceil(p * K / group_size[b])`` whole groups (fewer when
    earlier widths already cover ``K``), so every group boundary falls on a multiple of its group
    size (multiples of 32 rows; 16 for 2-bit groups). Only the last group of the matrix may be
    partial: it ends at ``K``.

    Returns:
        (group_bits, group_rows): two lists of ints, one entry per group in row order, widths
        non-increasing, ``sum(group_rows) == in_features``. ValueError unless ``in_features`` is a
        positive integer.
    """
    if not is_int(in_features) or in_features <= 0:
        raise ValueError(f"in_features: expected a positive integer, got {in_features!r}")
    in_features = int(in_features)
    widths, props, sizes = _exl2_widths(bits, proportions, group_sizes)
    group_bits, group_rows = [], []
    remaining = in_features
    for i, (b, p) in enumerate(zip(widths, props)):
        if remaining <= 0:
            break
        gs = sizes[b]
        if i == len(widths) - 1:
            count = -(-remaining // gs)
        else:
            # The small tolerance keeps float noise (0.7 * 320 = 224.00000000000003) from adding a group.
            count = max(0, math.ceil(min(p * in_features, remaining) / gs - 1e-9))
        for _ in range(count):
            rows = min(gs, remaining)
            group_bits.append(b)
            group_rows.append(rows)
            remaining -= rows
    return group_bits, group_rows


def _exl2_quantize_group(block, bits, qsm16):
    """Quantise one group of sorted rows, ``block`` float32 [rows, N], at width ``bits``.

    ``qsm16``, the group's float16 ``q_scale_max``, is its largest symmetric-grid step
    ``2 * max|w| / (2**bits - 1)`` rounded up to float16, so code 15 never clips any column. Each column
    then takes the code (0..15) whose scale ``(code + 1)**2 * q_scale_max / 256`` gives the smallest
    squared rounding error; a smaller
    scale than the column's own max-abs step may win when it trades a little clipping of an outlier
    for a finer grid.

    Returns (q uint8 [rows, N], codes uint8 [N], largest dequantised magnitude).
    """
    maxq = 2**bits - 1
    zero = 2 ** (bits - 1)
    best_err = np.full(block.shape[1], np.inf, dtype=np.float64)
    codes = np.zeros(block.shape[1], dtype=np.uint8)
    for code in range(16):
        scale = _exl2_decoded_scale(code, qsm16)
        levels = np.clip(np.rint(block / scale), -zero, maxq - zero)
        err = np.square(levels * scale - block, dtype=np.float64).sum(axis=0)
        better = err < best_err
        best_err[better] = err[better]
        codes[better] = code
    scales = _exl2_decoded_scale(codes, qsm16)
    q = np.clip(np.rint(block / scales) + zero, 0, maxq).astype(np.uint8)
    return q, codes, float(np.abs((q.astype(np.float32) - zero) * scales).max())


def _exl2_decoded_scale(code, qsm16):
    """float32 scale(s) exactly as the EXL2 dequantiser computes them (every step is exact in float32)."""
    c = np.asarray(code, dtype=np.float32) + np.float32(1.0)
    return c * c * (np.float32(qsm16) / np.float32(256.0))


def quantize_exl2(weight, *, bits=(4,), proportions=(1.0,), group_sizes=None, importance=None, bias=None, seed=0):
    """Round-to-nearest EXL2 quantisation of a ``[K, N]`` weight into checkpoint tensors.

    Rows are sorted by descending ``importance`` (``perm``) and split into groups by
    :func:`exl2_group_plan`: the most important rows get the widest width. Each group has a float16
    ``q_scale_max`` (from the group's max abs) and a 4-bit code per column, ``scale = (code + 1)**2 *
    q_scale_max / 256``, the code with the smallest squared error of that column; values are
    ``q = clamp(round(w / scale) + 2**(b-1), 0, 2**b - 1)``.

    Args:
        weight: float array ``[K, N]`` = ``[in, out]`` (NumPy, CuPy or torch), ``K <= 65535``.
        bits: widths from (8, 6, 5, 4, 3, 2) in strictly descending order.
        proportions: fraction of rows per width, positive, summing to 1.
        group_sizes: dict width -> rows per group (default 32; multiples of 32, 16 for 2-bit).
        importance: float ``[K]``; ``None`` draws a random importance from ``seed``. A constant
            importance keeps the original row order.
        bias: optional float ``[N]``, stored as float16 (not padded).
        seed: seed of the random importance.

    Returns:
        dict of NumPy arrays, ``N_pad = ceil(N / 32) * 32``:
          ``q_weight`` int32 ``[Q, N_pad]`` (sorted rows, per-group bit streams; padded columns
          hold ``2**(b-1)``, i.e. zero), ``q_invperm`` int32 ``[K]`` (``q_invperm[row] = sorted
          position``), ``q_scale`` int32 ``[G, N_pad/8]`` (codes, 8 per word along N),
          ``q_scale_max`` float16 ``[G]`` (not divided by 256), ``q_groups`` int16 ``[2G]``
          (width, first packed row), and ``bias`` float16 ``[N]`` if given.
    """
    w = _weight_float32(weight)
    k, n = w.shape
    if k > 65535:
        raise ValueError(f"weight: in_features {k} exceeds the EXL2 limit of 65535 rows")
    group_bits, group_rows = exl2_group_plan(k, bits, proportions, group_sizes)

    perm = _importance_order(importance, k, seed)
    invperm = np.empty(k, dtype=np.int32)
    invperm[perm] = np.arange(k, dtype=np.int32)

    n_pad = -(-n // 32) * 32
    w_sorted = w[perm]
    q = np.empty((k, n_pad), dtype=np.uint8)
    codes = np.zeros((len(group_bits), n_pad), dtype=np.uint8)
    starts = np.cumsum([0] + group_rows[:-1])
    steps = [2.0 * np.abs(w_sorted[s : s + r]).max() / (2**b - 1) for s, b, r in zip(starts, group_bits, group_rows)]
    q_scale_max = _fp16_at_least(np.array(steps, dtype=np.float32), w.shape)
    largest = 0.0
    for g, (b, start, rows) in enumerate(zip(group_bits, starts, group_rows)):
        q[start : start + rows, :n], codes[g, :n], group_largest = _exl2_quantize_group(
            w_sorted[start : start + rows], b, q_scale_max[g]
        )
        q[start : start + rows, n:] = 2 ** (b - 1)
        largest = max(largest, group_largest)
    _check_fp16_magnitude(largest)

    q_weight, q_groups = _exl2.pack_q_weight(q, group_bits, group_rows, xp=np)
    out = {
        "q_weight": np.ascontiguousarray(q_weight, dtype=np.int32),
        "q_invperm": invperm,
        "q_scale": np.ascontiguousarray(_exl2.encode_scale_codes(codes, xp=np), dtype=np.int32),
        "q_scale_max": q_scale_max,
        "q_groups": np.ascontiguousarray(q_groups, dtype=np.int16),
    }
    if bias is not None:
        out["bias"] = _bias_float16(bias, n)
    return out
