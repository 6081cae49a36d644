"""Float32 NumPy reference: GPTQ / EXL2 / AWQ dequantisation and matmul.

This is the oracle the tests measure everything against and the CPU path of :func:`cupyq.gemm`. The
dequantisers are written directly from the formulas, element by element in vectorised form (every value
is read from its bit offset in the column's bit stream), independently of the packing code in
:mod:`cupyq.formats`; only the input validation is shared. Inputs may be NumPy, CuPy or torch arrays
(converted to NumPy first); results are NumPy float32.
"""

from __future__ import annotations

import numpy as np

from cupyq.formats.awq import AWQ_PACK_ORDER, check_awq
from cupyq.formats.common import dtype_name, require_dtype
from cupyq.formats.exl2 import check_exl2
from cupyq.formats.gptq import CHECKPOINT_FORMATS, check_gptq

__all__ = ["to_numpy", "dequantize_gptq", "dequantize_exl2", "dequantize_awq", "matmul"]

_FLOAT_NAMES = ("float16", "float32", "float64", "bfloat16")


def to_numpy(a):
    """NumPy view or copy of a NumPy, CuPy or torch array (torch bfloat16 becomes float32); None stays None."""
    if a is None or isinstance(a, np.ndarray):
        return a
    if hasattr(a, "detach"):  # torch
        t = a.detach()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        return t.cpu().numpy()
    if type(a).__module__.split(".", 1)[0] == "cupy":
        return a.get()
    return np.asarray(a)


def _fields(words, bits, offsets, chunk=1024):
    """Values of width ``bits`` starting at bit ``offsets[i]`` of each column's little-endian bit stream.

    words: int32/uint32 [Q, N]; offsets: int64 [R] (bit positions, ``offsets // 32`` < Q);
    bits: int or int64 [R]. Returns uint8 [R, N]. Rows are read ``chunk`` at a time to bound the 64-bit
    temporaries.
    """
    w = np.ascontiguousarray(words).view(np.uint32)
    w = np.concatenate([w, np.zeros((1, w.shape[1]), dtype=np.uint32)])  # the word after the last one reads as 0
    mask = (np.uint64(1) << np.broadcast_to(np.asarray(bits, dtype=np.uint64), offsets.shape)) - np.uint64(1)
    out = np.empty((offsets.shape[0], w.shape[1]), dtype=np.uint8)
    for lo in range(0, offsets.shape[0], chunk):
        off = offsets[lo : lo + chunk]
        word, shift = off // 32, (off % 32).astype(np.uint64)
        both = w[word].astype(np.uint64) | (w[word + 1].astype(np.uint64) << np.uint64(32))
        out[lo : lo + chunk] = (both >> shift[:, None]) & mask[lo : lo + chunk, None]
    return out


def dequantize_gptq(qweight, qzeros, scales, g_idx=None, *, bits=4, checkpoint_format="gptq"):
    """Dequantise a GPTQ layer: ``W[k, n] = scales[g, n] * (q[k, n] - z[g, n])`` with ``g = g_idx[k]``.

    qweight: int32 [K*bits/32, N], row ``k`` at bit ``bits*k`` of its column's bit stream (2/4/8-bit: word
        ``k // (32/bits)``, shift ``bits * (k % (32/bits))``); qzeros: int32 [G, ceil(N*bits/32)], zero of column
        ``n`` at bit ``bits*n`` of its row's stream; scales: float16/float32/bfloat16 [G, N];
    g_idx: int32/int64 [K] or None (then ``k // (K // G)``; K must be a multiple of G);
    bits: 2, 3, 4 or 8; checkpoint_format: ``"gptq"`` (v1, ``z = (stored + 1) & (2**bits - 1)``) or
        ``"gptq_v2"`` (``z = stored``).
    Returns float32 [K, N] in original row order.
    """
    qweight, qzeros, scales, g_idx = (to_numpy(a) for a in (qweight, qzeros, scales, g_idx))
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format: expected one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}")
    k_rows, n_cols, groups, bits = check_gptq(qweight, qzeros, scales, g_idx, bits)
    q = _fields(qweight, bits, bits * np.arange(k_rows, dtype=np.int64))
    z = _fields(qzeros.T, bits, bits * np.arange(n_cols, dtype=np.int64)).T
    z = z.astype(np.int32)
    if checkpoint_format == "gptq":
        z = (z + 1) & ((1 << bits) - 1)
    z = z.astype(np.float32)
    if g_idx is None:
        if k_rows % groups:
            raise ValueError(
                f"g_idx: required when in_features ({k_rows}) is not a multiple of the number of groups ({groups})"
            )
        g = np.arange(k_rows) // (k_rows // groups)
    else:
        g = g_idx.astype(np.int64)
    s = scales.astype(np.float32)
    return (q.astype(np.float32) - z[g]) * s[g]


def dequantize_exl2(q_weight, q_invperm, q_scale, q_scale_max, q_groups):
    """Dequantise an EXL2 layer into original row order.

    q_weight: int32 [Q, N]; group ``g`` (width ``b``, first packed row ``r0`` from ``q_groups``) stores its
        ``t``-th sorted row at bit ``32*r0 + b*t`` of each column's bit stream;
    q_invperm: int16/int32/int64 [K] (16-bit read as unsigned), ``q_invperm[i]`` = sorted row of original row i;
    q_scale: int32 [G, N/8], code of column ``n`` = bits ``4*(n%8)`` of word ``n//8``;
    q_scale_max: float16/float32 [G] as stored; q_groups: int16/int32 [2G] pairs (width, first packed row).
    ``W_sorted[j, n] = (q[j, n] - 2**(b-1)) * (code[g, n] + 1)**2 * q_scale_max[g] / 256`` and
    ``W[i] = W_sorted[q_invperm[i]]``. Returns float32 [K, N] (N = stored width).
    """
    q_weight, q_invperm, q_scale, q_scale_max, q_groups = (
        to_numpy(a) for a in (q_weight, q_invperm, q_scale, q_scale_max, q_groups)
    )
    k_rows, n_cols, groups = check_exl2(q_weight, q_invperm, q_scale, q_scale_max, q_groups)
    rows = [g.rows for g in groups]
    gid = np.repeat(np.arange(len(groups)), rows)
    bits = np.repeat([g.bits for g in groups], rows).astype(np.int64)
    row_start = np.repeat([g.row_start for g in groups], rows)
    qrow_start = np.repeat([g.qrow_start for g in groups], rows).astype(np.int64)
    offsets = 32 * qrow_start + bits * (np.arange(k_rows) - row_start)
    q = _fields(q_weight, bits, offsets)
    n = np.arange(n_cols)
    codes = (q_scale.view(np.uint32)[:, n // 8] >> (4 * (n % 8)).astype(np.uint32)) & 15
    scale = (codes.astype(np.float32) + 1) ** 2 * q_scale_max.astype(np.float32)[:, None] / 256
    zero = (1 << (bits - 1)).astype(np.float32)
    w_sorted = (q.astype(np.float32) - zero[:, None]) * scale[gid]
    inv = q_invperm.astype(np.int64)
    if dtype_name(q_invperm) == "int16":
        inv &= 0xFFFF
    return w_sorted[inv]


def dequantize_awq(qweight, qzeros, scales, *, group_size):
    """Dequantise an AWQ (GEMM-packed, 4-bit) layer: ``W[k, n] = scales[g, n] * (q[k, n] - z[g, n])``.

    Groups are contiguous rows: ``g = k // group_size``.

    qweight: int32 [K, N/8], output ``n`` of row ``k`` in word ``n // 8`` at bits ``4*i .. 4*i+3`` where
        ``AWQ_PACK_ORDER[i] == n % 8`` (the order ``0, 2, 4, 6, 1, 3, 5, 7``); qzeros: int32 [G, N/8] packed the
        same way, zero points stored as they are; scales: float16/float32/bfloat16 [G, N];
    group_size: rows per group (a divisor of K), or -1 for one group.
    Returns float32 [K, N].
    """
    qweight, qzeros, scales = (to_numpy(a) for a in (qweight, qzeros, scales))
    k_rows, n_cols, groups, gs, _ = check_awq(qweight, qzeros, scales, group_size)
    n = np.arange(n_cols)
    nibble_of = np.argsort(np.asarray(AWQ_PACK_ORDER))  # nibble holding each position within a word
    shift = (4 * nibble_of[n % 8]).astype(np.uint32)
    q = (qweight.view(np.uint32)[:, n // 8] >> shift) & 0xF
    z = (qzeros.view(np.uint32)[:, n // 8] >> shift) & 0xF
    g = np.arange(k_rows) // gs
    return (q.astype(np.float32) - z.astype(np.float32)[g]) * scales.astype(np.float32)[g]


def matmul(x, w, bias=None, *, compute_dtype=np.float32):
    """``x @ w (+ bias)`` in ``compute_dtype`` (float32, or float64 for a tighter oracle).

    x: float [..., K] (float16/float32/float64/bfloat16; NumPy, CuPy or torch); w: float [K, N];
    bias: float [N] or None. Returns float32 [..., N].
    """
    x, w, bias = to_numpy(x), to_numpy(w), to_numpy(bias)
    require_dtype("x", x, _FLOAT_NAMES)
    require_dtype("w", w, _FLOAT_NAMES)
    if w.ndim != 2:
        raise ValueError(f"w: expected a 2-D array, got shape {w.shape}")
    if x.ndim < 1 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"x: expected last dimension {w.shape[0]} (w has shape {w.shape}), got shape {x.shape}")
    compute_dtype = np.dtype(compute_dtype)
    if compute_dtype not in (np.float32, np.float64):
        raise ValueError(f"compute_dtype: expected float32 or float64, got {compute_dtype}")
    out = x.reshape(-1, w.shape[0]).astype(compute_dtype) @ w.astype(compute_dtype)
    if bias is not None:
        require_dtype("bias", bias, _FLOAT_NAMES)
        if bias.shape != (w.shape[1],):
            raise ValueError(f"bias: expected shape ({w.shape[1]},), got {bias.shape}")
        out += bias.astype(compute_dtype)
    return out.astype(np.float32).reshape(*x.shape[:-1], w.shape[1])
