"""Round-to-nearest GPTQ quantizer (see :mod:`cupyq.quantize`)."""

from __future__ import annotations

import numpy as np

from cupyq.formats import gptq as _gptq
from cupyq.formats.common import require_bool
from cupyq.quantize.common import (
    _CHECKPOINT_FORMATS,
    _bias_float16,
    _check_fp16_magnitude,
    _fp16_at_least,
    _importance_order,
    _weight_float32,
)


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
        sym: a bool (TypeError otherwise): symmetric grid (zero point ``2**(bits-1)``, scale from the
            group's max abs) or asymmetric (scale and zero from the group's min/max, the range widened
            to contain 0).
        act_order: a bool, GPTQ ``desc_act``: rows are assigned to groups in order of descending
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
    require_bool("sym", sym)
    require_bool("act_order", act_order)
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
        scales = _fp16_at_least(2.0 * amax / maxq, w.shape)
        zeros = np.full((groups, n), 2 ** (bits - 1), dtype=np.int64)
    else:
        # The grid must contain 0 so that the integer zero point lies in [0, maxq].
        lo = np.minimum(wmin, 0.0)
        hi = np.maximum(wmax, 0.0)
        scales = _fp16_at_least((hi - lo) / maxq, w.shape)
        zeros = np.clip(np.rint(-lo / scales.astype(np.float32)), 0, maxq).astype(np.int64)

    # Quantise against the float16 scales that are stored, so dequantisation sees the same grid.
    s_rows = scales.astype(np.float32)[g_idx]
    q = np.clip(np.rint(w / s_rows) + zeros[g_idx], 0, maxq).astype(np.uint8)
    _check_fp16_magnitude(np.abs((q - zeros[g_idx]) * s_rows).max())

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
