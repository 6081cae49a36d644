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
from cupyq.formats.gptq import CHECKPOINT_FORMATS, V1_WORD_ONES, check_gptq

__all__ = ["to_numpy", "dequantize_gptq", "dequantize_exl2", "dequantize_awq", "matmul", "matmul_gptq",
           "matmul_exl2", "matmul_awq"]

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


def _gptq_parts(qweight, qzeros, scales, g_idx, bits, checkpoint_format, v1_encoding, group_size):
    """Validated NumPy inputs of a GPTQ layer: (K, float32 zeros [G, N], float32 scales [G, N], int64 g [K])."""
    from cupyq.formats.gptq import V1_ENCODINGS, check_group_size

    qweight, qzeros, scales, g_idx = (to_numpy(a) for a in (qweight, qzeros, scales, g_idx))
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format: expected one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}")
    if v1_encoding not in V1_ENCODINGS:
        raise ValueError(f"v1_encoding: expected one of {V1_ENCODINGS}, got {v1_encoding!r}")
    k_rows, n_cols, groups, bits = check_gptq(qweight, qzeros, scales, g_idx, bits)
    if g_idx is None or group_size is not None:
        group_size = check_group_size(k_rows, groups, group_size)
    words = np.ascontiguousarray(qzeros).view(np.uint32)
    word_wise = checkpoint_format == "gptq" and v1_encoding == "word" and bits in V1_WORD_ONES
    if word_wise:
        words = words + np.uint32(V1_WORD_ONES[bits])  # carries cross fields, as the writer's borrows did
    z = _fields(words.T, bits, bits * np.arange(n_cols, dtype=np.int64)).T.astype(np.int32)
    if checkpoint_format == "gptq" and not word_wise:
        z = (z + 1) & ((1 << bits) - 1)
    if g_idx is None:
        g = np.zeros(k_rows, dtype=np.int64) if group_size == -1 else np.arange(k_rows) // group_size
    else:
        g = g_idx.astype(np.int64)
    return qweight, k_rows, z.astype(np.float32), scales.astype(np.float32), g


def _gptq_rows(qweight, bits, z, s, g, lo, hi):
    """float32 rows ``[lo, hi)`` of a GPTQ weight from the parts of :func:`_gptq_parts`."""
    q = _fields(qweight, bits, bits * np.arange(lo, hi, dtype=np.int64))
    gg = g[lo:hi]
    return (q.astype(np.float32) - z[gg]) * s[gg]


def dequantize_gptq(
    qweight, qzeros, scales, g_idx=None, *, bits=4, checkpoint_format="gptq", v1_encoding="field", group_size=None
):
    """Dequantise a GPTQ layer: ``W[k, n] = scales[g, n] * (q[k, n] - z[g, n])`` with ``g = g_idx[k]``.

    qweight: int32 [K*bits/32, N], row ``k`` at bit ``bits*k`` of its column's bit stream (2/4/8-bit: word
        ``k // (32/bits)``, shift ``bits * (k % (32/bits))``); qzeros: int32 [G, ceil(N*bits/32)], zero of column
        ``n`` at bit ``bits*n`` of its row's stream; scales: float16/float32/bfloat16 [G, N];
    g_idx: int32/int64 [K] or None (then ``k // group_size``);
    bits: 2, 3, 4 or 8; checkpoint_format: ``"gptq"`` (v1, stored ``z - 1``) or ``"gptq_v2"`` (``z = stored``);
    v1_encoding: ``"field"`` (``z = (field + 1) & (2**bits - 1)``) or ``"word"`` (add ``0x11111111``
        (4-bit), ``0x55555555`` (2-bit) or ``0x01010101`` (8-bit) to each uint32 word, then read the fields;
        3-bit is per field); group_size: rows per group (-1: one group), checked against G; needed without g_idx
        unless the shapes fix it (:func:`cupyq.formats.gptq.check_group_size`).
    Returns float32 [K, N] in original row order.
    """
    qweight, k_rows, z, s, g = _gptq_parts(qweight, qzeros, scales, g_idx, bits, checkpoint_format, v1_encoding, group_size)
    return _gptq_rows(qweight, bits, z, s, g, 0, k_rows)


def _exl2_parts(q_weight, q_invperm, q_scale, q_scale_max, q_groups):
    """Validated NumPy inputs of an EXL2 layer: (q_weight, per-sorted-row (group, bits, bit offset),
    float32 scales [G, N], int64 q_invperm [K] read as unsigned for 16-bit input)."""
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
    n = np.arange(n_cols)
    codes = (q_scale.view(np.uint32)[:, n // 8] >> (4 * (n % 8)).astype(np.uint32)) & 15
    scale = (codes.astype(np.float32) + 1) ** 2 * q_scale_max.astype(np.float32)[:, None] / 256
    inv = q_invperm.astype(np.int64)
    if dtype_name(q_invperm) in ("int16", "uint16"):
        inv &= 0xFFFF
    return q_weight, (gid, bits, offsets), scale, inv


def _exl2_sorted_rows(q_weight, rows, scale, lo, hi):
    """float32 sorted rows ``[lo, hi)`` of an EXL2 weight from the parts of :func:`_exl2_parts`."""
    gid, bits, offsets = (a[lo:hi] for a in rows)
    q = _fields(q_weight, bits, offsets)
    zero = (1 << (bits - 1)).astype(np.float32)
    return (q.astype(np.float32) - zero[:, None]) * scale[gid]


def dequantize_exl2(q_weight, q_invperm, q_scale, q_scale_max, q_groups):
    """Dequantise an EXL2 layer into original row order.

    q_weight: int32 [Q, N]; group ``g`` (width ``b``, first packed row ``r0`` from ``q_groups``) stores its
        ``t``-th sorted row at bit ``32*r0 + b*t`` of each column's bit stream;
    q_invperm: int16/uint16/int32/int64 [K] (16-bit read as unsigned), ``q_invperm[i]`` = sorted row of original row i;
    q_scale: int32 [G, N/8], code of column ``n`` = bits ``4*(n%8)`` of word ``n//8``;
    q_scale_max: float16/float32 [G] as stored; q_groups: int16/int32 [2G] pairs (width, first packed row).
    ``W_sorted[j, n] = (q[j, n] - 2**(b-1)) * (code[g, n] + 1)**2 * q_scale_max[g] / 256`` and
    ``W[i] = W_sorted[q_invperm[i]]``. Returns float32 [K, N] (N = stored width).
    """
    q_weight, rows, scale, inv = _exl2_parts(q_weight, q_invperm, q_scale, q_scale_max, q_groups)
    return _exl2_sorted_rows(q_weight, rows, scale, 0, inv.shape[0])[inv]


# Rows of float32 weight a chunked product dequantises at a time: about this many bytes.
_BLOCK_BYTES = 16 << 20


def _block_rows(n_cols, block_rows):
    if block_rows is None:
        block_rows = max(32, _BLOCK_BYTES // (4 * max(int(n_cols), 1)) // 32 * 32)
    if isinstance(block_rows, bool) or not isinstance(block_rows, (int, np.integer)) or block_rows <= 0:
        raise ValueError(f"block_rows: expected a positive integer or None, got {block_rows!r}")
    return int(block_rows)


def _chunked_product(x, k_rows, n_cols, rows_of, bias, block_rows):
    """float32 ``x @ W + bias`` with W dequantised ``block_rows`` rows at a time by ``rows_of(lo, hi)``
    (float32 [hi-lo, N]) and accumulated in float32; x: float [..., K]."""
    x = to_numpy(x)
    require_dtype("x", x, _FLOAT_NAMES)
    if x.ndim < 1 or x.shape[-1] != k_rows:
        raise ValueError(f"x: expected last dimension {k_rows}, got shape {x.shape}")
    block_rows = _block_rows(n_cols, block_rows)
    x2 = x.reshape(-1, k_rows).astype(np.float32, copy=False)
    out = np.zeros((x2.shape[0], n_cols), dtype=np.float32)
    for lo in range(0, k_rows, block_rows):
        hi = min(k_rows, lo + block_rows)
        out += x2[:, lo:hi] @ rows_of(lo, hi)
    if bias is not None:
        bias = to_numpy(bias)
        require_dtype("bias", bias, _FLOAT_NAMES)
        if bias.shape != (n_cols,):
            raise ValueError(f"bias: expected shape ({n_cols},), got {bias.shape}")
        out += bias.astype(np.float32)
    return out.reshape(*x.shape[:-1], n_cols)


def matmul_gptq(
    x, qweight, qzeros, scales, g_idx=None, bias=None, *, bits=4, checkpoint_format="gptq", v1_encoding="field",
    group_size=None, block_rows=None,
):
    """``x @ W + bias`` for a GPTQ layer without materialising W: float32 result [..., N].

    x: float [..., K]; the layer tensors and keywords as in :func:`dequantize_gptq`; bias: float [N] or None.
    W is dequantised ``block_rows`` rows at a time (None: about 16 MiB of float32 per block) and the partial
    products are summed in float32, so the result equals ``matmul(x, dequantize_gptq(...))`` up to float32
    rounding of the sums, with memory bounded by one block.
    """
    qweight, k_rows, z, s, g = _gptq_parts(qweight, qzeros, scales, g_idx, bits, checkpoint_format, v1_encoding, group_size)
    return _chunked_product(x, k_rows, s.shape[1], lambda lo, hi: _gptq_rows(qweight, int(bits), z, s, g, lo, hi), bias,
                            block_rows)


def matmul_exl2(x, q_weight, q_invperm, q_scale, q_scale_max, q_groups, bias=None, *, block_rows=None):
    """``x @ W + bias`` for an EXL2 layer without materialising W: float32 result [..., N].

    x: float [..., K]; the layer tensors as in :func:`dequantize_exl2`; bias: float [N] or None. Works in
    sorted row order (``x[..., perm] @ W_sorted``), ``block_rows`` sorted rows at a time, summed in float32.
    """
    q_weight, rows, scale, inv = _exl2_parts(q_weight, q_invperm, q_scale, q_scale_max, q_groups)
    x = to_numpy(x)
    k_rows = inv.shape[0]
    if x.ndim < 1 or x.shape[-1] != k_rows:
        raise ValueError(f"x: expected last dimension {k_rows}, got shape {x.shape}")
    perm = np.empty_like(inv)
    perm[inv] = np.arange(k_rows)
    x_sorted = x[..., perm]
    return _chunked_product(x_sorted, k_rows, scale.shape[1], lambda lo, hi: _exl2_sorted_rows(q_weight, rows, scale, lo, hi),
                            bias, block_rows)


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
    return _awq_rows(qweight, qzeros, scales, gs, 0, k_rows)


def _awq_rows(qweight, qzeros, scales, gs, lo, hi):
    """float32 rows [lo, hi) of an AWQ layer (checked arrays)."""
    n = np.arange(scales.shape[1])
    nibble_of = np.argsort(np.asarray(AWQ_PACK_ORDER))  # nibble holding each position within a word
    shift = (4 * nibble_of[n % 8]).astype(np.uint32)
    q = (qweight[lo:hi].view(np.uint32)[:, n // 8] >> shift) & 0xF
    z = (qzeros.view(np.uint32)[:, n // 8] >> shift) & 0xF
    g = np.arange(lo, hi) // gs
    return (q.astype(np.float32) - z.astype(np.float32)[g]) * scales.astype(np.float32)[g]


def matmul_awq(x, qweight, qzeros, scales, bias=None, *, group_size, block_rows=None):
    """``x @ W + bias`` for an AWQ layer without materialising W: float32 result [..., N], W dequantised
    ``block_rows`` rows at a time as in :func:`matmul_gptq`."""
    qweight, qzeros, scales = (to_numpy(a) for a in (qweight, qzeros, scales))
    k_rows, n_cols, groups, gs, _ = check_awq(qweight, qzeros, scales, group_size)
    return _chunked_product(x, k_rows, n_cols, lambda lo, hi: _awq_rows(qweight, qzeros, scales, gs, lo, hi), bias,
                            block_rows)


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
