"""GPTQ checkpoint layouts: packed weights, packed zero points, g_idx, validation.

Tensors of one linear layer (K = in_features, N = out_features, G = groups, b = bits):

- ``qweight`` int32 [K*b/32, N]: packed down the input rows. For b in {2, 4, 8} each word holds ``32 // b``
  consecutive rows, row ``k`` at shift ``b * (k % (32 // b))``; for b = 3, 32 rows fill 3 words as one
  little-endian bit stream (rows 10 and 21 straddle words). Both are the bit stream of
  :mod:`cupyq.formats.bitstream`.
- ``qzeros`` int32 [G, ceil(N*b/32)]: zero points packed the same way along the output columns.
  v1 (``checkpoint_format="gptq"``) stores ``(z - 1) & (2**b - 1)`` per field, so a true zero of 0 is stored
  as all ones; v2 (``"gptq_v2"``) stores ``z``.
- ``scales`` float [G, N]; ``g_idx`` int [K]: group of each input row.

Dequantised weight: ``W[k, n] = scales[g, n] * (q[k, n] - z[g, n])`` with ``g = g_idx[k]``.
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
    require_bits,
    require_dtype,
    require_integer,
    require_ndim,
    require_shape,
    resolve_xp,
    unit_rows,
)

__all__ = [
    "GPTQ_BITS",
    "CHECKPOINT_FORMATS",
    "GPTQLayout",
    "unpack_qweight",
    "pack_qweight",
    "unpack_qzeros",
    "pack_qzeros",
    "default_g_idx",
    "check_gptq",
]

GPTQ_BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")

_FLOAT_NAMES = ("float16", "float32", "bfloat16", "float64")


class GPTQLayout(NamedTuple):
    """Shape facts of a validated GPTQ layer."""

    in_features: int
    out_features: int
    groups: int
    bits: int


def _check_format(checkpoint_format) -> str:
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format: expected one of {CHECKPOINT_FORMATS}, got {checkpoint_format!r}")
    return checkpoint_format


def _packed_width(columns: int, bits: int) -> int:
    return -(-columns * bits // 32)


def unpack_qweight(qweight, bits, xp=None):
    """Unpack GPTQ ``qweight``.

    qweight: int32 [K*bits/32, N] (rows packed as described in the module docstring; for 3-bit the row
        count must be a multiple of 3). bits: one of ``GPTQ_BITS``.
    Returns uint8 [K, N] with ``K = qweight.shape[0] * 32 // bits``, values in ``[0, 2**bits)``.
    """
    xp = resolve_xp(qweight, xp)
    bits = require_bits("bits", bits, GPTQ_BITS)
    require_dtype("qweight", qweight, ("int32", "uint32"))
    require_ndim("qweight", qweight, 2)
    words_per_unit = unit_rows(bits) * bits // 32
    if qweight.shape[0] % words_per_unit:
        raise ValueError(f"qweight: {bits}-bit rows come in units of {words_per_unit} words, got {qweight.shape[0]} rows")
    return unpack_bitstream(qweight, bits, qweight.shape[0] * 32 // bits, xp=xp)


def pack_qweight(q, bits, xp=None):
    """Pack integer weights into GPTQ ``qweight``.

    q: integer [K, N], values in ``[0, 2**bits)``; K a multiple of ``32 // bits`` (of 32 for 3-bit).
    bits: one of ``GPTQ_BITS``. Returns int32 [K*bits//32, N].
    """
    bits = require_bits("bits", bits, GPTQ_BITS)
    require_integer("q", q)
    require_ndim("q", q, 2)
    unit = unit_rows(bits)
    if q.shape[0] % unit:
        raise ValueError(f"q: {bits}-bit GPTQ packing needs a multiple of {unit} rows, got {q.shape[0]}")
    try:
        return pack_bitstream(q, bits, xp=xp)
    except ValueError as err:
        raise ValueError(str(err).replace("values:", "q:", 1)) from None


def unpack_qzeros(qzeros, bits, out_features, *, checkpoint_format="gptq", xp=None):
    """Decode GPTQ ``qzeros`` into true zero points.

    qzeros: int32 [G, ceil(out_features*bits/32)], fields packed along the columns (4-bit: column ``n`` at
        word ``n // 8``, shift ``4 * (n % 8)``; 3-bit: a bit stream along the columns).
    checkpoint_format: ``"gptq"`` (v1: true zero = ``(stored + 1) & (2**bits - 1)``, applied per field, so a
        stored all-ones field means 0) or ``"gptq_v2"`` (stored as is).
    Returns uint8 [G, out_features].
    """
    xp = resolve_xp(qzeros, xp)
    bits = require_bits("bits", bits, GPTQ_BITS)
    checkpoint_format = _check_format(checkpoint_format)
    require_dtype("qzeros", qzeros, ("int32", "uint32"))
    require_ndim("qzeros", qzeros, 2)
    out_features = int(out_features)
    require_shape("qzeros", qzeros, (None, _packed_width(out_features, bits)))
    zeros = unpack_bitstream_columns(qzeros, bits, out_features, xp=xp)
    if checkpoint_format == "gptq":
        zeros = zeros + xp.uint8(1)  # uint8 wrap-around is harmless: the mask below is at most 0xFF
        zeros &= (1 << bits) - 1
    return zeros


def pack_qzeros(zeros, bits, *, checkpoint_format="gptq", xp=None):
    """Pack true zero points into GPTQ ``qzeros``.

    zeros: integer [G, N], values in ``[0, 2**bits)``. checkpoint_format: ``"gptq"`` stores
    ``(z - 1) & (2**bits - 1)`` per field (true zero 0 -> all ones), ``"gptq_v2"`` stores ``z``.
    Returns int32 [G, ceil(N*bits/32)] packed along the columns.
    """
    xp = resolve_xp(zeros, xp)
    bits = require_bits("bits", bits, GPTQ_BITS)
    checkpoint_format = _check_format(checkpoint_format)
    require_integer("zeros", zeros)
    require_ndim("zeros", zeros, 2)
    if zeros.size:
        lo, hi = int(zeros.min()), int(zeros.max())
        if lo < 0 or hi >= 1 << bits:
            raise ValueError(f"zeros: values must lie in [0, {1 << bits}) for {bits}-bit zeros, got range [{lo}, {hi}]")
    stored = zeros.astype(xp.int32)
    if checkpoint_format == "gptq":
        stored -= 1
        stored &= (1 << bits) - 1
    return pack_bitstream_columns(stored, bits, xp=xp)


def default_g_idx(in_features, group_size, xp=None):
    """The g_idx of a checkpoint without act-order.

    Returns int32 [in_features]: ``k // group_size``, or all zeros for ``group_size == -1`` (one group).
    """
    xp = np if xp is None else xp
    in_features, group_size = int(in_features), int(group_size)
    if in_features < 0:
        raise ValueError(f"in_features: expected a non-negative size, got {in_features}")
    if group_size == -1:
        return xp.zeros(in_features, dtype=xp.int32)
    if group_size <= 0:
        raise ValueError(f"group_size: expected a positive size or -1, got {group_size}")
    return xp.arange(in_features, dtype=xp.int32) // xp.int32(group_size)


def check_gptq(qweight, qzeros, scales, g_idx, bits) -> GPTQLayout:
    """Validate the tensors of one GPTQ layer and return its :class:`GPTQLayout`.

    qweight: int32 [K*bits/32, N] (3-bit: row count a multiple of 3); qzeros: int32 [G, ceil(N*bits/32)];
    scales: float16/float32/bfloat16 [G, N]; g_idx: int32/int64 [K] with values in ``[0, G)``, or None;
    bits: one of ``GPTQ_BITS``. Works on NumPy, CuPy and torch arrays.
    Raises TypeError (dtype) or ValueError (shape, range, bits) naming the tensor.
    """
    bits = require_bits("bits", bits, GPTQ_BITS)
    require_dtype("qweight", qweight, "int32")
    require_ndim("qweight", qweight, 2)
    require_dtype("qzeros", qzeros, "int32")
    require_ndim("qzeros", qzeros, 2)
    require_dtype("scales", scales, _FLOAT_NAMES)
    require_ndim("scales", scales, 2)
    words_per_unit = unit_rows(bits) * bits // 32
    qrows, out_features = int(qweight.shape[0]), int(qweight.shape[1])
    if qrows == 0 or out_features == 0:
        raise ValueError(f"qweight: expected a non-empty matrix, got shape {tuple(qweight.shape)}")
    if qrows % words_per_unit:
        raise ValueError(f"qweight: {bits}-bit rows come in units of {words_per_unit} words, got {qrows} rows")
    in_features = qrows * 32 // bits
    groups = int(qzeros.shape[0])
    if groups == 0:
        raise ValueError("qzeros: expected at least one group, got shape " + str(tuple(qzeros.shape)))
    require_shape("qzeros", qzeros, (groups, _packed_width(out_features, bits)))
    require_shape("scales", scales, (groups, out_features))
    if g_idx is not None:
        require_dtype("g_idx", g_idx, ("int32", "int64"))
        require_shape("g_idx", g_idx, (in_features,))
        lo, hi = int(g_idx.min()), int(g_idx.max())
        if lo < 0 or hi >= groups:
            raise ValueError(f"g_idx: values must lie in [0, {groups}) (the number of groups), got range [{lo}, {hi}]")
    return GPTQLayout(in_features, out_features, groups, bits)
