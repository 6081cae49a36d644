"""The bias rule every builder and checkpoint loader applies (:func:`check_bias`)."""

from __future__ import annotations

import numpy as np

from cupyq.formats.common import require_dtype, require_finite, require_fp16_range, require_shape

BIAS_DTYPES = ("float16", "bfloat16", "float32", "float64")


def check_bias(bias, out_features: int) -> np.ndarray:
    """The validated float32 NumPy copy of a layer's bias: the one rule for every builder and checkpoint loader.

    bias: float16, bfloat16, float32 or float64 [out_features] (NumPy, CuPy or torch), or a sequence of Python
    floats; finite, every magnitude at most 65504, the float16 maximum (GPU matrices add an fp16 copy, which must
    not overflow; the rule holds on the CPU too, so that a matrix is accepted the same everywhere).
    Raises TypeError (not a floating array) or ValueError (shape, NaN/Inf, magnitude) naming ``bias``.
    """
    if not (hasattr(bias, "shape") and hasattr(bias, "dtype")):
        try:
            as_array = np.asarray(bias)
        except (TypeError, ValueError):
            as_array = None
        if as_array is None or as_array.dtype.kind != "f":
            raise TypeError(f"bias: expected a float array [{out_features}] ({', '.join(BIAS_DTYPES)}) or a "
                            f"sequence of floats, got {type(bias).__name__} {_short_repr(bias)}")
        bias = as_array
    require_dtype("bias", bias, BIAS_DTYPES)
    require_shape("bias", bias, (out_features,))
    from cupyq.reference import to_numpy  # reference imports the format modules

    b = to_numpy(bias)  # torch bfloat16 arrives as float32
    require_finite("bias", b)
    require_fp16_range("bias", b, "float16, the kernels' bias")
    return np.array(b, dtype=np.float32, copy=True)


def _short_repr(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
