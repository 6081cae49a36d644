"""Which kernel each quantized layer of a checkpoint gets for a batch size, and why, worked out on the CPU.

The layer's layout sizes come from its groups and storage widths alone (:func:`cupyq.layout.layout_shape`, the
row plan the device layout is built from; no weight is unpacked) and the dispatch rules are those of
:func:`cupyq.rules.choose_kernel`, asked through :func:`cupyq.rules.explain` for a named architecture: no GPU,
no compiled kernel.
"""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np

from cupyq import kernels, rules
from cupyq import layout as _layout

__all__ = ["DTYPES", "parse_arch", "arch_name", "layer_shape", "explain_layer"]

DTYPES = ("float16", "bfloat16")


def parse_arch(text) -> tuple:
    """(major, minor) of an architecture written ``sm_80``, ``sm_90``, ``sm_120`` or ``90``; ValueError for other
    text and for architectures older than sm_80 (which cupyq does not support)."""
    m = re.fullmatch(r"(?:sm_)?(\d{1,2})(\d)", str(text).strip())
    if not m:
        raise ValueError(f"expected an architecture such as sm_80, sm_86, sm_89 or sm_90, got {text!r}")
    cc = (int(m.group(1)), int(m.group(2)))
    if cc < (8, 0):
        raise ValueError(f"{text!r} is older than sm_80, the oldest architecture the kernels support")
    return cc


def arch_name(compute_capability) -> str:
    """``"sm_90"`` from (9, 0)."""
    major, minor = compute_capability
    return f"sm_{major}{minor}"


def layer_shape(ckpt, name) -> _layout.LayoutShape:
    """The :class:`cupyq.layout.LayoutShape` of quantized layer ``name`` of checkpoint ``ckpt`` (a
    :class:`cupyq.checkpoint.Checkpoint`), as the GPU layout would have it. Reads only what fixes the row plan:
    GPTQ ``g_idx`` (int [K]; ``k // group_size`` when absent), EXL2 ``q_groups`` and the height of ``q_weight``;
    nothing for AWQ. ValueError for a plain (dense) layer."""
    from cupyq.formats import awq as fa
    from cupyq.formats import exl2 as fx
    from cupyq.formats import gptq as fg

    info = ckpt.layer_info(name)
    k, n = info.in_features, info.out_features
    if info.format == "gptq":
        if name + ".g_idx" in ckpt.tensors:
            g_idx = ckpt.load_tensor(name + ".g_idx")
        else:
            g_idx = fg.default_g_idx(k, info.group_size)
        _, row_group, storage8 = _layout.gptq_rows(g_idx, info.bits[0])
    elif info.format == "awq":
        gs = fa.resolve_group_size(info.group_size, k)
        _, row_group, storage8 = _layout.gptq_rows(np.arange(k) // gs, info.bits[0])
    elif info.format == "exl2":
        qrows = ckpt.tensors[name + ".q_weight"].shape[0]
        groups = fx.parse_q_groups(ckpt.load_tensor(name + ".q_groups"), qrows, k)
        row_group, storage8 = _layout.exl2_rows(groups)
    else:
        raise ValueError(f"{name}: a plain {info.format} layer has no quantized kernel")
    return _layout.layout_shape(row_group, storage8, n)


def explain_layer(shape: _layout.LayoutShape, ms, dtype: str, compute_capability) -> list:
    """``[(m, kernel, reason), ...]`` for each batch size in ``ms``: the path :func:`cupyq.gemm` takes for ``m``
    rows of ``dtype`` (``"float16"`` or ``"bfloat16"``) activations on a layer of this shape on a GPU of
    ``compute_capability`` ((major, minor))."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    ctype = kernels.CTYPES[dtype]
    qm_like = SimpleNamespace(in_features=shape.in_features, out_features=shape.out_features, layout=shape)
    return [(m, *rules.explain(qm_like, m, ctype, compute_capability)) for m in ms]
