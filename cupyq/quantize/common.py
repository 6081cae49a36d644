"""Input checks and helpers shared by the quantizers, and the error measure."""

from __future__ import annotations

import math

import numpy as np


_CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
_FP16_MAX = float(np.finfo(np.float16).max)


def _as_numpy(a, name):
    """NumPy view/copy of a NumPy, CuPy or torch array (float32 for torch bfloat16)."""
    module = type(a).__module__.split(".")[0]
    if module == "cupy":
        return a.get()
    if module == "torch":
        t = a.detach().cpu()
        if not t.dtype.is_floating_point:
            return t.numpy()
        return t.float().numpy()
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


def _fp16_at_least(values):
    """float16 of ``values`` rounded up (never below the float32 input) and never zero."""
    if np.any(values > _FP16_MAX):
        raise ValueError(
            f"weight: magnitudes too large for float16 scales (largest scale {float(values.max()):.4g} "
            f"> {_FP16_MAX})"
        )
    v16 = values.astype(np.float16)
    low = v16.astype(np.float32) < values
    v16[low] = np.nextafter(v16[low], np.float16(np.inf))
    v16[v16 == 0] = np.float16(1.0)
    return v16


def relative_error(w, w_dq):
    """Relative Frobenius error ``||w - w_dq|| / ||w||`` (float64 arithmetic) as a Python float.

    Args:
        w: reference array, any real dtype and shape (NumPy, CuPy or torch).
        w_dq: approximation of the same shape.

    Returns 0.0 when both are zero and ``inf`` when only ``w`` is zero.
    """
    a = _as_numpy(w, "w").astype(np.float64)
    b = _as_numpy(w_dq, "w_dq").astype(np.float64)
    if a.shape != b.shape:
        raise ValueError(f"w_dq: expected shape {a.shape} (the shape of w), got {b.shape}")
    diff = float(np.linalg.norm((a - b).ravel()))
    ref = float(np.linalg.norm(a.ravel()))
    if ref == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / ref
