"""Checkpoint tensors to a :class:`cupyq.QMatrix` for the exllamav2-compatible module: the fields of a mapping
(LoRAX) or a weight object (TGI), GPTQ 4-bit validation, the EXL2 group map, and the absent-tensor placeholder.

Helpers of the :mod:`cupyq.exllamav2` package; its public names are imported from there.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from cupyq.formats.common import is_int


# Placeholder for an absent tensor, as in the original module (which passed it to C++ for "None").
# Every function of the package also accepts plain None.
none_tensor = torch.empty((1, 1), device="meta")


def is_absent(t) -> bool:
    """True for None and for a meta tensor such as :data:`none_tensor` (the original's "no tensor")."""
    return t is None or (isinstance(t, torch.Tensor) and t.is_meta)


def make_group_map(q_groups, num_qrows) -> torch.Tensor:
    """EXL2 group map: per sorted row ``(group index, rows left in the group counting this row)``.

    q_groups: int16/int32 torch tensor ``[2G]`` of ``(bits, first packed row)`` pairs; num_qrows:
    ``q_weight.shape[0]``. Returns int16 ``[2 * rows]`` on ``q_groups.device``, interleaved
    ``[g0, left0, g1, left1, ...]``, where every group counts its full capacity ``qrows * 32 // bits``
    (identical to :func:`cupyq.formats.exl2.make_group_map`).
    """
    from cupyq.formats import exl2

    if not isinstance(q_groups, torch.Tensor):
        raise TypeError(f"q_groups: expected a torch tensor, got {type(q_groups).__name__}")
    if not is_int(num_qrows):
        raise TypeError(f"num_qrows: expected an int (q_weight.shape[0]), got {type(num_qrows).__name__} {num_qrows!r}")
    host = q_groups.detach().cpu().numpy()
    group_map = np.ascontiguousarray(exl2.make_group_map(host, int(num_qrows), xp=np))
    return torch.from_numpy(group_map).to(q_groups.device)


_GPTQ_FIELDS = ("qweight", "qzeros", "scales", "g_idx", "bias", "bits", "checkpoint_format")
_EXL2_FIELDS = ("q_weight", "q_invperm", "q_perm", "q_scale", "q_scale_max", "q_groups", "q_group_map", "bias")


def weight_fields(w):
    """``(fields, scale_max_divided)`` from a mapping (LoRAX) or a weight object (TGI); TypeError naming ``w`` for
    None or a tensor (whose attributes, such as ``Tensor.q_scale``, would read as fields)."""
    if isinstance(w, Mapping):
        return dict(w), False
    if w is None or isinstance(w, torch.Tensor):
        raise TypeError(f"w: expected a mapping or a GPTQ/EXL2 weight object of tensors, got {type(w).__name__}")
    fields = {name: getattr(w, name) for name in _GPTQ_FIELDS + _EXL2_FIELDS if hasattr(w, name)}
    # TGI's Exl2Weight divides q_scale_max by 256 when it is created; the checkpoint value is 256x that.
    return fields, "q_weight" in fields


def _widen_invperm(q_invperm):
    # int16 holds K up to 65535 only when read as unsigned (TGI narrows q_invperm to int16).
    if isinstance(q_invperm, torch.Tensor) and q_invperm.dtype == torch.int16:
        return q_invperm.to(torch.int32) & 0xFFFF
    return q_invperm


def _missing_exl2(fields) -> list:
    """Names of the EXL2 tensors absent from ``fields`` (q_invperm counts as present when q_perm is given)."""
    missing = [k for k in ("q_weight", "q_scale", "q_scale_max", "q_groups") if is_absent(fields.get(k))]
    if is_absent(fields.get("q_invperm")) and is_absent(fields.get("q_perm")):
        missing.append("q_invperm (or q_perm)")
    return missing


def _exl2_invperm(fields):
    """q_invperm of EXL2 ``fields``: the one given (int16 read as unsigned), else the inverse of q_perm, which must be
    a permutation (ValueError naming q_perm: the inverse of anything else would be a permutation all the same)."""
    from cupyq.formats import exl2

    q_invperm = fields.get("q_invperm")
    if not is_absent(q_invperm):
        return _widen_invperm(q_invperm)
    q_perm = fields["q_perm"]
    inverse = exl2.perm_from_invperm(q_perm, name="q_perm")  # one rule inverts either into the other
    return torch.from_numpy(inverse).to(q_perm.device) if isinstance(q_perm, torch.Tensor) else inverse


def validate_exl2(weight):
    """The checked EXL2 layout (:class:`cupyq.formats.exl2.Exl2Layout`) of a TGI ``Exl2Weight``-like object given
    to QuantLinear: ValueError naming ``weight`` for an absent tensor, TypeError naming one that is not a torch
    tensor, then :func:`cupyq.formats.exl2.check_exl2` (ValueError / TypeError naming the tensor)."""
    from cupyq.formats import exl2

    fields, _ = weight_fields(weight)
    missing = _missing_exl2(fields)
    if missing:
        raise ValueError(f"weight: EXL2 weight object ({type(weight).__name__}) has no {', '.join(missing)}")
    for tensor_name in ("q_weight", "q_invperm", "q_perm", "q_scale", "q_scale_max", "q_groups"):
        t = fields.get(tensor_name)
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{tensor_name}: expected a torch tensor, got {type(t).__name__}")
    return exl2.check_exl2(fields["q_weight"], _exl2_invperm(fields), fields["q_scale"], fields["q_scale_max"],
                           fields["q_groups"])


def _make_exl2(fields, scale_max_divided, name):
    from cupyq.qmatrix import QMatrix

    missing = _missing_exl2(fields)
    if missing:
        raise ValueError(f"{name}: EXL2 weights lack {', '.join(missing)}")
    q_invperm = _exl2_invperm(fields)
    q_scale_max = fields["q_scale_max"]
    if scale_max_divided:
        q_scale_max = q_scale_max * 256  # a new tensor; exact (power of two)
    bias = None if is_absent(fields.get("bias")) else fields["bias"]
    # q_group_map is not needed: QMatrix derives its row layout from q_groups and q_invperm.
    return QMatrix.from_exl2(
        fields["q_weight"], q_invperm, fields["q_scale"], q_scale_max, fields["q_groups"], bias
    )


def _make_gptq(fields, name):
    from cupyq.qmatrix import QMatrix

    missing = [k for k in ("qweight", "qzeros", "scales") if is_absent(fields.get(k))]
    if missing:
        raise ValueError(f"{name}: GPTQ weights lack {', '.join(missing)}")
    qweight = fields["qweight"]
    g_idx = None if is_absent(fields.get("g_idx")) else fields["g_idx"]  # any device (read on the host)
    bias = None if is_absent(fields.get("bias")) else fields["bias"]
    bits = fields.get("bits", 4)
    checkpoint_format = fields.get("checkpoint_format", "gptq")
    group_size = None if g_idx is not None else _exllamav2_group_size(qweight, fields["qzeros"], bits)
    if group_size not in (None, -1):
        _check_power_of_two_groups(qweight, fields["qzeros"], fields["scales"], bits, group_size)
    return QMatrix.from_gptq(
        qweight, fields["qzeros"], fields["scales"], g_idx, bias, bits=bits, checkpoint_format=checkpoint_format,
        group_size=group_size,
    )


def _exllamav2_group_size(qweight, qzeros, bits):
    """The group size exllamav2 reads a GPTQ layer without g_idx with: the smallest power of two whose groups cover
    the K input rows (-1 for one group); None where the shapes are not those of a layer (QMatrix.from_gptq says why)."""
    from cupyq.formats import gptq

    shapes = [tuple(getattr(a, "shape", ())) for a in (qweight, qzeros)]
    if isinstance(bits, bool) or bits not in gptq.GPTQ_BITS or any(len(sh) != 2 or not sh[0] for sh in shapes):
        return None
    in_features, groups = shapes[0][0] * 32 // int(bits), shapes[1][0]
    if groups == 1:
        return -1
    size = 1
    while size * groups < in_features:
        size *= 2
    return size


def _check_power_of_two_groups(qweight, qzeros, scales, bits, group_size):
    """ValueError naming g_idx where the power-of-two ``group_size`` read for a layer without g_idx does not give
    the group count qzeros and scales agree on (a checkpoint with groups of, say, 96 rows: only its g_idx says so);
    where they disagree, QMatrix.from_gptq names the one that is wrong."""
    in_features, groups = qweight.shape[0] * 32 // int(bits), qzeros.shape[0]
    needed = -(-in_features // group_size)
    if needed != groups and tuple(getattr(scales, "shape", ()))[:1] == (groups,):
        raise ValueError(
            f"g_idx: none given, so the layer is read with the power-of-two group size {group_size} (as exllamav2 "
            f"reads one), which gives {needed} groups for {in_features} input rows, but qzeros/scales have {groups}; "
            "pass the checkpoint's g_idx (k // group_size)"
        )


def build_qmatrix(fields, scale_max_divided, name):
    """The QMatrix of GPTQ or EXL2 ``fields`` (from :func:`weight_fields`); errors name the layer ``name``."""
    make = None
    if "q_weight" in fields:
        make = lambda: _make_exl2(fields, scale_max_divided, name)  # noqa: E731
    elif "qweight" in fields:
        make = lambda: _make_gptq(fields, name)  # noqa: E731
    if make is not None:
        try:
            return make()
        except (TypeError, ValueError) as exc:
            if str(exc).startswith(f"{name}: "):
                raise
            raise type(exc)(f"{name}: {exc}") from exc  # say which layer the bad tensor belongs to
    raise ValueError(
        f"{name}: expected GPTQ weights (qweight, qzeros, scales[, g_idx, bias]) or EXL2 weights "
        f"(q_weight, q_invperm, q_scale, q_scale_max, q_groups[, q_perm, q_group_map, bias]), "
        f"got {sorted(fields)}"
    )


def validate_gptq4(qweight, qzeros, scales, g_idx, bits, groupsize, checkpoint_format="gptq"):
    """The checked GPTQ layout of a 4-bit layer given to QuantLinear (TypeError / ValueError naming the argument);
    checkpoint_format: "gptq" or "gptq_v2" (a TGI weight object may carry one)."""
    from cupyq.formats import gptq

    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise TypeError(f"bits: expected an integer (4), got {type(bits).__name__} {bits!r}")
    if bits != 4:
        raise ValueError(
            f"cupyq.exllamav2.QuantLinear supports only bits=4 GPTQ layers, got bits={bits}; "
            "use cupyq.QMatrix.from_gptq with cupyq.torch_ops.QuantizedLinear for 2-, 3- and 8-bit layers"
        )
    for tensor_name, t in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{tensor_name}: expected a torch tensor, got {type(t).__name__}")
        if t.is_meta:  # the layer could not be built from it (a meta tensor reads as an absent one)
            raise ValueError(f"{tensor_name}: expected the checkpoint's values, got a meta tensor (no data)")
    if g_idx is not None and not isinstance(g_idx, torch.Tensor):
        raise TypeError(f"g_idx: expected a torch tensor or None, got {type(g_idx).__name__}")
    layout = gptq.check_gptq(qweight, qzeros, scales, g_idx, 4)
    gptq._check_format(checkpoint_format)
    if groupsize is not None and groupsize != -1:
        if isinstance(groupsize, bool) or not isinstance(groupsize, (int, np.integer)) or groupsize <= 0:
            raise ValueError(f"groupsize: expected a positive int or -1, got {groupsize!r}")
        if g_idx is None and -(-layout.in_features // int(groupsize)) != layout.groups:
            raise ValueError(
                f"groupsize: {groupsize} gives {-(-layout.in_features // int(groupsize))} groups for "
                f"{layout.in_features} input features, but qzeros/scales have {layout.groups}"
            )
    return layout


def implied_g_idx(qweight, groupsize, in_features, groups):
    """The explicit g_idx (``k // groupsize``) of a layer of several groups given without one, so that the
    matrix does not have to guess its group size from the group count (several sizes may fit); None for one
    group or an unknown (None or -1) groupsize."""
    from cupyq.formats import gptq

    if groupsize is None or groupsize == -1 or groups == 1:
        return None
    g_idx = gptq.default_g_idx(in_features, int(groupsize))
    return torch.from_numpy(g_idx).to(qweight.device)
