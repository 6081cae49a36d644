"""Round-to-nearest AWQ quantizer (see :mod:`cupyq.quantize`)."""

from __future__ import annotations

import numpy as np

from cupyq.formats import awq as _awq
from cupyq.quantize.common import _bias_float16, _check_fp16_magnitude, _fp16_at_least, _weight_float32


def quantize_awq(weight, *, group_size=128, bias=None):
    """Round-to-nearest asymmetric 4-bit quantisation of a ``[K, N]`` weight into AWQ (GEMM) tensors.

    No activation-aware scaling is searched: each group of ``group_size`` consecutive input rows gets a
    scale and an integer zero point per column from its min/max (the range widened to contain 0), and
    every weight is rounded to the nearest level of that grid.

    Args:
        weight: float array (NumPy, CuPy or torch) ``[K, N]`` = ``[in, out]``; ``N`` a multiple of 8.
        group_size: rows per group, dividing ``K``; -1 for one group over all of ``K``.
        bias: optional float ``[N]``, stored as float16.

    Returns:
        dict of NumPy arrays laid out as AutoAWQ's GEMM format stores them (:mod:`cupyq.formats.awq`):
          ``qweight`` int32 ``[K, N/8]``, ``qzeros`` int32 ``[G, N/8]`` (zero points as they are),
          ``scales`` float16 ``[G, N]`` with ``G = K / group_size``, and ``bias`` float16 ``[N]`` if given.
          Dequantised: ``W[k, n] = scales[k // group_size, n] * (q[k, n] - zero[k // group_size, n])``.
    """
    w = _weight_float32(weight)
    k, n = w.shape
    if n % 8:
        raise ValueError(f"weight: out_features {n} must be a multiple of 8 for AWQ packing (8 outputs per word)")
    try:
        gs = _awq.resolve_group_size(group_size, k)
    except ValueError as exc:
        raise ValueError(str(exc).replace("in_features", f"in_features (weight has {k} rows)", 1)) from None
    groups = k // gs
    maxq = 15
    blocks = w.reshape(groups, gs, n)
    lo = np.minimum(blocks.min(axis=1), 0.0)
    hi = np.maximum(blocks.max(axis=1), 0.0)
    scales = _fp16_at_least((hi - lo) / maxq, w.shape)
    zeros = np.clip(np.rint(-lo / scales.astype(np.float32)), 0, maxq).astype(np.int64)
    # Quantise against the float16 scales that are stored, so dequantisation sees the same grid.
    q = np.clip(np.rint(blocks / scales.astype(np.float32)[:, None, :]) + zeros[:, None, :], 0, maxq)
    _check_fp16_magnitude(np.abs((q - zeros[:, None, :]) * scales.astype(np.float32)[:, None, :]).max())
    out = {
        "qweight": np.ascontiguousarray(_awq.pack_qweight(q.reshape(k, n).astype(np.uint8), xp=np)),
        "qzeros": np.ascontiguousarray(_awq.pack_qzeros(zeros.astype(np.uint8), xp=np)),
        "scales": scales,
    }
    if bias is not None:
        out["bias"] = _bias_float16(bias, n)
    return out
