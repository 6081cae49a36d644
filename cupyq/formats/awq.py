"""AWQ checkpoint layout (AutoAWQ "GEMM" packing): packed weights, packed zero points, validation.

Tensors of one linear layer (K = in_features, N = out_features, G = K / group_size groups), 4-bit only:

- ``qweight`` int32 [K, N/8]: packed along the *output* columns. Word ``c`` of row ``k`` holds the
  eight outputs ``8c .. 8c+7``, output ``8c + AWQ_PACK_ORDER[i]`` in nibble ``i`` (bits ``4i .. 4i+3``),
  with ``AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)``.
- ``qzeros`` int32 [G, N/8]: zero points packed the same way, stored as they are (no offset, so a
  stored 0 is the zero point 0).
- ``scales`` float [G, N]. There is no ``g_idx``: group ``g`` is the contiguous rows
  ``g*group_size .. (g+1)*group_size - 1``.

Dequantised weight: ``W[k, n] = scales[g, n] * (q[k, n] - z[g, n])`` with ``g = k // group_size``.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import numpy as np

from cupyq.formats.common import (
    require_dtype, require_finite, require_integer, require_ndim, require_shape, resolve_xp,
)

__all__ = [
    "AWQ_BITS",
    "AWQ_PACK_ORDER",
    "AWQ_UNPACK_ORDER",
    "AWQLayout",
    "pack_awq_columns",
    "unpack_awq_columns",
    "pack_qweight",
    "unpack_qweight",
    "pack_qzeros",
    "unpack_qzeros",
    "resolve_group_size",
    "check_awq",
    "AWQRows",
    "awq_rows",
]

AWQ_BITS = 4
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds output 8c + AWQ_PACK_ORDER[i]
AWQ_UNPACK_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # output 8c + j sits in nibble AWQ_UNPACK_ORDER[j]
_PER_WORD = 32 // AWQ_BITS

_FLOAT_NAMES = ("float16", "float32", "bfloat16", "float64")


class AWQLayout(NamedTuple):
    """Shape facts of a validated AWQ layer."""

    in_features: int
    out_features: int
    groups: int
    group_size: int
    bits: int


def _packed_check(name, words):
    require_dtype(name, words, ("int32", "uint32"))
    require_ndim(name, words, 2)


def unpack_awq_columns(words, xp=None):
    """Unpack AWQ column-packed 4-bit fields.

    words: int32/uint32 [R, C] (``qweight`` or ``qzeros``). Returns uint8 [R, 8*C], values in [0, 16),
    in natural output order (the pack order undone).
    """
    xp = resolve_xp(words, xp)
    _packed_check("words", words)
    u = words.view(xp.uint32) if words.dtype == xp.int32 else words
    r, c = u.shape
    out = xp.empty((r, c, _PER_WORD), dtype=xp.uint8)
    for nibble, column in enumerate(AWQ_PACK_ORDER):
        # function forms: see cupyq.formats.common
        out[:, :, column] = xp.bitwise_and(xp.right_shift(u, xp.uint32(4 * nibble)), xp.uint32(0xF))
    return out.reshape(r, c * _PER_WORD)


def pack_awq_columns(values, xp=None):
    """Pack 4-bit values into AWQ column-packed words.

    values: integer [R, N] with N a multiple of 8 and values in [0, 16). Returns int32 [R, N/8].
    """
    xp = resolve_xp(values, xp)
    require_integer("values", values)
    require_ndim("values", values, 2)
    r, n = (int(s) for s in values.shape)
    if n % _PER_WORD:
        raise ValueError(f"values: AWQ packs 8 columns per word, so the column count must be a multiple of 8, got {n}")
    if values.size:
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi > 15:
            raise ValueError(f"values: 4-bit fields must lie in [0, 16), got range [{lo}, {hi}]")
    v = values.astype(xp.uint32).reshape(r, n // _PER_WORD, _PER_WORD)
    words = xp.zeros((r, n // _PER_WORD), dtype=xp.uint32)
    for nibble, column in enumerate(AWQ_PACK_ORDER):
        words |= v[:, :, column] << xp.uint32(4 * nibble)
    return words.view(xp.int32)


def unpack_qweight(qweight, xp=None):
    """Unpack AWQ ``qweight`` int32 [K, N/8] into uint8 [K, N] (natural column order)."""
    xp = resolve_xp(qweight, xp)
    _packed_check("qweight", qweight)
    return unpack_awq_columns(qweight, xp=xp)


def pack_qweight(q, xp=None):
    """Pack uint8/integer weights [K, N] (N a multiple of 8, values < 16) into AWQ ``qweight`` int32 [K, N/8]."""
    try:
        return pack_awq_columns(q, xp=xp)
    except (TypeError, ValueError) as err:
        raise type(err)(str(err).replace("values:", "q:", 1)) from None


def unpack_qzeros(qzeros, xp=None):
    """Unpack AWQ ``qzeros`` int32 [G, N/8] into the zero points, uint8 [G, N] (stored as is, no offset)."""
    xp = resolve_xp(qzeros, xp)
    _packed_check("qzeros", qzeros)
    return unpack_awq_columns(qzeros, xp=xp)


def pack_qzeros(zeros, xp=None):
    """Pack zero points integer [G, N] (values < 16) into AWQ ``qzeros`` int32 [G, N/8] (no offset)."""
    try:
        return pack_awq_columns(zeros, xp=xp)
    except (TypeError, ValueError) as err:
        raise type(err)(str(err).replace("values:", "zeros:", 1)) from None


def resolve_group_size(group_size, in_features) -> int:
    """Rows per group as a positive int: ``group_size``, or ``in_features`` for -1 (one group).

    Raises ValueError unless ``group_size`` is -1 or a positive integer dividing ``in_features``.
    """
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) or not (
        group_size == -1 or group_size > 0
    ):
        raise ValueError(f"group_size: expected -1 or a positive integer, got {group_size!r}")
    gs = int(in_features) if group_size == -1 else int(group_size)
    if in_features % gs:
        raise ValueError(f"group_size: AWQ groups must divide in_features evenly, got {in_features} rows and group_size {gs}")
    return gs


def check_awq(qweight, qzeros, scales, group_size) -> AWQLayout:
    """Validate the tensors of one AWQ (GEMM-packed) layer and return its :class:`AWQLayout`.

    qweight: int32 [K, N/8]; qzeros: int32 [K/group_size, N/8]; scales: float16/float32/bfloat16
    [K/group_size, N]; group_size: positive and dividing K, or -1 for one group. Works on NumPy, CuPy
    and torch arrays. Raises TypeError (dtype) or ValueError (shape, group size, NaN/Inf scales) naming the
    tensor.
    """
    require_dtype("qweight", qweight, "int32")
    require_ndim("qweight", qweight, 2)
    require_dtype("qzeros", qzeros, "int32")
    require_ndim("qzeros", qzeros, 2)
    require_dtype("scales", scales, _FLOAT_NAMES)
    require_ndim("scales", scales, 2)
    in_features, words = int(qweight.shape[0]), int(qweight.shape[1])
    if in_features == 0 or words == 0:
        raise ValueError(f"qweight: expected a non-empty matrix, got shape {tuple(qweight.shape)}")
    out_features = words * _PER_WORD
    gs = resolve_group_size(group_size, in_features)
    groups = in_features // gs
    require_shape("qzeros", qzeros, (groups, words))
    require_shape("scales", scales, (groups, out_features))
    require_finite("scales", scales)
    return AWQLayout(in_features, out_features, groups, gs, AWQ_BITS)


class AWQRows(NamedTuple):
    """An AWQ layer as the device layout builder (:func:`cupyq.layout.build_layout`) takes it."""

    q: object  # uint8 [K, N], rows in their original (already sorted) order
    row_group: object  # int64 [K] host array: k // group_size
    storage8: object  # bool [K] host array, all False: 4-bit fields
    scales: object  # float [G, N], as given
    zeros: object  # uint8 [G, N], true zero points


def awq_rows(qweight, qzeros, scales, group_size, xp=None) -> AWQRows:
    """Unpack an AWQ layer into integer weights, groups and zero points, the form every format is brought
    to before the device layout is built (no GPTQ repacking: zero points keep their stored values).

    qweight: int32 [K, N/8]; qzeros: int32 [G, N/8]; scales: float [G, N] (xp arrays); group_size as in
    :func:`check_awq`. Groups are consecutive rows, so the rows need no permutation.
    """
    xp = resolve_xp(qweight, xp)
    layout = check_awq(qweight, qzeros, scales, group_size)
    return AWQRows(
        q=unpack_qweight(qweight, xp=xp),
        row_group=np.arange(layout.in_features, dtype=np.int64) // layout.group_size,
        storage8=np.zeros(layout.in_features, dtype=bool),
        scales=scales,
        zeros=unpack_qzeros(qzeros, xp=xp),
    )
