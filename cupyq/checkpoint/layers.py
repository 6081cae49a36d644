"""The layers of a checkpoint: :class:`LayerInfo`, detection from tensor names, checks of each layer's headers.

A layer is named by the prefix its tensors share (``<name>.qweight``, ``<name>.q_weight``, ``<name>.weight``);
its format follows from the suffixes and, for ``qweight`` (GPTQ or AWQ), from the quantization config. Every
check here reads headers only: dtypes, shapes and the settings they must agree with.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from cupyq.checkpoint.config import QUANT_CONFIG_FILES, v1_zero_encoding
from cupyq.checkpoint.errors import _fail
from cupyq.checkpoint.safetensors_io import _FLOAT_ST, _ST_DTYPES

__all__ = ["LayerInfo", "detect_layers"]

_GPTQ_PARTS = ("qweight", "qzeros", "scales", "g_idx", "bias")
_AWQ_PARTS = ("qweight", "qzeros", "scales", "bias")
_EXL2_PARTS = ("q_weight", "q_invperm", "q_perm", "q_scale", "q_scale_max", "q_groups", "bias")
# Suffixes that only ever belong to a quantized layer: one without its main tensor is an error.
_QUANT_ONLY_SUFFIXES = ("qzeros", "scales", "g_idx", "q_invperm", "q_perm", "q_scale", "q_scale_max", "q_groups")


@dataclass(frozen=True)
class LayerInfo:
    """What one layer of a checkpoint is, from its tensor headers (and, for EXL2 details, q_groups).

    Attributes:
        name: module name (``model.layers.0.self_attn.q_proj``).
        format: ``"gptq"``, ``"exl2"``, ``"awq"`` or, for a plain weight, its dtype: ``"fp16"``, ``"bf16"``, ``"fp32"``.
        in_features, out_features: K and N of ``y = x @ W`` (EXL2: N is the stored width, which
            converters pad to a multiple of 32).
        bits: tuple of bit widths (GPTQ ``(b,)``; EXL2 distinct widths descending, None until
            :meth:`Checkpoint.layer_info` has read q_groups; plain: ``(16,)`` or ``(32,)``).
        bit_mix: EXL2 ``((bits, rows), ...)`` per width, or None.
        bits_per_weight: storage bits per weight of the encoded weight (GPTQ qweight+qzeros+scales,
            EXL2 q_weight+q_scale+q_scale_max; g_idx / permutation / bias not counted).
        group_size: GPTQ rows per group (-1: one group); EXL2 rows per group when all full groups
            agree, else None.
        act_order: GPTQ desc_act; EXL2 True unless the stored permutation is the identity.
        checkpoint_format: ``"gptq"`` / ``"gptq_v2"`` for GPTQ, None otherwise.
        v1_encoding: for v1 GPTQ layers how the zeros are decoded, ``"field"`` or ``"word"``
            (:func:`v1_zero_encoding`; ``"field"`` when the producer is unknown), None otherwise.
        v1_encoding_known: False for a v1 GPTQ layer whose producer's encoding the config does not tell.
        nbytes: bytes of all the layer's tensors.
        tensors: the layer's tensor names.
    """

    name: str
    format: str
    in_features: int
    out_features: int
    bits: tuple | None
    bits_per_weight: float
    group_size: int | None
    act_order: bool | None
    checkpoint_format: str | None
    nbytes: int
    tensors: tuple
    bit_mix: tuple | None = None
    v1_encoding: str | None = None
    v1_encoding_known: bool = True

    @property
    def quantized(self) -> bool:
        return self.format in ("gptq", "exl2", "awq")


def _require(parts, part, prefix, anchor):
    if part not in parts:
        _fail(anchor.file, f"layer '{prefix}' has {anchor.name.rsplit('.', 1)[1]} but no '{prefix}.{part}'", f"{prefix}.{part}")
    return parts[part]


def _require_dtype(rec, allowed):
    if rec.dtype not in allowed:
        _fail(rec.file, f"expected dtype {' or '.join(allowed)}, got {rec.dtype}", rec.name)


def _require_shape(rec, shape, why=""):
    if rec.shape != tuple(shape):
        _fail(rec.file, f"expected shape {list(shape)}{why}, got {list(rec.shape)}", rec.name)


def _require_ndim(rec, ndim):
    if len(rec.shape) != ndim:
        _fail(rec.file, f"expected a {ndim}-D tensor, got shape {list(rec.shape)}", rec.name)


def _gptq_layer(prefix, parts, qcfg, tgi_params) -> LayerInfo:
    qweight = parts["qweight"]
    qzeros = _require(parts, "qzeros", prefix, qweight)
    scales = _require(parts, "scales", prefix, qweight)
    if qcfg is not None and qcfg.quant_method == "gptq":
        settings = qcfg.for_layer(prefix)
        if settings is None:
            _fail(qweight.file, f"quantized tensors present but {qcfg.source.name} 'dynamic' excludes this module", qweight.name)
        bits, gs, act, _ = settings
        fmt = qcfg.checkpoint_format
    elif tgi_params is not None:
        bits, gs, act, fmt = tgi_params["bits"], tgi_params["group_size"], False, "gptq"
    else:
        _fail(
            qweight.file,
            f"GPTQ tensors but no GPTQ quantization config ({', '.join(QUANT_CONFIG_FILES[:2])} or "
            "config.json quantization_config) gives the bit width",
            qweight.name,
        )
    _require_dtype(qweight, ("I32",))
    _require_dtype(qzeros, ("I32",))
    _require_dtype(scales, _FLOAT_ST)
    for rec in (qweight, qzeros, scales):
        _require_ndim(rec, 2)
    rows, n = qweight.shape
    if rows == 0 or n == 0:
        _fail(qweight.file, f"empty tensor {list(qweight.shape)}", qweight.name)
    unit_words = 3 if bits == 3 else 1
    if rows % unit_words:
        _fail(qweight.file, f"{bits}-bit qweight rows come in units of 3 words, got {rows} rows", qweight.name)
    k = rows * 32 // bits
    g_idx = parts.get("g_idx")
    if g_idx is not None:
        _require_dtype(g_idx, ("I32", "I64"))
        _require_shape(g_idx, (k,), f" (in_features of qweight {list(qweight.shape)} at {bits} bits)")
    elif act:
        _fail(
            qweight.file,
            f"desc_act (act-order) layer without '{prefix}.g_idx': the group of each input row is not stored, "
            "and reading the groups in sequence would give wrong weights",
            qweight.name,
        )
    groups = scales.shape[0]
    _require_shape(scales, (groups, n), " (groups x out_features)")
    _require_shape(qzeros, (groups, -(-n * bits // 32)), f" ({groups} groups x out_features*{bits}/32)")
    if groups == 0:
        _fail(scales.file, "expected at least one group", scales.name)
    if gs is None:  # infer: one group, or the smallest size giving this many groups
        gs = -1 if groups == 1 else -(-k // groups)
        if -(-k // gs) != groups:
            _fail(scales.file, f"{groups} groups cannot split {k} input rows evenly; set group_size in the config", scales.name)
    expected_groups = 1 if gs == -1 else -(-k // gs)
    if groups != expected_groups:
        _fail(
            scales.file,
            f"has {groups} groups, but {k} input rows with group_size {gs} need {expected_groups}",
            scales.name,
        )
    bias = parts.get("bias")
    if bias is not None:
        _require_dtype(bias, _FLOAT_ST)
        _require_shape(bias, (n,), " (out_features)")
    weight_bytes = qweight.nbytes + qzeros.nbytes + scales.nbytes
    encoding = v1_zero_encoding(qcfg) if fmt == "gptq" else None
    return LayerInfo(
        name=prefix,
        format="gptq",
        in_features=k,
        out_features=n,
        bits=(bits,),
        bits_per_weight=8.0 * weight_bytes / (k * n),
        group_size=gs,
        act_order=bool(act),
        checkpoint_format=fmt,
        nbytes=sum(r.nbytes for r in parts.values()),
        tensors=tuple(r.name for r in parts.values()),
        v1_encoding=(encoding or "field") if fmt == "gptq" else None,
        v1_encoding_known=fmt != "gptq" or encoding is not None,
    )


def _awq_layer(prefix, parts, qcfg) -> LayerInfo:
    qweight = parts["qweight"]
    qzeros = _require(parts, "qzeros", prefix, qweight)
    scales = _require(parts, "scales", prefix, qweight)
    if "g_idx" in parts:
        rec = parts["g_idx"]
        _fail(rec.file, f"AWQ layers have no g_idx (groups are consecutive rows), but {qcfg.source.name} says awq", rec.name)
    if qcfg.keeps_dense(prefix):
        _fail(qweight.file, f"quantized tensors present but {qcfg.source.name} modules_to_not_convert lists this module", qweight.name)
    _require_dtype(qweight, ("I32",))
    _require_dtype(qzeros, ("I32",))
    _require_dtype(scales, _FLOAT_ST)
    for rec in (qweight, qzeros, scales):
        _require_ndim(rec, 2)
    k, words = qweight.shape
    if k == 0 or words == 0:
        _fail(qweight.file, f"empty tensor {list(qweight.shape)}", qweight.name)
    n = 8 * words
    groups = scales.shape[0]
    _require_shape(scales, (groups, n), " (groups x out_features, 8 per qweight column)")
    _require_shape(qzeros, (groups, words), " (groups x out_features/8)")
    if groups == 0:
        _fail(scales.file, "expected at least one group", scales.name)
    gs = qcfg.group_size
    if gs is None:  # infer from the shapes
        if k % groups:
            _fail(scales.file, f"{groups} groups cannot split {k} input rows evenly; set group_size in the config", scales.name)
        gs = k // groups
    rows = k if gs == -1 else gs
    if k % rows:
        _fail(qweight.file, f"group_size {gs} does not divide the {k} input rows (AWQ groups are whole)", qweight.name)
    if groups != k // rows:
        _fail(scales.file, f"has {groups} groups, but {k} input rows with group_size {gs} need {k // rows}", scales.name)
    bias = parts.get("bias")
    if bias is not None:
        _require_dtype(bias, _FLOAT_ST)
        _require_shape(bias, (n,), " (out_features)")
    weight_bytes = qweight.nbytes + qzeros.nbytes + scales.nbytes
    return LayerInfo(
        name=prefix,
        format="awq",
        in_features=k,
        out_features=n,
        bits=(4,),
        bits_per_weight=8.0 * weight_bytes / (k * n),
        group_size=gs,
        act_order=False,
        checkpoint_format=None,
        nbytes=sum(r.nbytes for r in parts.values()),
        tensors=tuple(r.name for r in parts.values()),
    )


def _exl2_layer(prefix, parts) -> LayerInfo:
    q_weight = parts["q_weight"]
    recs = {p: _require(parts, p, prefix, q_weight) for p in ("q_invperm", "q_scale", "q_scale_max", "q_groups")}
    _require_dtype(q_weight, ("I32",))
    _require_dtype(recs["q_invperm"], ("I32", "I64", "I16"))
    _require_dtype(recs["q_scale"], ("I32",))
    _require_dtype(recs["q_scale_max"], _FLOAT_ST)
    _require_dtype(recs["q_groups"], ("I16", "I32"))
    _require_ndim(q_weight, 2)
    _require_ndim(recs["q_invperm"], 1)
    _require_ndim(recs["q_scale"], 2)
    qrows, n_pad = q_weight.shape
    k = recs["q_invperm"].shape[0]
    if qrows == 0 or n_pad == 0 or k == 0:
        _fail(q_weight.file, f"empty layer: q_weight {list(q_weight.shape)}, q_invperm [{k}]", q_weight.name)
    if k > 65535:
        _fail(recs["q_invperm"].file, f"{k} input rows exceed the EXL2 limit of 65535", recs["q_invperm"].name)
    if n_pad % 8:
        _fail(q_weight.file, f"out_features {n_pad} must be a multiple of 8 (scale codes pack 8 per word)", q_weight.name)
    groups = recs["q_scale"].shape[0]
    _require_shape(recs["q_scale"], (groups, n_pad // 8), " (groups x out_features/8)")
    _require_shape(recs["q_scale_max"], (groups,), " (one per group)")
    _require_shape(recs["q_groups"], (2 * groups,), " (bits, first row) per group")
    if "q_perm" in parts:
        _require_shape(parts["q_perm"], (k,), " (in_features)")
    if not 2 * k <= qrows * 32 <= 8 * k + 8 * 32 * groups:
        _fail(q_weight.file, f"{qrows} packed rows cannot hold {k} rows of 2..8 bits", q_weight.name)
    bias = parts.get("bias")
    if bias is not None:
        _require_dtype(bias, _FLOAT_ST)
        _require_ndim(bias, 1)
        if not (n_pad - 32 < bias.shape[0] <= n_pad):
            _fail(bias.file, f"expected {n_pad} values (or the unpadded width), got {bias.shape[0]}", bias.name)
    weight_bytes = q_weight.nbytes + recs["q_scale"].nbytes + recs["q_scale_max"].nbytes
    return LayerInfo(
        name=prefix,
        format="exl2",
        in_features=k,
        out_features=n_pad,
        bits=None,
        bits_per_weight=8.0 * weight_bytes / (k * n_pad),
        group_size=None,
        act_order=True,
        checkpoint_format=None,
        nbytes=sum(r.nbytes for r in parts.values()),
        tensors=tuple(r.name for r in parts.values()),
    )


def _dense_layer(prefix, parts) -> LayerInfo:
    weight = parts["weight"]
    fmt = {"F16": "fp16", "BF16": "bf16", "F32": "fp32", "F64": "fp64"}[weight.dtype]
    out_f, in_f = weight.shape
    return LayerInfo(
        name=prefix,
        format=fmt,
        in_features=in_f,
        out_features=out_f,
        bits=(8 * _ST_DTYPES[weight.dtype].itemsize,),
        bits_per_weight=float(8 * _ST_DTYPES[weight.dtype].itemsize),
        group_size=None,
        act_order=None,
        checkpoint_format=None,
        nbytes=sum(r.nbytes for r in parts.values()),
        tensors=tuple(r.name for r in parts.values()),
    )


def _natural_key(name):
    """Sort key putting ``layers.2`` before ``layers.10``."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name)]


def _split(name):
    prefix, _, suffix = name.rpartition(".")
    return prefix, suffix


def _ordered(*groups):
    names = {p for g in groups for p in g}
    return sorted(names, key=_natural_key)


def detect_layers(tensors, quant_config, tgi_params) -> dict:
    """``{layer name: LayerInfo}`` of a checkpoint's tensors, sorted by name (``layers.2`` before ``layers.10``).

    tensors: ``{tensor name: TensorRecord}``; quant_config: :class:`QuantConfig` or None (``awq`` makes every
    ``qweight`` layer AWQ); tgi_params: called, only when there are GPTQ layers and the config is not AWQ, for
    the ``{"bits", "group_size"}`` that TGI-made checkpoints store as scalar tensors (None when absent).
    Raises :class:`CheckpointError` for a layer whose headers are inconsistent or whose format is ambiguous.
    """
    gptq, exl2 = {}, {}
    for name, rec in tensors.items():
        prefix, suffix = _split(name)
        if suffix == "qweight":
            gptq[prefix] = {}
        elif suffix == "q_weight":
            exl2[prefix] = {}
    for prefix in gptq.keys() & exl2.keys():
        rec = tensors[prefix + ".qweight"]
        _fail(rec.file, f"layer '{prefix}' has both GPTQ (qweight) and EXL2 (q_weight) tensors", rec.name)
    dense = {}
    for name, rec in tensors.items():
        prefix, suffix = _split(name)
        if prefix in gptq and suffix in _GPTQ_PARTS:
            gptq[prefix][suffix] = rec
        elif prefix in exl2 and suffix in _EXL2_PARTS:
            exl2[prefix][suffix] = rec
        elif prefix in gptq or prefix in exl2:
            if suffix == "weight":
                _fail(rec.file, f"layer '{prefix}' has both a plain weight and quantized tensors", name)
            # other per-layer extras (e.g. a stored q_group_map) are kept as plain tensors
        elif suffix in _QUANT_ONLY_SUFFIXES:
            main = "q_weight" if suffix.startswith("q_") else "qweight"
            _fail(rec.file, f"quantized tensor without its '{prefix}.{main}' (dangling {suffix})", name)
        elif suffix == "weight" and len(rec.shape) == 2 and rec.dtype in _FLOAT_ST:
            dense[prefix] = {"weight": rec}
    for prefix, parts in dense.items():
        if prefix + ".bias" in tensors:
            parts["bias"] = tensors[prefix + ".bias"]
    awq = quant_config is not None and quant_config.quant_method == "awq"
    tgi = tgi_params() if gptq and not awq else None
    layers = {}
    for prefix in _ordered(gptq, exl2, dense):
        if prefix in gptq and awq:
            layers[prefix] = _awq_layer(prefix, gptq[prefix], quant_config)
        elif prefix in gptq:
            layers[prefix] = _gptq_layer(prefix, gptq[prefix], quant_config, tgi)
        elif prefix in exl2:
            layers[prefix] = _exl2_layer(prefix, exl2[prefix])
        else:
            layers[prefix] = _dense_layer(prefix, dense[prefix])
    return layers
