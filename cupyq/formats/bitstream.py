"""Little-endian bit streams of small integers packed into int32 words.

One layout serves GPTQ weights and zeros and EXL2 weights and scale codes: along the packed axis, value
``i`` occupies bits ``[bits*i, bits*i + bits)`` of the integer ``word0 | word1 << 32 | word2 << 64 | ...``
(consecutive words along the same axis). For widths that divide 32 this is "``32 // bits`` values per word,
value ``i`` at shift ``bits * (i % (32 // bits))``"; 3-, 5- and 6-bit values straddle word boundaries.

Everything is vectorised over the array; the Python loops run over the (at most 32) value positions of one
packing unit, so the same code packs multi-GB weights with CuPy on the GPU.
"""

from __future__ import annotations

import numbers

from cupyq.formats.common import (
    require_dtype,
    require_integer,
    require_ndim,
    resolve_xp,
    unit_rows,
)

__all__ = [
    "pack_bitstream",
    "unpack_bitstream",
    "pack_bitstream_columns",
    "unpack_bitstream_columns",
]

_WORD_DTYPES = ("int32", "uint32")


def _check_bits(bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral) or not 1 <= bits <= 8:
        raise ValueError(f"bits: expected an integer in 1..8, got {bits!r}")
    return int(bits)


def _check_range(name, values, bits) -> None:
    if values.size == 0:
        return
    lo, hi = int(values.min()), int(values.max())
    if lo < 0 or hi >= 1 << bits:
        raise ValueError(f"{name}: values must lie in [0, {1 << bits}) for {bits}-bit packing, got range [{lo}, {hi}]")


def _pack_rows(values, bits, xp):
    """values [R, N] (R a multiple of unit_rows(bits), range already checked) -> int32 [R*bits//32, N]."""
    rows, cols = values.shape
    unit = unit_rows(bits)
    words_per_unit = unit * bits // 32
    units = rows // unit
    v = values.astype(xp.uint32, copy=False).reshape(units, unit, cols)
    words = xp.zeros((units, words_per_unit, cols), dtype=xp.uint32)
    for i in range(unit):
        word, shift = divmod(bits * i, 32)
        words[:, word] |= v[:, i] << shift
        if shift + bits > 32:  # the value straddles into the next word
            words[:, word + 1] |= v[:, i] >> (32 - shift)
    return words.reshape(units * words_per_unit, cols).view(xp.int32)


def _unpack_rows(words, bits, rows, xp):
    """words int32/uint32 [Q, N] -> uint8 [rows, N]; a missing tail of the last unit reads as zero bits."""
    num_words, cols = words.shape
    unit = unit_rows(bits)
    words_per_unit = unit * bits // 32
    units = -(-rows // unit)
    needed = units * words_per_unit
    w = words.view(xp.uint32)
    if num_words >= needed:
        w = w[:needed]
    else:
        w = xp.concatenate([w, xp.zeros((needed - num_words, cols), dtype=xp.uint32)])
    w = w.reshape(units, words_per_unit, cols)
    out = xp.empty((units, unit, cols), dtype=xp.uint8)
    mask = (1 << bits) - 1
    for i in range(unit):
        word, shift = divmod(bits * i, 32)
        field = xp.right_shift(w[:, word], shift)  # function form: see cupyq.formats.common
        if shift + bits > 32:
            field |= xp.left_shift(w[:, word + 1], 32 - shift)
        field &= mask
        out[:, i] = field
    return out.reshape(units * unit, cols)[:rows]


def pack_bitstream(values, bits, xp=None):
    """Pack small integers down the rows of each column into int32 words.

    values: integer array [R, N], every value in ``[0, 2**bits)``; R a multiple of ``32 // gcd(bits, 32)``
        rows (a whole number of words: 16 for 2/6-bit, 32 for 3/5-bit, 8 for 4-bit, 4 for 8-bit; any
        multiple of 32 always works).
    bits: 1..8 (the formats use 2, 3, 4, 5, 6, 8).
    Returns int32 [R*bits//32, N]: each column is a little-endian bit stream, row ``i`` at bits
    ``[bits*i, bits*i + bits)`` of ``word0 | word1 << 32 | ...`` (words = consecutive rows).
    """
    xp = resolve_xp(values, xp)
    bits = _check_bits(bits)
    require_integer("values", values)
    require_ndim("values", values, 2)
    unit = unit_rows(bits)
    if values.shape[0] % unit:
        raise ValueError(f"values: {bits}-bit packing needs a multiple of {unit} rows, got {values.shape[0]}")
    _check_range("values", values, bits)
    return _pack_rows(values, bits, xp)


def unpack_bitstream(words, bits, rows, xp=None):
    """Inverse of :func:`pack_bitstream`.

    words: int32 (or uint32) [Q, N], bit streams down the rows as written by :func:`pack_bitstream`.
    bits: 1..8. rows: number of values to read per column, ``0 <= rows <= Q*32//bits``.
    Returns uint8 [rows, N].
    """
    xp = resolve_xp(words, xp)
    bits = _check_bits(bits)
    require_dtype("words", words, _WORD_DTYPES)
    require_ndim("words", words, 2)
    capacity = words.shape[0] * 32 // bits
    if not 0 <= rows <= capacity:
        raise ValueError(f"rows: {words.shape[0]} words of {bits}-bit values hold at most {capacity} rows, got {rows}")
    return _unpack_rows(words, bits, int(rows), xp)


def pack_bitstream_columns(values, bits, xp=None):
    """Pack small integers along the columns of each row (the GPTQ ``qzeros`` / EXL2 ``q_scale`` layout).

    values: integer array [G, N] in ``[0, 2**bits)``; any N (a partial last unit is padded with zero bits).
    Returns int32 [G, ceil(N*bits/32)]: each row is a little-endian bit stream, column ``n`` at bits
    ``[bits*n, bits*n + bits)`` (for 4-bit: word ``n // 8``, shift ``4 * (n % 8)``).
    """
    xp = resolve_xp(values, xp)
    bits = _check_bits(bits)
    require_integer("values", values)
    require_ndim("values", values, 2)
    _check_range("values", values, bits)
    groups, cols = values.shape
    unit = unit_rows(bits)
    padded = -(-cols // unit) * unit
    vt = values.T
    if padded != cols:
        vt = xp.concatenate([vt, xp.zeros((padded - cols, groups), dtype=values.dtype)])
    words = _pack_rows(vt, bits, xp)[: -(-cols * bits // 32)]
    return xp.ascontiguousarray(words.T)


def unpack_bitstream_columns(words, bits, columns, xp=None):
    """Inverse of :func:`pack_bitstream_columns`.

    words: int32 (or uint32) [G, W]; columns: values to read per row, ``0 <= columns <= W*32//bits``.
    Returns uint8 [G, columns].
    """
    xp = resolve_xp(words, xp)
    bits = _check_bits(bits)
    require_dtype("words", words, _WORD_DTYPES)
    require_ndim("words", words, 2)
    capacity = words.shape[1] * 32 // bits
    if not 0 <= columns <= capacity:
        raise ValueError(f"columns: {words.shape[1]} words of {bits}-bit values hold at most {capacity} columns, got {columns}")
    return xp.ascontiguousarray(_unpack_rows(words.T, bits, int(columns), xp).T)
