"""The function-style API of the compiled exllamav2 extension: :func:`ext_make_q_matrix` builds a layer's matrix
and binds its dequantisation scratch, :func:`ext_gemm_half_q_half` multiplies by it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cupyq import torch_ops
from cupyq.exllamav2.device_tensors import ExLlamaV2DeviceTensors
from cupyq.exllamav2.weights import build_qmatrix, is_absent, weight_fields
from cupyq.scratch import scratch_need


def qmatrix_bytes(qm) -> int:
    """Bytes of a whole fp16 dequantised copy of ``qm`` plus 128 (the most scratch it can use)."""
    return scratch_need(qm).full_bytes


def qmatrix_torch_device(qm) -> torch.device:
    """The torch device ``qm`` lives on (``cpu`` for a matrix on the reference path)."""
    if not getattr(qm, "is_cuda", False):
        return torch.device("cpu")
    return torch.device("cuda", int(qm.device_id))


def bind_scratch(qm, temp_dq):
    """Give ``qm`` its dequantisation scratch from ``temp_dq``; returns the slice used (or None).

    temp_dq of the wrong type is a TypeError for a CPU matrix too, though a CPU matrix takes no scratch."""
    if is_absent(temp_dq):
        return None
    if not isinstance(temp_dq, (ExLlamaV2DeviceTensors, torch.Tensor)) and not hasattr(temp_dq, "get_scratch_slice"):
        raise TypeError(
            f"temp_dq: expected an ExLlamaV2DeviceTensors, a CUDA tensor or None, got {type(temp_dq).__name__}"
        )
    if not getattr(qm, "is_cuda", False):
        return None  # CPU matrices need no scratch; without one, gemm uses its bounded default
    device = qmatrix_torch_device(qm)
    if isinstance(temp_dq, ExLlamaV2DeviceTensors):
        if temp_dq.device != device:
            raise ValueError(f"temp_dq: scratch is on {temp_dq.device} but the layer is on {device}")
        piece = temp_dq.get_dequant_slice(qmatrix_bytes(qm))
    elif isinstance(temp_dq, torch.Tensor):
        piece = temp_dq
    else:  # another module's device-tensors object
        piece = temp_dq.get_scratch_slice(qmatrix_bytes(qm))
    if not isinstance(piece, torch.Tensor) or piece.device != device:
        where = piece.device if isinstance(piece, torch.Tensor) else type(piece).__name__
        raise ValueError(f"temp_dq: expected a scratch tensor on {device}, got {where}")
    qm.set_scratch(piece)
    return piece


def ext_make_q_matrix(w, temp_dq=None, key=None):
    """Build the quantized matrix of one layer; returns the ``cupyq.QMatrix`` (the handle).

    w: a mapping or a weight object with either
      GPTQ: ``qweight`` int32 ``[K/8, N]``, ``qzeros`` int32 ``[G, N/8]``, ``scales`` float16/float32
      ``[G, N]``, optional ``g_idx`` int32/int64 ``[K]`` (any device; ``None``/``none_tensor`` for none),
      optional ``bias`` ``[N]``, optional ``bits`` (default 4) and ``checkpoint_format``
      ("gptq" default, "gptq_v2");
      EXL2: ``q_weight`` int32 ``[Q, N]``, ``q_invperm`` int16/int32 ``[K]`` (or ``q_perm`` from which it
      is derived), ``q_scale`` int32 ``[G, N/8]``, ``q_scale_max`` float16 ``[G]`` as stored in the
      checkpoint for a mapping, already divided by 256 for a TGI ``Exl2Weight`` object, ``q_groups``
      int16 ``[2G]``, optional ``bias``; ``q_group_map`` is accepted and ignored.
    temp_dq: ``None``/``none_tensor``, a float16/uint8 CUDA tensor, or an :class:`ExLlamaV2DeviceTensors`
      (its shared dequantisation region is used) -- the scratch of the large-m path.
    key: layer name used in error messages.

    No tensor of ``w`` is modified, and ``w`` itself is not modified either.
    """
    fields, scale_max_divided = weight_fields(w)
    qm = build_qmatrix(fields, scale_max_divided, key or "w")
    bind_scratch(qm, temp_dq)
    return qm


def _resolve_handle(q_handle):
    """``(qm, int handle)`` from a QMatrix or an int handle."""
    if q_handle is None:
        raise ValueError("q_handle: no quantized matrix (call post_init() or create_exllama_buffers() first)")
    if isinstance(q_handle, (int, np.integer)) and not isinstance(q_handle, bool):
        return torch_ops.lookup_qmatrix(int(q_handle)), int(q_handle)
    try:
        return q_handle, torch_ops.register_qmatrix(q_handle)
    except TypeError:
        raise TypeError(f"q_handle: expected the cupyq.QMatrix ext_make_q_matrix returned (or its int handle), "
                        f"got {type(q_handle).__name__}") from None


def ext_gemm_half_q_half(x, q_handle, q4_width, force_cuda=False):
    """``x @ W (+ bias)``: x ``[..., K]`` (float16 on CUDA) -> ``[..., q4_width]`` of x's dtype.

    q_handle: from :func:`ext_make_q_matrix` (or its int handle from
    :func:`cupyq.torch_ops.register_qmatrix`). q4_width must be at least the matrix's out_features;
    columns beyond it (a 32-padded width) are zeros. force_cuda: always run the quantized kernel,
    never the dequantise + matmul path.
    """
    qm, handle = _resolve_handle(q_handle)
    if isinstance(q4_width, bool) or not isinstance(q4_width, (int, np.integer)):
        raise TypeError(f"q4_width: expected an integer (the output width, at least out_features={qm.out_features}), "
                        f"got {type(q4_width).__name__} {q4_width!r}")
    width = int(q4_width)
    if width < qm.out_features:
        raise ValueError(f"q4_width: expected at least out_features={qm.out_features}, got {width}")
    y = torch_ops.apply_qgemm(x, handle, bool(force_cuda))
    if width > qm.out_features:
        y = F.pad(y, (0, width - qm.out_features))
    return y
