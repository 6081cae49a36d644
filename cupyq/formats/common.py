"""Helpers shared by the format modules: array-module lookup and input validation.

Validation works on anything with ``.dtype`` and ``.shape`` (NumPy, CuPy, torch), comparing dtypes by
name, so the same checks serve every front end.

Array code that runs on CuPy when a matrix is loaded writes a binary operation with a scalar operand as a
function call (``xp.right_shift(a, 4)``, not ``a >> 4``): CuPy hands such an operator to NumPy's ufunc
dispatch, whose first use imports cupyx and with it SciPy (0.1 s, or 0.5 s where no bytecode is cached).
"""

from __future__ import annotations

import math
import numbers
import sys

import numpy as np

__all__ = [
    "array_module",
    "resolve_xp",
    "dtype_name",
    "require_dtype",
    "require_integer",
    "require_ndim",
    "require_shape",
    "require_bits",
    "require_finite",
    "unit_rows",
    "to_host_ints",
]


def array_module(a):
    """Return ``cupy`` for a CuPy array and ``numpy`` for anything else.

    CuPy is only imported when ``a`` already is a CuPy array (its module is then loaded), so calling this
    on NumPy data never imports CuPy.
    """
    if type(a).__module__.split(".", 1)[0] == "cupy":
        return sys.modules.get("cupy") or __import__("cupy")
    return np


def resolve_xp(a, xp=None):
    """``xp`` if given, else :func:`array_module` of ``a``."""
    return array_module(a) if xp is None else xp


def dtype_name(a) -> str:
    """Name of the dtype of ``a`` without a framework prefix: ``"int32"``, ``"float16"``, ``"bfloat16"``."""
    name = str(getattr(a, "dtype", type(a).__name__))
    return name.removeprefix("torch.")


def _describe(allowed) -> str:
    allowed = list(allowed)
    return allowed[0] if len(allowed) == 1 else ", ".join(allowed[:-1]) + " or " + allowed[-1]


def require_dtype(name: str, a, allowed) -> str:
    """Raise ``TypeError`` unless the dtype name of ``a`` is in ``allowed``; return the dtype name.

    ``allowed`` is a string or a sequence of dtype names (``"int32"``) or NumPy dtypes.
    Message example: ``"qzeros: expected dtype int32, got float16"``.
    """
    if isinstance(allowed, (str, np.dtype, type)):
        allowed = (allowed,)
    names = [np.dtype(d).name if not isinstance(d, str) else d for d in allowed]
    got = dtype_name(a)
    if got not in names:
        raise TypeError(f"{name}: expected dtype {_describe(names)}, got {got}")
    return got


_INTEGER_NAMES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")


def require_integer(name: str, a) -> str:
    """Raise ``TypeError`` unless ``a`` has an integer dtype; return the dtype name."""
    return require_dtype(name, a, _INTEGER_NAMES)


def require_ndim(name: str, a, ndim: int) -> None:
    """Raise ``ValueError`` unless ``a`` has ``ndim`` dimensions."""
    shape = tuple(a.shape)
    if len(shape) != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got shape {shape}")


def require_shape(name: str, a, expected) -> None:
    """Raise ``ValueError`` unless ``a.shape`` matches ``expected`` (``None`` entries match any size).

    Message example: ``"scales: expected shape (8, 4096), got (8, 4095)"``.
    """
    shape = tuple(int(s) for s in a.shape)
    expected = tuple(expected)
    if len(shape) != len(expected) or any(e is not None and e != s for e, s in zip(expected, shape)):
        shown = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ("," if len(expected) == 1 else "") + ")"
        raise ValueError(f"{name}: expected shape {shown}, got {shape}")


def require_bits(name: str, bits, allowed) -> int:
    """Return ``bits`` as ``int``; raise ``TypeError`` unless it is an integer (not a string, float or bool)
    and ``ValueError`` unless it is in ``allowed``."""
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
        raise TypeError(f"{name}: expected an integer, one of {tuple(allowed)}, got {type(bits).__name__} {bits!r}")
    if int(bits) not in allowed:
        raise ValueError(f"{name}: expected one of {tuple(allowed)}, got {bits!r}")
    return int(bits)


def require_finite(name: str, a) -> None:
    """Raise ``ValueError`` unless every value of the float array ``a`` (NumPy, CuPy or torch) is finite.

    Message example: ``"scales: expected finite values, got 2 NaN/Inf, the first at index (0, 5)"``.
    """
    if hasattr(a, "detach"):  # torch
        bad = ~a.detach().isfinite()
        count = int(bad.sum())
        first = tuple(int(i) for i in bad.nonzero()[0]) if count else None
    else:
        xp = array_module(a)
        bad = ~xp.isfinite(a)
        count = int(bad.sum())
        first = tuple(int(i) for i in xp.argwhere(bad)[0]) if count else None
    if count:
        raise ValueError(f"{name}: expected finite values, got {count} NaN/Inf, the first at index {first}")


def unit_rows(bits: int) -> int:
    """Rows in the smallest whole packing unit of a ``bits``-wide bit stream (a whole number of words).

    2 -> 16, 3 -> 32, 4 -> 8, 5 -> 32, 6 -> 16, 8 -> 4. Such a unit fills ``unit_rows * bits // 32`` words.
    """
    return 32 // math.gcd(int(bits), 32)


def to_host_ints(a, name="values") -> list[int]:
    """A small integer array (NumPy, CuPy, torch, or a sequence) as a Python list of ints.

    Raises ValueError naming ``name`` for a value that is not a whole number (4.5, NaN).
    """
    if hasattr(a, "detach"):  # torch
        a = a.detach().cpu()
    elif type(a).__module__.split(".", 1)[0] == "cupy":
        a = a.get()
    if hasattr(a, "tolist"):
        values = a.tolist()
    else:
        values = list(a)
    flat = np.asarray(values).reshape(-1).tolist()
    for v in flat:
        if isinstance(v, bool) or not isinstance(v, (numbers.Integral, float)) or (
            isinstance(v, float) and not v.is_integer()
        ):
            raise ValueError(f"{name}: expected integers, got {v!r}")
    return [int(v) for v in flat]


FP16_MAX = float(np.finfo(np.float16).max)  # 65504


def require_fp16_range(name: str, values: np.ndarray, why: str) -> None:
    """ValueError naming ``name`` when a magnitude of the float NumPy array ``values`` exceeds FP16_MAX (``why``: why
    float16 bounds it), giving the largest such value, its index and how many there are. NaN passes (the finiteness
    checks own it)."""
    magnitude = np.abs(values)
    over = magnitude > FP16_MAX  # NaN compares False
    count = int(np.count_nonzero(over))
    if count:
        where = np.unravel_index(int(np.argmax(np.where(over, magnitude, -1.0))), values.shape)
        index = int(where[0]) if values.ndim == 1 else tuple(int(i) for i in where)
        raise ValueError(f"{name}: expected magnitudes of at most {FP16_MAX:g} ({why}), got {float(values[where]):.6g} "
                         f"at index {index}; {count} of {values.size} values exceed it")


def is_int(value) -> bool:
    """Whether ``value`` is a Python or NumPy integer, and not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def require_bool(name: str, value) -> bool:
    """``value`` (a bool or NumPy bool) as a bool; TypeError naming ``name`` otherwise (a string such as "no" would
    read as True)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected True or False, got {type(value).__name__} {value!r}")
    return bool(value)
