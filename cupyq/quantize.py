"""Round-to-nearest quantizer producing GPTQ, EXL2 and AWQ checkpoint tensors (NumPy).

This is not GPTQ's error-compensating solver: every weight is rounded to the nearest level of its
group's grid. It exists to make realistic checkpoints of any shape and configuration for tests,
benchmarks and demos; the tensors it returns are laid out exactly as GPTQ / EXL2 files store them.

Weights are ``[K, N]`` = ``[in_features, out_features]`` (the transpose of ``torch.nn.Linear.weight``),
so ``y = x @ W``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from cupyq.formats import awq as _awq
from cupyq.formats import exl2 as _exl2
from cupyq.formats import gptq as _gptq

__all__ = ["quantize_gptq", "quantize_exl2", "quantize_awq", "exl2_group_plan", "relative_error"]

_CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
_FP16_MAX = float(np.finfo(np.float16).max)


# --------------------------------------------------------------------------------------------
# input handling
# --------------------------------------------------------------------------------------------


def _as_numpy(a, name):
    """NumPy view/copy of a NumPy, CuPy or torch array (float32 for torch bfloat16)."""
    module = type(a).__module__.split(".")[0]
    if module == "cupy":
        return a.get()
    if module == "torch":
        t = a.detach().cpu()
        if not t.dtype.is_floating_point:
            return t.numpy()
        return t.float().numpy()
    try:
        return np.asarray(a)
    except Exception as exc:  # pragma: no cover - depends on the object passed
        raise TypeError(f"{name}: expected an array, got {type(a).__name__}") from exc


def _weight_float32(weight):
    """Validated float32 copy of a ``[K, N]`` floating weight."""
    w = _as_numpy(weight, "weight")
    if w.ndim != 2:
        raise ValueError(f"weight: expected a 2-D [in_features, out_features] array, got shape {w.shape}")
    if w.dtype.kind != "f":
        raise TypeError(f"weight: expected a floating dtype, got {w.dtype}")
    if w.shape[0] == 0 or w.shape[1] == 0:
        raise ValueError(f"weight: expected a non-empty matrix, got shape {w.shape}")
    w = np.array(w, dtype=np.float32, copy=True)
    if not np.all(np.isfinite(w)):
        raise ValueError("weight: contains NaN or infinity")
    return w


def _bias_float16(bias, out_features):
    b = _as_numpy(bias, "bias")
    if b.dtype.kind != "f":
        raise TypeError(f"bias: expected a floating dtype, got {b.dtype}")
    if b.shape != (out_features,):
        raise ValueError(f"bias: expected shape ({out_features},), got {b.shape}")
    return np.array(b, dtype=np.float16, copy=True)


def _importance_order(importance, in_features, seed):
    """Permutation ``perm`` (int64 [K]) listing rows by descending importance.

    ``perm[rank] = row``. Ties keep the original row order (stable sort), so a constant importance
    gives the identity. ``importance=None`` draws a random importance from ``seed``.
    """
    if importance is None:
        imp = np.random.default_rng(seed).random(in_features)
    else:
        imp = _as_numpy(importance, "importance")
        if imp.shape != (in_features,):
            raise ValueError(f"importance: expected shape ({in_features},), got {imp.shape}")
        if imp.dtype.kind not in "fiub":
            raise TypeError(f"importance: expected a real dtype, got {imp.dtype}")
        imp = imp.astype(np.float64)
        if not np.all(np.isfinite(imp)):
            raise ValueError("importance: contains NaN or infinity")
    return np.argsort(-imp, kind="stable")


def _fp16_at_least(values):
    """float16 of ``values`` rounded up (never below the float32 input) and never zero."""
    if np.any(values > _FP16_MAX):
        raise ValueError(
            f"weight: magnitudes too large for float16 scales (largest scale {float(values.max()):.4g} "
            f"> {_FP16_MAX})"
        )
    v16 = values.astype(np.float16)
    low = v16.astype(np.float32) < values
    v16[low] = np.nextafter(v16[low], np.float16(np.inf))
    v16[v16 == 0] = np.float16(1.0)
    return v16


# --------------------------------------------------------------------------------------------
# GPTQ
# --------------------------------------------------------------------------------------------


def _gptq_group_index(in_features, group_size, act_order, importance, seed):
    """g_idx int32 [K] and the number of groups.

    Without act-order row ``k`` is in group ``k // group_size``. With act-order (GPTQ ``desc_act``)
    rows are ranked by descending importance and ``g_idx[row] = rank(row) // group_size``.
    """
    if group_size == -1:
        return np.zeros(in_features, dtype=np.int32), 1
    groups = -(-in_features // group_size)
    if not act_order:
        return (np.arange(in_features) // group_size).astype(np.int32), groups
    perm = _importance_order(importance, in_features, seed)
    rank = np.empty(in_features, dtype=np.int64)
    rank[perm] = np.arange(in_features)
    return (rank // group_size).astype(np.int32), groups


def _group_reduce(w, g_idx, groups, ufunc):
    """Per-group column reduction: ``ufunc.reduce`` of the rows of ``w`` in each group -> [G, N]."""
    order = np.argsort(g_idx, kind="stable")
    counts = np.bincount(g_idx, minlength=groups)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    return ufunc.reduceat(w[order], starts, axis=0)


def quantize_gptq(
    weight,
    *,
    bits=4,
    group_size=128,
    sym=True,
    act_order=False,
    importance=None,
    checkpoint_format="gptq",
    bias=None,
    seed=0,
):
    """Round-to-nearest GPTQ quantisation of a ``[K, N]`` weight into checkpoint tensors.

    Args:
        weight: float array (any float dtype; NumPy, CuPy or torch) ``[K, N]`` = ``[in, out]``.
            ``K`` must be a multiple of ``32 // bits`` (32 for 3-bit) and so must ``N``.
        bits: 2, 3, 4 or 8.
        group_size: rows per group, or -1 for one group over all of ``K``. Any positive size is
            accepted; when it does not divide ``K`` the last group is partial.
        sym: symmetric grid (zero point ``2**(bits-1)``, scale from the group's max abs) or
            asymmetric (scale and zero from the group's min/max, the range widened to contain 0).
        act_order: GPTQ ``desc_act``: rows are assigned to groups in order of descending
            ``importance``, so ``g_idx[row] = rank(row) // group_size``.
        importance: float ``[K]`` (e.g. the Hessian diagonal). Used only with ``act_order``;
            ``None`` means a random importance drawn from ``seed``.
        checkpoint_format: ``"gptq"`` (v1, stores ``zero - 1``) or ``"gptq_v2"`` (stores ``zero``).
        bias: optional float ``[N]``, stored as float16.
        seed: seed of the random importance (act-order without ``importance``).

    Returns:
        dict of NumPy arrays:
          ``qweight`` int32 ``[K*bits//32, N]`` (rows packed along K, original row order),
          ``qzeros`` int32 ``[G, N*bits//32]`` (zeros packed along N, in ``checkpoint_format``),
          ``scales`` float16 ``[G, N]``, ``g_idx`` int32 ``[K]``, and ``bias`` float16 ``[N]`` if given.
          ``G = ceil(K / group_size)`` (1 for -1). Dequantised:
          ``W[k, n] = scales[g_idx[k], n] * (q[k, n] - zero[g_idx[k], n])``.
    """
    if bits not in _gptq.GPTQ_BITS:
        raise ValueError(f"bits: expected one of {_gptq.GPTQ_BITS}, got {bits!r}")
    if checkpoint_format not in _CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format: expected one of {_CHECKPOINT_FORMATS}, got {checkpoint_format!r}")
    if not isinstance(group_size, (int, np.integer)) or isinstance(group_size, bool) or not (
        group_size == -1 or group_size > 0
    ):
        raise ValueError(f"group_size: expected -1 or a positive integer, got {group_size!r}")
    w = _weight_float32(weight)
    k, n = w.shape
    unit = 32 if bits == 3 else 32 // bits
    if k % unit:
        raise ValueError(f"weight: in_features {k} must be a multiple of {unit} for {bits}-bit GPTQ packing")
    if n % unit:
        raise ValueError(f"weight: out_features {n} must be a multiple of {unit} for {bits}-bit qzeros packing")

    g_idx, groups = _gptq_group_index(k, int(group_size), act_order, importance, seed)
    maxq = 2**bits - 1
    wmax = _group_reduce(w, g_idx, groups, np.maximum)
    wmin = _group_reduce(w, g_idx, groups, np.minimum)
    if sym:
        amax = np.maximum(np.abs(wmin), np.abs(wmax))
        scales = _fp16_at_least(2.0 * amax / maxq)
        zeros = np.full((groups, n), 2 ** (bits - 1), dtype=np.int64)
    else:
        # The grid must contain 0 so that the integer zero point lies in [0, maxq].
        lo = np.minimum(wmin, 0.0)
        hi = np.maximum(wmax, 0.0)
        scales = _fp16_at_least((hi - lo) / maxq)
        zeros = np.clip(np.rint(-lo / scales.astype(np.float32)), 0, maxq).astype(np.int64)

    # Quantise against the float16 scales that are stored, so dequantisation sees the same grid.
    s_rows = scales.astype(np.float32)[g_idx]
    q = np.clip(np.rint(w / s_rows) + zeros[g_idx], 0, maxq).astype(np.uint8)

    out = {
        "qweight": np.ascontiguousarray(_gptq.pack_qweight(q, bits, xp=np), dtype=np.int32),
        "qzeros": np.ascontiguousarray(
            _gptq.pack_qzeros(zeros.astype(np.uint8), bits, checkpoint_format=checkpoint_format, xp=np),
            dtype=np.int32,
        ),
        "scales": scales,
        "g_idx": g_idx,
    }
    if bias is not None:
        out["bias"] = _bias_float16(bias, n)
    return out


# --------------------------------------------------------------------------------------------
# EXL2
# --------------------------------------------------------------------------------------------


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
        non-increasing, ``sum(group_rows) == in_features``.
    """
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


def _exl2_quantize_group(block, bits):
    """Quantise one group of sorted rows, ``block`` float32 [rows, N], at width ``bits``.

    ``q_scale_max`` is the group's largest symmetric-grid step ``2 * max|w| / (2**bits - 1)`` rounded
    up to float16, so code 15 never clips any column. Each column then takes the code (0..15) whose
    scale ``(code + 1)**2 * q_scale_max / 256`` gives the smallest squared rounding error; a smaller
    scale than the column's own max-abs step may win when it trades a little clipping of an outlier
    for a finer grid.

    Returns (q uint8 [rows, N], codes uint8 [N], q_scale_max float16 scalar).
    """
    maxq = 2**bits - 1
    zero = 2 ** (bits - 1)
    qsm16 = _fp16_at_least(np.array([2.0 * np.abs(block).max() / maxq], dtype=np.float32))[0]
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
    return q, codes, qsm16


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
    q_scale_max = np.empty(len(group_bits), dtype=np.float16)
    start = 0
    for g, (b, rows) in enumerate(zip(group_bits, group_rows)):
        q[start : start + rows, :n], group_codes, qsm16 = _exl2_quantize_group(w_sorted[start : start + rows], b)
        q[start : start + rows, n:] = 2 ** (b - 1)
        codes[g, :n] = group_codes
        q_scale_max[g] = qsm16
        start += rows

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


# --------------------------------------------------------------------------------------------
# AWQ
# --------------------------------------------------------------------------------------------


def quantize_awq(weight, *, group_size=128, bias=None):
    """Round-to-nearest asymmetric 4-bit quantisation of a ``[K, N]`` weight into AWQ (GEMM) tensors.

    No activation-aware scaling is searched: each group of ``group_size`` consecutive input rows gets a
    scale and an integer zero point per column from its min/max (the range widened to contain 0), and
    every weight is rounded to the nearest level of that grid.

    Args:
        weight: float array (NumPy, CuPy or torch) ``[K, N]`` = ``[in, out]``; ``N`` a multiple of 8.
        group_size: rows per group, dividing ``K``; -1 for one group over all of ``K``.
        bias: optional float ``[N]``, stored as float16.

    Returns:
        dict of NumPy arrays laid out as AutoAWQ's GEMM format stores them (:mod:`cupyq.formats.awq`):
          ``qweight`` int32 ``[K, N/8]``, ``qzeros`` int32 ``[G, N/8]`` (zero points as they are),
          ``scales`` float16 ``[G, N]`` with ``G = K / group_size``, and ``bias`` float16 ``[N]`` if given.
          Dequantised: ``W[k, n] = scales[k // group_size, n] * (q[k, n] - zero[k // group_size, n])``.
    """
    w = _weight_float32(weight)
    k, n = w.shape
    if n % 8:
        raise ValueError(f"weight: out_features {n} must be a multiple of 8 for AWQ packing (8 outputs per word)")
    try:
        gs = _awq.resolve_group_size(group_size, k)
    except ValueError as exc:
        raise ValueError(str(exc).replace("in_features", f"in_features (weight has {k} rows)", 1)) from None
    groups = k // gs
    maxq = 15
    blocks = w.reshape(groups, gs, n)
    lo = np.minimum(blocks.min(axis=1), 0.0)
    hi = np.maximum(blocks.max(axis=1), 0.0)
    scales = _fp16_at_least((hi - lo) / maxq)
    zeros = np.clip(np.rint(-lo / scales.astype(np.float32)), 0, maxq).astype(np.int64)
    # Quantise against the float16 scales that are stored, so dequantisation sees the same grid.
    q = np.clip(np.rint(blocks / scales.astype(np.float32)[:, None, :]) + zeros[:, None, :], 0, maxq)
    out = {
        "qweight": np.ascontiguousarray(_awq.pack_qweight(q.reshape(k, n).astype(np.uint8), xp=np)),
        "qzeros": np.ascontiguousarray(_awq.pack_qzeros(zeros.astype(np.uint8), xp=np)),
        "scales": scales,
    }
    if bias is not None:
        out["bias"] = _bias_float16(bias, n)
    return out


# --------------------------------------------------------------------------------------------
# error measure
# --------------------------------------------------------------------------------------------


def relative_error(w, w_dq):
    """Relative Frobenius error ``||w - w_dq|| / ||w||`` (float64 arithmetic) as a Python float.

    Args:
        w: reference array, any real dtype and shape (NumPy, CuPy or torch).
        w_dq: approximation of the same shape.

    Returns 0.0 when both are zero and ``inf`` when only ``w`` is zero.
    """
    a = _as_numpy(w, "w").astype(np.float64)
    b = _as_numpy(w_dq, "w_dq").astype(np.float64)
    if a.shape != b.shape:
        raise ValueError(f"w_dq: expected shape {a.shape} (the shape of w), got {b.shape}")
    diff = float(np.linalg.norm((a - b).ravel()))
    ref = float(np.linalg.norm(a.ravel()))
    if ref == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / ref
