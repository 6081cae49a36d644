"""GPTQ checkpoint layouts: packed weights, packed zero points, g_idx, validation.

Tensors of one linear layer (K = in_features, N = out_features, G = groups, b = bits):

- ``qweight`` int32 [K*b/32, N]: packed down the input rows. For b in {2, 4, 8} each word holds ``32 // b``
  consecutive rows, row ``k`` at shift ``b * (k % (32 // b))``; for b = 3, 32 rows fill 3 words as one
  little-endian bit stream (rows 10 and 21 straddle words). Both are the bit stream of
  :mod:`cupyq.formats.bitstream`.
- ``qzeros`` int32 [G, ceil(N*b/32)]: zero points packed the same way along the output columns.
  v1 (``checkpoint_format="gptq"``) stores ``z - 1``, so a true zero of 0 is stored as all ones; v2
  (``"gptq_v2"``) stores ``z``. Producers of v1 disagree on how the ``-1`` is applied (``v1_encoding``):
  ``"field"`` subtracts in each field on its own, ``"word"`` subtracts the per-field constant from the whole
  packed word (4-bit ``0x11111111``, 2-bit ``0x55555555``, 8-bit ``0x01010101``), so a zero of 0 also borrows
  1 from the next field of the word. The two agree unless some zero is 0; 3-bit zeros are always per field.
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
    require_finite,
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
    "check_group_size",
    "V1_ENCODINGS",
    "V1_WORD_ONES",
    "ambiguous_v1_zeros",
]

GPTQ_BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
V1_ENCODINGS = ("field", "word")
# The constant a word-wise v1 writer subtracts from each packed zero-point word (one 1 per field).
V1_WORD_ONES = {2: 0x55555555, 4: 0x11111111, 8: 0x01010101}

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


def _check_encoding(v1_encoding) -> str:
    if v1_encoding not in V1_ENCODINGS:
        raise ValueError(f"v1_encoding: expected one of {V1_ENCODINGS}, got {v1_encoding!r}")
    return v1_encoding


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


def unpack_qzeros(qzeros, bits, out_features, *, checkpoint_format="gptq", v1_encoding="field", xp=None):
    """Decode GPTQ ``qzeros`` into true zero points.

    qzeros: int32 [G, ceil(out_features*bits/32)], fields packed along the columns (4-bit: column ``n`` at
        word ``n // 8``, shift ``4 * (n % 8)``; 3-bit: a bit stream along the columns).
    checkpoint_format: ``"gptq"`` (v1: stored ``z - 1``) or ``"gptq_v2"`` (stored as is).
    v1_encoding: how a v1 file applied the ``-1`` (module docstring): ``"field"`` decodes
        ``(stored + 1) & (2**bits - 1)`` per field; ``"word"`` adds the per-field constant to each whole
        uint32 word, carries included, then unpacks (3-bit: per field either way). Ignored for v2.
    Returns uint8 [G, out_features].
    """
    xp = resolve_xp(qzeros, xp)
    bits = require_bits("bits", bits, GPTQ_BITS)
    checkpoint_format = _check_format(checkpoint_format)
    v1_encoding = _check_encoding(v1_encoding)
    require_dtype("qzeros", qzeros, ("int32", "uint32"))
    require_ndim("qzeros", qzeros, 2)
    out_features = int(out_features)
    require_shape("qzeros", qzeros, (None, _packed_width(out_features, bits)))
    if checkpoint_format == "gptq" and v1_encoding == "word" and bits in V1_WORD_ONES:
        # wraps mod 2**32; function forms: see cupyq.formats.common
        words = xp.add(xp.ascontiguousarray(qzeros).view(xp.uint32), xp.uint32(V1_WORD_ONES[bits]))
        return unpack_bitstream_columns(words.view(xp.int32), bits, out_features, xp=xp)
    zeros = unpack_bitstream_columns(qzeros, bits, out_features, xp=xp)
    if checkpoint_format == "gptq":
        zeros = xp.add(zeros, xp.uint8(1))  # uint8 wrap-around is harmless: the mask below is at most 0xFF
        zeros &= (1 << bits) - 1
    return zeros


def pack_qzeros(zeros, bits, *, checkpoint_format="gptq", v1_encoding="field", xp=None):
    """Pack true zero points into GPTQ ``qzeros``.

    zeros: integer [G, N], values in ``[0, 2**bits)``. checkpoint_format: ``"gptq"`` stores ``z - 1``
    (``v1_encoding="field"``: ``(z - 1) & (2**bits - 1)`` per field, true zero 0 -> all ones; ``"word"``: the
    packed v2 words minus the per-field constant, borrows included, as word-wise writers do; 3-bit: per
    field either way), ``"gptq_v2"`` stores ``z``.
    Returns int32 [G, ceil(N*bits/32)] packed along the columns.
    """
    xp = resolve_xp(zeros, xp)
    bits = require_bits("bits", bits, GPTQ_BITS)
    checkpoint_format = _check_format(checkpoint_format)
    v1_encoding = _check_encoding(v1_encoding)
    require_integer("zeros", zeros)
    require_ndim("zeros", zeros, 2)
    if zeros.size:
        lo, hi = int(zeros.min()), int(zeros.max())
        if lo < 0 or hi >= 1 << bits:
            raise ValueError(f"zeros: values must lie in [0, {1 << bits}) for {bits}-bit zeros, got range [{lo}, {hi}]")
    stored = zeros.astype(xp.int32)
    if checkpoint_format == "gptq" and v1_encoding == "word" and bits in V1_WORD_ONES:
        words = pack_bitstream_columns(stored, bits, xp=xp).view(xp.uint32) - xp.uint32(V1_WORD_ONES[bits])
        return words.view(xp.int32)
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


def check_group_size(in_features, groups, group_size=None) -> int:
    """The rows per group of a layer of ``in_features`` rows and ``groups`` groups (-1: one group).

    group_size: the checkpoint's setting, checked against the shapes (``ceil(in_features / group_size)``
    groups, 1 for -1); None infers it only where the shapes leave no choice: -1 for one group, else the one
    size ``s`` with ``ceil(in_features / s) == groups``. Raises ValueError naming ``group_size`` when the sizes
    disagree, or when None is given and several sizes fit (e.g. 200 rows in 2 groups: any of 100..199).
    """
    in_features, groups = int(in_features), int(groups)
    if group_size is None:
        if groups == 1:
            return -1
        # ceil(K / s) == G  <=>  (G - 1) * s < K <= G * s
        lo, hi = -(-in_features // groups), (in_features - 1) // (groups - 1)
        if lo > hi:
            raise ValueError(
                f"group_size: no group size splits {in_features} input rows into {groups} groups "
                "(g_idx is absent); check qzeros/scales"
            )
        if lo < hi:
            raise ValueError(
                f"group_size: not given and g_idx is absent, and {in_features} rows in {groups} groups fit group "
                f"sizes {lo}..{hi}: pass group_size= (or g_idx)"
            )
        return lo
    if isinstance(group_size, bool) or not isinstance(group_size, (int, np.integer)) or not (
        group_size == -1 or group_size > 0
    ):
        raise ValueError(f"group_size: expected -1 or a positive integer, got {group_size!r}")
    group_size = int(group_size)
    expected = 1 if group_size == -1 else -(-in_features // group_size)
    if expected != groups:
        raise ValueError(
            f"group_size: {group_size} over {in_features} input rows needs {expected} groups, "
            f"but scales/qzeros have {groups}"
        )
    return group_size


def ambiguous_v1_zeros(qzeros, bits) -> int:
    """Number of all-ones zero-point fields in v1 ``qzeros`` (int32 [G, ceil(N*bits/32)], NumPy).

    Such a field is a true zero of 0, which per-field and word-wise v1 writers (see the module docstring)
    store differently, so a file of unknown producer with one cannot be decoded with certainty
    (3-bit zeros are per field for every writer: always 0 for them).
    """
    bits = require_bits("bits", bits, GPTQ_BITS)
    if bits not in V1_WORD_ONES:
        return 0
    words = np.ascontiguousarray(qzeros).view(np.uint32)
    mask = np.uint32((1 << bits) - 1)
    count = 0
    for shift in range(0, 32, bits):
        count += int(np.count_nonzero((words >> np.uint32(shift)) & mask == mask))
    return count


def _group_count(qzeros, scales, g_idx, in_features, group_size, widths) -> int:
    """G, the rows of ``qzeros`` and of ``scales``. Where the two differ, the one that disagrees with the count the
    layer's grouping gives (``g_idx``: its largest group + 1; else ``group_size``: ``ceil(K / group_size)``) is
    named, with the shape expected (``widths``: the columns of each); without either, both are."""
    rows = {"qzeros": int(qzeros.shape[0]), "scales": int(scales.shape[0])}
    if rows["qzeros"] == 0:
        raise ValueError("qzeros: expected at least one group, got shape " + str(tuple(qzeros.shape)))
    if rows["qzeros"] == rows["scales"]:
        return rows["qzeros"]
    expected = None
    if g_idx is not None and int(g_idx.shape[0]):
        expected, source = int(g_idx.max()) + 1, "g_idx (its largest group + 1)"
    elif isinstance(group_size, (int, np.integer)) and not isinstance(group_size, bool) and (
        group_size == -1 or group_size > 0
    ):
        expected = 1 if group_size == -1 else -(-int(in_features) // int(group_size))
        source = f"group_size {int(group_size)} over {int(in_features)} input rows"
    if expected is not None and expected in rows.values():
        wrong = "qzeros" if rows["scales"] == expected else "scales"
        got = tuple(int(v) for v in (qzeros if wrong == "qzeros" else scales).shape)
        raise ValueError(f"{wrong}: expected shape {(expected, widths[wrong])}, got {got}: {source} gives "
                         f"{expected} groups")
    raise ValueError(f"qzeros: {rows['qzeros']} rows (groups), but scales has {rows['scales']}; the two must agree")


def check_gptq(qweight, qzeros, scales, g_idx, bits, group_size=None) -> GPTQLayout:
    """Validate the tensors of one GPTQ layer and return its :class:`GPTQLayout`.

    qweight: int32 [K*bits/32, N] (3-bit: row count a multiple of 3); qzeros: int32 [G, ceil(N*bits/32)];
    scales: float16/float32/bfloat16 [G, N]; g_idx: int32/int64 [K] with values in ``[0, G)``, or None;
    bits: one of ``GPTQ_BITS``; group_size: the checkpoint's rows per group (-1: one group) or None, used only to
    say which of qzeros and scales has the wrong number of groups when they differ (:func:`check_group_size`
    checks it). Works on NumPy, CuPy and torch arrays.
    Raises TypeError (dtype) or ValueError (shape, range, bits, NaN/Inf scales) naming the tensor.
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
    if g_idx is not None:
        require_dtype("g_idx", g_idx, ("int32", "int64"))
        require_shape("g_idx", g_idx, (in_features,))
    widths = {"qzeros": _packed_width(out_features, bits), "scales": out_features}
    groups = _group_count(qzeros, scales, g_idx, in_features, group_size, widths)
    require_shape("qzeros", qzeros, (groups, widths["qzeros"]))
    require_shape("scales", scales, (groups, widths["scales"]))
    if g_idx is not None:
        lo, hi = int(g_idx.min()), int(g_idx.max())
        if lo < 0 or hi >= groups:
            raise ValueError(f"g_idx: values must lie in [0, {groups}) (the number of groups), got range [{lo}, {hi}]")
    require_finite("scales", scales)
    return GPTQLayout(in_features, out_features, groups, bits)
