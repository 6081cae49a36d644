"""Input checks and helpers shared by the quantizers, and the error measure."""

from __future__ import annotations

import math
import warnings

import numpy as np

from cupyq.formats.common import FP16_MAX as _FP16_MAX

_CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
_FP16_TINIEST = 2.0**-24  # the smallest positive float16 (subnormal), the smallest scale a checkpoint can hold


def _as_numpy(a, name):
    """NumPy view/copy of a NumPy, CuPy or torch array (float32 for torch bfloat16)."""
    module = type(a).__module__.split(".")[0]
    if module == "cupy":
        return a.get()
    if module == "torch":
        t = a.detach().cpu()
        # NumPy has no bfloat16; other dtypes keep their precision (a float64 weight is range-checked as such)
        return t.float().numpy() if str(t.dtype) == "torch.bfloat16" else t.numpy()
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
    if w.dtype.itemsize > 4:  # checked before the cast, which would turn such values into inf
        largest = float(np.max(np.abs(w), initial=0.0, where=np.isfinite(w)))
        if largest > float(np.finfo(np.float32).max):
            _check_fp16_magnitude(largest, "largest |weight|")
    w = np.array(w, dtype=np.float32, copy=True)
    if not np.all(np.isfinite(w)):
        raise ValueError("weight: contains NaN or infinity")
    return w


def _bias_float16(bias, out_features):
    """The quantizers' bias output: float16 [out_features] of a bias :func:`cupyq.formats.bias.check_bias` accepts
    (a finite float in the float16 range, so no value becomes inf)."""
    from cupyq.formats.bias import check_bias

    return check_bias(bias, out_features).astype(np.float16)


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


def _fp16_at_least(values, weight_shape):
    """float16 of the scales ``values`` (float32, >= 0) rounded up (never below the input) and never zero.

    A zero scale (an all-zero group) becomes 1.0. A positive scale below float16's smallest (2**-24) becomes
    2**-24, so the group's weights round (partly) to zero: a RuntimeWarning naming ``weight_shape`` says how
    many such groups there are. Scales above the float16 range raise ValueError.
    """
    if np.any(values > _FP16_MAX):
        raise ValueError(
            f"weight: magnitudes too large for float16 scales (largest scale {float(values.max()):.4g} "
            f"> {_FP16_MAX})"
        )
    tiny = int(np.count_nonzero((values > 0) & (values < _FP16_TINIEST)))
    if tiny:
        warnings.warn(
            f"weight {list(weight_shape)}: {tiny} of {values.size} group scales are below the float16 scale "
            "range (smallest scale 2**-24), so those groups quantize (partly) to zero; rescale the weights "
            "(e.g. by a power of two folded into the next operation) to keep them",
            RuntimeWarning,
            stacklevel=3,
        )
    v16 = values.astype(np.float16)
    low = v16.astype(np.float32) < values
    v16[low] = np.nextafter(v16[low], np.float16(np.inf))
    v16[v16 == 0] = np.float16(1.0)
    return v16


def _check_fp16_magnitude(largest, what="largest dequantised value"):
    """Refuse a layer whose largest dequantised magnitude ``|scale * (q - zero)|`` exceeds float16: the GPU
    kernels compute it in float16, so it would be inf there while finite in the float32 reference."""
    if largest > _FP16_MAX:
        raise ValueError(
            f"weight: magnitudes too large for float16 ({what} {float(largest):.4g} > {_FP16_MAX}); the GPU "
            "kernels form the dequantised weights in float16"
        )


def relative_error(w, w_dq):
    """Relative Frobenius error ``||w - w_dq|| / ||w||`` (float64 arithmetic) as a Python float.

    Args:
        w: reference array, any real (float, integer or bool) dtype and shape (NumPy, CuPy or torch).
        w_dq: approximation of the same shape.

    Both are divided by their largest magnitude before the norms are taken, so tiny or huge finite values
    neither underflow nor overflow. Returns 0.0 when both are zero and ``inf`` when only ``w`` is zero.
    Raises TypeError for complex, object or other non-numeric input.
    """
    a = _real_float64(w, "w")
    b = _real_float64(w_dq, "w_dq")
    if a.shape != b.shape:
        raise ValueError(f"w_dq: expected shape {a.shape} (the shape of w), got {b.shape}")
    peak = max(float(np.max(np.abs(a), initial=0.0)), float(np.max(np.abs(b), initial=0.0)))
    if peak == 0.0:
        return 0.0
    if math.isfinite(peak):
        a, b = a / peak, b / peak
    diff = float(np.linalg.norm((a - b).ravel()))
    ref = float(np.linalg.norm(a.ravel()))
    if ref == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / ref


def _real_float64(a, name):
    """float64 NumPy copy of a real array; TypeError naming ``name`` for complex or non-numeric input."""
    if a is None:
        raise TypeError(f"{name}: expected a real array, got None")
    arr = _as_numpy(a, name)
    if arr.dtype.kind not in "fiub":
        raise TypeError(f"{name}: expected a real (float, integer or bool) array, got dtype {arr.dtype}")
    return arr.astype(np.float64)
