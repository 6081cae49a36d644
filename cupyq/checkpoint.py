"""Hugging Face GPTQ, EXL2 and AWQ checkpoint directories: lazy loading and saving.

A checkpoint directory holds one or more ``*.safetensors`` files (optionally sharded with a
``model.safetensors.index.json``), a ``config.json`` and, for GPTQ and AWQ, the quantisation settings in
``quantize_config.json``, ``quant_config.json`` or ``config.json["quantization_config"]`` (searched in
that order). Each linear layer is detected by its tensor names, so one directory can mix formats:

- GPTQ: ``<name>.qweight`` int32 ``[K*bits/32, N]``, ``.qzeros`` int32 ``[G, N*bits/32]``, ``.scales``
  float ``[G, N]``, optional ``.g_idx`` int ``[K]`` and ``.bias`` ``[N]``;
- EXL2: ``<name>.q_weight`` int32 ``[Q, N_pad]``, ``.q_invperm`` int ``[K]``, ``.q_scale`` int32
  ``[G, N_pad/8]``, ``.q_scale_max`` float ``[G]``, ``.q_groups`` int16 ``[2G]``, optional ``.bias``;
- AWQ (GEMM packing, when the quantization config says ``awq``): ``<name>.qweight`` int32 ``[K, N/8]``,
  ``.qzeros`` int32 ``[G, N/8]``, ``.scales`` float ``[G, N]``, optional ``.bias`` (see
  :mod:`cupyq.formats.awq`); the tensor names are GPTQ's, so the config decides which one it is;
- plain: ``<name>.weight`` 2-D ``[out, in]`` (torch ``nn.Linear`` layout; e.g. an fp16 ``lm_head``).

Opening reads only the safetensors headers; tensors are read when a layer is loaded.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

__all__ = [
    "CheckpointError",
    "Checkpoint",
    "LayerInfo",
    "QuantConfig",
    "TensorRecord",
    "open_checkpoint",
    "read_quant_config",
    "read_safetensors_header",
    "v1_zero_encoding",
    "zero_point_warnings",
    "save_gptq",
    "save_exl2",
    "save_awq",
    "QUANT_CONFIG_FILES",
    "INDEX_FILE",
]

QUANT_CONFIG_FILES = ("quantize_config.json", "quant_config.json", "config.json")
INDEX_FILE = "model.safetensors.index.json"

_GPTQ_BITS = (2, 3, 4, 8)
_GPTQ_FORMATS = ("gptq", "gptq_v2")
# Loading hints older transformers/optimum wrote into checkpoints: not part of the format.
_IGNORED_HINTS = (
    "use_exllama",
    "exllama_config",
    "disable_exllama",
    "use_cuda_fp16",
    "max_input_length",
    "backend",
)
_GPTQ_PARTS = ("qweight", "qzeros", "scales", "g_idx", "bias")
_AWQ_PARTS = ("qweight", "qzeros", "scales", "bias")
_AWQ_VERSIONS = ("gemm",)
# Loading hints transformers writes into AWQ configs: not part of the format.
_AWQ_HINTS = ("backend", "do_fuse", "fuse_max_seq_len", "modules_to_fuse", "exllama_config")
_EXL2_PARTS = ("q_weight", "q_invperm", "q_perm", "q_scale", "q_scale_max", "q_groups", "bias")
# Suffixes that only ever belong to a quantized layer: one without its main tensor is an error.
_QUANT_ONLY_SUFFIXES = ("qzeros", "scales", "g_idx", "q_invperm", "q_perm", "q_scale", "q_scale_max", "q_groups")

_ST_DTYPES = {
    "F16": np.dtype("<f2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "BF16": np.dtype("<u2"),  # read as raw bits, widened to float32 on load
    "I8": np.dtype("i1"),
    "I16": np.dtype("<i2"),
    "I32": np.dtype("<i4"),
    "I64": np.dtype("<i8"),
    "U8": np.dtype("u1"),
    "U16": np.dtype("<u2"),
    "U32": np.dtype("<u4"),
    "U64": np.dtype("<u8"),
    "BOOL": np.dtype("?"),
}
_NP_TO_ST = {
    np.dtype("float16"): "F16",
    np.dtype("float32"): "F32",
    np.dtype("float64"): "F64",
    np.dtype("int8"): "I8",
    np.dtype("int16"): "I16",
    np.dtype("int32"): "I32",
    np.dtype("int64"): "I64",
    np.dtype("uint8"): "U8",
    np.dtype("uint16"): "U16",
    np.dtype("uint32"): "U32",
    np.dtype("uint64"): "U64",
    np.dtype("bool"): "BOOL",
}
_FLOAT_ST = ("F16", "BF16", "F32", "F64")
_MAX_HEADER_BYTES = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint directory that is malformed, inconsistent or unsupported.

    The message names the file, the tensor (when one is involved) and the problem.
    """


def _fail(file, problem, tensor=None):
    where = str(file) + (f": tensor '{tensor}'" if tensor else "")
    raise CheckpointError(f"{where}: {problem}")


# ------------------------------------------------------------------------------------------------
# safetensors headers and tensor reads
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorRecord:
    """Where one tensor lives: file, safetensors dtype string (``"I32"``, ``"F16"``, ``"BF16"``...),
    shape, absolute byte offset of its data and its size in bytes."""

    name: str
    file: Path
    dtype: str
    shape: tuple
    offset: int
    nbytes: int


def read_safetensors_header(path) -> dict:
    """Parse the header of one ``.safetensors`` file without reading any tensor data.

    Returns ``{tensor name: TensorRecord}`` in header order. Raises :class:`CheckpointError` for a
    truncated file, a bad header or a tensor whose byte range does not match its dtype and shape.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                _fail(path, f"not a safetensors file: {size} bytes, shorter than the 8-byte header length")
            header_len = int.from_bytes(head, "little")
            if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
                _fail(path, f"not a safetensors file: header length {header_len} does not fit in {size} bytes")
            raw = f.read(header_len)
    except OSError as exc:
        _fail(path, f"cannot read: {exc}")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        _fail(path, f"safetensors header is not valid JSON ({exc})")
    except RecursionError:
        _fail(path, "safetensors header is nested too deeply to be a tensor table")
    if not isinstance(header, dict):
        _fail(path, "safetensors header is not a JSON object")
    data_start = 8 + header_len
    data_size = size - data_start
    records = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, begin, end = _header_entry(path, name, meta)
        expected = math.prod(shape) * _ST_DTYPES[dtype].itemsize
        if not (0 <= begin <= end <= data_size) or end - begin != expected:
            _fail(
                path,
                f"data range [{begin}, {end}) does not hold {dtype} {list(shape)} ({expected} bytes) "
                f"within the {data_size} data bytes (truncated file?)",
                name,
            )
        records[name] = TensorRecord(name, path, dtype, shape, data_start + begin, end - begin)
    _check_disjoint(path, records.values(), data_start)
    return records


def _is_count(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _header_entry(path, name, meta):
    """(dtype, shape, begin, end) of one header entry, every field checked for type and sign."""
    if not isinstance(meta, dict):
        _fail(path, f"malformed header entry: expected an object with dtype, shape and data_offsets, got {meta!r:.80}", name)
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in meta]
    if missing:
        _fail(path, f"malformed header entry: missing {', '.join(missing)}", name)
    dtype, shape, offsets = meta["dtype"], meta["shape"], meta["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
        _fail(path, f"unsupported safetensors dtype {dtype!r:.40}", name)
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        _fail(path, f"malformed header entry: shape must be a list of non-negative integers, got {shape!r:.80}", name)
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        _fail(path, f"malformed header entry: data_offsets must be two non-negative integers, got {offsets!r:.80}", name)
    return dtype, tuple(shape), offsets[0], offsets[1]


def _check_disjoint(path, records, data_start):
    """Fail when two tensors' data ranges overlap (a corrupt or hand-edited header)."""
    spans = sorted((r.offset, r.offset + r.nbytes, r.name) for r in records if r.nbytes)
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            _fail(
                path,
                f"data range [{b1 - data_start}, {e1 - data_start}) overlaps tensor '{n0}' "
                f"[{b0 - data_start}, {e0 - data_start})",
                n1,
            )


def _read_record(rec: TensorRecord) -> np.ndarray:
    """Read one tensor into a new NumPy array (bfloat16 widened exactly to float32)."""
    buf = bytearray(rec.nbytes)
    with open(rec.file, "rb") as f:
        f.seek(rec.offset)
        got = f.readinto(buf)
    if got != rec.nbytes:
        _fail(rec.file, f"read {got} of {rec.nbytes} bytes (file changed or truncated)", rec.name)
    arr = np.frombuffer(buf, dtype=_ST_DTYPES[rec.dtype]).reshape(rec.shape)
    if rec.dtype == "BF16":
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(arr.dtype.newbyteorder("="), copy=False)


# ------------------------------------------------------------------------------------------------
# quantisation config
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantConfig:
    """Quantisation settings of a checkpoint, normalised from any of the accepted files.

    Attributes:
        quant_method: ``"gptq"``, ``"exl2"`` or ``"awq"``.
        source: the file the settings came from (``config.json`` means its ``quantization_config``).
        bits: GPTQ / AWQ bit width (int) or the EXL2 target bits per weight (float, informational); or None.
        group_size: GPTQ / AWQ rows per group, -1 for one group, None when the config does not say
            (then it is inferred per layer from the tensor shapes).
        desc_act: GPTQ act-order flag. sym: symmetric flag (True when missing; AWQ: ``not zero_point``).
        checkpoint_format: ``"gptq"`` (v1 zeros, stored z-1) or ``"gptq_v2"``; None for AWQ.
        dynamic: GPTQModel per-module overrides ``{"+:regex" | "regex": {...}, "-:regex": {}}``.
        head_bits: EXL2 ``head_bits`` (informational).
        hints: loading hints found in the file (``use_exllama``...), accepted and ignored.
        raw: the parsed JSON object.
        version: AWQ packing version, lower case (``"gemm"``, the only one supported); None otherwise.
        modules_to_not_convert: AWQ modules kept dense (a module is kept when one entry is a substring
            of its name, as transformers matches them); ``()`` otherwise.
    """

    quant_method: str
    source: Path
    bits: object = None
    group_size: object = None
    desc_act: bool = False
    sym: bool = True
    checkpoint_format: str = "gptq"
    dynamic: dict = field(default_factory=dict)
    head_bits: object = None
    hints: dict = field(default_factory=dict)
    raw: dict = field(default_factory=dict)
    version: str | None = None
    modules_to_not_convert: tuple = ()

    def keeps_dense(self, name) -> bool:
        """True when ``modules_to_not_convert`` keeps module ``name`` unquantized."""
        return any(key in name for key in self.modules_to_not_convert)

    def for_layer(self, name):
        """(bits, group_size, desc_act, sym) for module ``name`` after ``dynamic`` overrides.

        Returns None when a ``-:`` rule excludes the module from quantisation.
        """
        bits, gs, act, sym = self.bits, self.group_size, self.desc_act, self.sym
        for pattern, override in self.dynamic.items():
            negative = pattern.startswith("-:")
            regex = pattern[2:] if pattern[:2] in ("+:", "-:") else pattern
            if re.match(regex, name):
                if negative:
                    return None
                bits = override.get("bits", bits)
                gs = override.get("group_size", gs)
                act = override.get("desc_act", act)
                sym = override.get("sym", sym)
        return bits, gs, act, sym


def _is_int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _quantizers(raw):
    """The ``meta.quantizer`` entries of a quantization config as ``[(tool, version tuple)]``."""
    meta = raw.get("meta") if isinstance(raw, dict) else None
    entries = meta.get("quantizer") if isinstance(meta, dict) else None
    if isinstance(entries, str):
        entries = [entries]
    if not isinstance(entries, list):
        return []
    found = []
    for entry in entries:
        if not isinstance(entry, str):
            continue
        tool, _, version = entry.partition(":")
        numbers = tuple(int(m) for m in re.findall(r"\d+", version.split("+")[0])[:3])
        found.append((tool.strip().lower(), numbers))
    return found


def v1_zero_encoding(quant_config):
    """How the producer of a v1 GPTQ checkpoint applied the stored ``z - 1``, from ``meta.quantizer``.

    ``"word"`` for GPTQModel 0.9.0 or later (it subtracts a per-field constant from each packed word, see
    :mod:`cupyq.formats.gptq`), ``"field"`` for cupyq's own writer, None when the config does not name a
    producer whose encoding is known (such files are read per field; :func:`zero_point_warnings` says where
    that reading is uncertain). quant_config: a :class:`QuantConfig` or None.
    """
    if quant_config is None or quant_config.quant_method != "gptq":
        return None
    tools = _quantizers(quant_config.raw)
    if any(tool == "gptqmodel" and version >= (0, 9, 0) for tool, version in tools):
        return "word"
    if any(tool == "cupyq" for tool, _ in tools):
        return "field"
    return None


def _parse_gptq_config(d, source) -> QuantConfig:
    def bad(key, problem):
        _fail(source, f"quantization config key '{key}': {problem}")

    fmt = d.get("format")
    alias = d.get("checkpoint_format")
    if fmt is not None and alias is not None and str(fmt).lower() != str(alias).lower():
        bad("format", f"'format' is {fmt!r} but 'checkpoint_format' is {alias!r}")
    fmt = fmt if fmt is not None else alias
    fmt = "gptq" if fmt is None else fmt
    if not isinstance(fmt, str) or fmt.lower() not in _GPTQ_FORMATS:
        bad("format", f"expected one of {_GPTQ_FORMATS}, got {fmt!r} (marlin/gptq_p checkpoints are not supported)")
    if "bits" not in d:
        bad("bits", "missing")
    bits = d["bits"]
    if not _is_int(bits) or bits not in _GPTQ_BITS:
        bad("bits", f"expected one of {_GPTQ_BITS}, got {bits!r}")
    gs = d.get("group_size")
    if gs is not None and (not _is_int(gs) or not (gs == -1 or gs > 0)):
        bad("group_size", f"expected -1 or a positive integer, got {gs!r}")
    desc_act = d.get("desc_act", False)
    if not isinstance(desc_act, bool):
        bad("desc_act", f"expected true or false, got {desc_act!r}")
    sym = d.get("sym", True)
    if not isinstance(sym, bool):
        bad("sym", f"expected true or false, got {sym!r}")
    dynamic = d.get("dynamic") or {}
    if not isinstance(dynamic, dict) or not all(isinstance(v, dict) for v in dynamic.values()):
        bad("dynamic", f"expected an object of pattern -> overrides, got {dynamic!r}")
    for pattern, override in dynamic.items():
        try:
            re.compile(pattern[2:] if pattern[:2] in ("+:", "-:") else pattern)
        except re.error as exc:
            bad("dynamic", f"pattern {pattern!r} is not a valid regular expression ({exc})")
        if "bits" in override and (not _is_int(override["bits"]) or override["bits"] not in _GPTQ_BITS):
            bad("dynamic", f"pattern {pattern!r}: bits must be one of {_GPTQ_BITS}, got {override['bits']!r}")
    hints = {k: d[k] for k in _IGNORED_HINTS if k in d}
    return QuantConfig(
        "gptq",
        Path(source),
        bits=int(bits),
        group_size=None if gs is None else int(gs),
        desc_act=desc_act,
        sym=sym,
        checkpoint_format=fmt.lower(),
        dynamic=dict(dynamic),
        hints=hints,
        raw=dict(d),
    )


def _parse_awq_config(d, source) -> QuantConfig:
    """transformers / GPTQModel (``bits``, ``group_size``, ``zero_point``, ``version`` or ``format``) and
    AutoAWQ ``quant_config.json`` (``w_bit``, ``q_group_size``, ``zero_point``, ``version``) settings."""

    def bad(key, problem):
        _fail(source, f"quantization config key '{key}': {problem}")

    def one_of(*keys):
        present = [k for k in keys if d.get(k) is not None]
        values = {json.dumps(d[k]).lower() for k in present}
        if len(values) > 1:
            bad(present[0], " but ".join(f"'{k}' is {d[k]!r}" for k in present))
        return (present[0], d[present[0]]) if present else (keys[0], None)

    key, version = one_of("version", "format")
    version = "gemm" if version is None else version
    if not isinstance(version, str) or version.lower() not in _AWQ_VERSIONS:
        bad(key, f"AWQ version {version!r} is not supported; only GEMM-packed AWQ checkpoints ('gemm') are "
                 "(GEMV, GEMV_FAST and the other versions store different layouts)")
    key, bits = one_of("bits", "w_bit")
    if bits is None:
        bad("bits", "missing (an AWQ config gives 'bits' or 'w_bit')")
    if not _is_int(bits) or bits != 4:
        bad(key, f"AWQ GEMM checkpoints are 4-bit, got {bits!r}")
    key, gs = one_of("group_size", "q_group_size")
    if gs is not None and (not _is_int(gs) or not (gs == -1 or gs > 0)):
        bad(key, f"expected -1 or a positive integer, got {gs!r}")
    # Informational: the zero points are read from each layer's qzeros whatever this says.
    zero_point = d.get("zero_point", True)
    if not isinstance(zero_point, bool):
        bad("zero_point", f"expected true or false, got {zero_point!r}")
    keep = d.get("modules_to_not_convert") or []
    if not isinstance(keep, list) or not all(isinstance(k, str) and k for k in keep):
        bad("modules_to_not_convert", f"expected a list of module names or null, got {keep!r}")
    return QuantConfig(
        "awq",
        Path(source),
        bits=4,
        group_size=None if gs is None else int(gs),
        sym=not zero_point,
        checkpoint_format=None,
        hints={k: d[k] for k in _AWQ_HINTS if k in d},
        raw=dict(d),
        version=version.lower(),
        modules_to_not_convert=tuple(keep),
    )


def _parse_quant_config(d, source) -> QuantConfig:
    if not isinstance(d, dict):
        _fail(source, f"quantization config must be a JSON object, got {type(d).__name__}")
    method = d.get("quant_method", d.get("method"))
    method = method.lower() if isinstance(method, str) else method
    if method == "awq" or (method is None and ("zero_point" in d or "w_bit" in d)):
        return _parse_awq_config(d, source)
    if method == "exl2":
        bits = d.get("bits")
        if bits is not None and (isinstance(bits, bool) or not isinstance(bits, (int, float))):
            _fail(source, f"quantization config key 'bits': expected a number (bits per weight), got {bits!r}")
        return QuantConfig("exl2", Path(source), bits=bits, head_bits=d.get("head_bits"), raw=dict(d))
    if method not in (None, "gptq"):
        _fail(source, f"quantization config key 'quant_method': expected 'gptq', 'exl2' or 'awq', got {method!r}")
    return _parse_gptq_config(d, source)


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        _fail(path, f"cannot parse JSON ({exc})")


def read_quant_config(directory):
    """The quantisation config of a checkpoint directory, or None when it has none.

    Looks in ``quantize_config.json``, then ``quant_config.json``, then ``config.json`` key
    ``quantization_config`` (the order AutoGPTQ, GPTQModel and TGI use). Accepts ``format`` or its
    alias ``checkpoint_format``; reads and ignores the loading hints ``use_exllama``,
    ``exllama_config``, ``disable_exllama``, ``use_cuda_fp16``, ``max_input_length`` and ``backend``.
    AWQ settings come from the same places (AutoAWQ writes ``quant_config.json`` with ``w_bit`` /
    ``q_group_size``, transformers ``quantization_config`` with ``quant_method: awq``).
    Raises :class:`CheckpointError` for unparsable JSON, bad values or unsupported methods (Marlin, AWQ
    versions other than GEMM).
    """
    directory = Path(directory)
    for name in QUANT_CONFIG_FILES:
        path = directory / name
        if not path.is_file():
            continue
        d = _read_json(path)
        if name == "config.json":
            if not isinstance(d, dict):
                _fail(path, "config.json must be a JSON object")
            if d.get("quantization_config") is None:
                continue
            d = d["quantization_config"]
        return _parse_quant_config(d, path)
    return None


# ------------------------------------------------------------------------------------------------
# layer description
# ------------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------------
# the checkpoint
# ------------------------------------------------------------------------------------------------


def _natural_key(name):
    """Sort key putting ``layers.2`` before ``layers.10``."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", name)]


def _split(name):
    prefix, _, suffix = name.rpartition(".")
    return prefix, suffix


class Checkpoint:
    """A lazily read checkpoint directory (see the module docstring for the tensor conventions).

    Attributes:
        path: the directory (or the single file's directory).
        files: the ``.safetensors`` files, in order.
        config: ``config.json`` as a dict (``{}`` when absent).
        quant_config: :class:`QuantConfig` or None.
        tensors: ``{tensor name: TensorRecord}`` for every tensor of every file.
        layers: ``{layer name: LayerInfo}``, quantized layers and plain 2-D weights, sorted by name (``layers.2`` before ``layers.10``).
    """

    def __init__(self, path, files, tensors, config, quant_config):
        self.path = Path(path)
        self.files = tuple(files)
        self.tensors = dict(tensors)
        self.config = config
        self.quant_config = quant_config
        self._details = {}
        self.layers = self._detect_layers()

    def __repr__(self):
        counts = {}
        for info in self.layers.values():
            counts[info.format] = counts.get(info.format, 0) + 1
        summary = ", ".join(f"{v} {k}" for k, v in counts.items()) or "no layers"
        return f"Checkpoint({str(self.path)!r}, {len(self.files)} file(s), {summary})"

    # -- detection ------------------------------------------------------------------------------

    def _tgi_gptq_params(self):
        # TGI's own quantizer stores scalar tensors instead of a config file.
        if "gptq_bits" not in self.tensors:
            return None
        bits = self._scalar_int("gptq_bits")
        gs = self._scalar_int("gptq_groupsize") if "gptq_groupsize" in self.tensors else None
        if bits not in _GPTQ_BITS:
            rec = self.tensors["gptq_bits"]
            _fail(rec.file, f"expected one of {_GPTQ_BITS}, got {bits}", rec.name)
        if gs is not None and not (gs == -1 or gs > 0):
            rec = self.tensors["gptq_groupsize"]
            _fail(rec.file, f"expected -1 or a positive group size, got {gs}", rec.name)
        return {"bits": bits, "group_size": gs}

    def _scalar_int(self, name):
        rec = self.tensors[name]
        if rec.dtype not in ("I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64") or math.prod(rec.shape) != 1:
            _fail(rec.file, f"expected one integer (a scalar integer tensor), got {rec.dtype} {list(rec.shape)}", name)
        return int(self.load_tensor(name).reshape(-1)[0])

    def _detect_layers(self):
        gptq, exl2 = {}, {}
        for name, rec in self.tensors.items():
            prefix, suffix = _split(name)
            if suffix == "qweight":
                gptq[prefix] = {}
            elif suffix == "q_weight":
                exl2[prefix] = {}
        for prefix in gptq.keys() & exl2.keys():
            rec = self.tensors[prefix + ".qweight"]
            _fail(rec.file, f"layer '{prefix}' has both GPTQ (qweight) and EXL2 (q_weight) tensors", rec.name)
        dense = {}
        for name, rec in self.tensors.items():
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
            if prefix + ".bias" in self.tensors:
                parts["bias"] = self.tensors[prefix + ".bias"]
        awq = self.quant_config is not None and self.quant_config.quant_method == "awq"
        tgi = self._tgi_gptq_params() if gptq and not awq else None
        layers = {}
        for prefix in self._ordered(gptq, exl2, dense):
            if prefix in gptq and awq:
                layers[prefix] = _awq_layer(prefix, gptq[prefix], self.quant_config)
            elif prefix in gptq:
                layers[prefix] = _gptq_layer(prefix, gptq[prefix], self.quant_config, tgi)
            elif prefix in exl2:
                layers[prefix] = _exl2_layer(prefix, exl2[prefix])
            else:
                layers[prefix] = _dense_layer(prefix, dense[prefix])
        return layers

    def _ordered(self, *groups):
        names = {p for g in groups for p in g}
        return sorted(names, key=_natural_key)

    # -- queries --------------------------------------------------------------------------------

    @property
    def quantized_layers(self) -> list:
        """Names of the GPTQ, EXL2 and AWQ layers."""
        return [n for n, info in self.layers.items() if info.quantized]

    def layer_tensor_names(self) -> set:
        """Names of every tensor that belongs to a quantized layer."""
        return {t for n in self.quantized_layers for t in self.layers[n].tensors}

    def extra_tensor_names(self) -> list:
        """Names of the tensors that are not part of a quantized layer (embeddings, norms, fp16 heads...)."""
        used = self.layer_tensor_names()
        return [t for t in self.tensors if t not in used]

    def _layer(self, name) -> LayerInfo:
        try:
            return self.layers[name]
        except KeyError:
            raise KeyError(f"{self.path}: no layer named {name!r} (the checkpoint has {len(self.layers)} layers)") from None

    def load_tensor(self, name) -> np.ndarray:
        """Read one tensor into a new NumPy array (bfloat16 is returned as float32)."""
        try:
            rec = self.tensors[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None
        return _read_record(rec)

    def layer_info(self, name) -> LayerInfo:
        """:class:`LayerInfo` of ``name``; for EXL2 this also reads q_groups and q_invperm (small) to
        fill in the bit mix, group size and whether rows are permuted."""
        info = self._layer(name)
        if info.format != "exl2":
            return info
        if name not in self._details:
            from cupyq.formats import exl2 as fx

            q_groups = self.load_tensor(name + ".q_groups")
            invperm = _unsigned_invperm(self.load_tensor(name + ".q_invperm"))
            qrows = self.tensors[name + ".q_weight"].shape[0]
            groups = self._wrap(name + ".q_groups", lambda: fx.parse_q_groups(q_groups, qrows, info.in_features))
            mix = {}
            for g in groups:
                mix[g.bits] = mix.get(g.bits, 0) + g.rows
            full_sizes = {g.rows for g in groups[:-1]} or {groups[-1].rows}
            self._details[name] = replace(
                info,
                bits=tuple(sorted(mix, reverse=True)),
                bit_mix=tuple(sorted(mix.items(), reverse=True)),
                group_size=full_sizes.pop() if len(full_sizes) == 1 else None,
                act_order=not np.array_equal(invperm, np.arange(invperm.shape[0])),
            )
        return self._details[name]

    def _wrap(self, tensor, fn):
        """Run a format check, turning its ValueError/TypeError into a CheckpointError naming the file."""
        try:
            return fn()
        except (ValueError, TypeError) as exc:
            if isinstance(exc, CheckpointError):
                raise
            part = str(exc).split(":", 1)[0]
            named = tensor.rsplit(".", 1)[0] + "." + part
            if named in self.tensors:  # the check names the tensor it rejects
                tensor = named
            rec = self.tensors.get(tensor)
            _fail(rec.file if rec else self.path, str(exc), tensor)

    def load_layer(self, name) -> dict:
        """Read and validate the tensors of one layer; returns a dict of new NumPy arrays.

        GPTQ: ``qweight`` int32 ``[K*bits/32, N]``, ``qzeros`` int32 ``[G, N*bits/32]`` (as stored, in
        the layer's checkpoint_format), ``scales`` float16 ``[G, N]`` (bf16/fp32 cast), ``g_idx`` int32
        ``[K]`` (``k // group_size`` when the file has none), optional ``bias`` float16 ``[N]``.
        EXL2: ``q_weight`` int32 ``[Q, N_pad]``, ``q_invperm`` int32 ``[K]``, ``q_perm`` int32 ``[K]``
        (rebuilt as argsort of q_invperm), ``q_scale`` int32 ``[G, N_pad/8]``, ``q_scale_max`` float16
        ``[G]``, ``q_groups`` int16 ``[2G]``, optional ``bias`` float16 ``[N_pad]`` (zero-padded).
        AWQ: ``qweight`` int32 ``[K, N/8]``, ``qzeros`` int32 ``[G, N/8]`` (as stored), ``scales`` float16
        ``[G, N]`` (bf16/fp32 cast), optional ``bias`` float16 ``[N]``.
        Plain: ``weight`` ``[out, in]`` in its stored dtype (bf16 as float32), optional ``bias``.
        Raises :class:`CheckpointError` naming the file and tensor when the tensors are inconsistent.
        """
        info = self._layer(name)
        raw = {_split(t)[1]: self.load_tensor(t) for t in info.tensors}
        if info.format == "gptq":
            return self._load_gptq(info, raw)
        if info.format == "exl2":
            return self._load_exl2(info, raw)
        if info.format == "awq":
            return self._load_awq(info, raw)
        return raw

    def _load_awq(self, info, raw):
        from cupyq.formats import awq as fa

        out = {"qweight": raw["qweight"], "qzeros": raw["qzeros"], "scales": raw["scales"].astype(np.float16, copy=False)}
        if "bias" in raw:
            out["bias"] = raw["bias"].astype(np.float16, copy=False)
        self._wrap(info.name + ".qweight", lambda: fa.check_awq(out["qweight"], out["qzeros"], out["scales"], info.group_size))
        return out

    def _load_gptq(self, info, raw):
        from cupyq.formats import gptq as fg

        name = info.name
        out = {
            "qweight": raw["qweight"],
            "qzeros": raw["qzeros"],
            "scales": raw["scales"].astype(np.float16, copy=False),
        }
        if "g_idx" in raw:
            out["g_idx"] = raw["g_idx"].astype(np.int32, copy=False)
        else:
            out["g_idx"] = fg.default_g_idx(info.in_features, info.group_size, xp=np)
        if "bias" in raw:
            out["bias"] = raw["bias"].astype(np.float16, copy=False)
        bits = info.bits[0]
        tensor = name + (".g_idx" if "g_idx" in raw else ".qweight")
        self._wrap(tensor, lambda: fg.check_gptq(out["qweight"], out["qzeros"], out["scales"], out["g_idx"], bits))
        return out

    def _load_exl2(self, info, raw):
        from cupyq.formats import exl2 as fx

        name = info.name
        out = {
            "q_weight": raw["q_weight"],
            "q_invperm": _unsigned_invperm(raw["q_invperm"]),
            "q_scale": raw["q_scale"],
            "q_scale_max": raw["q_scale_max"].astype(np.float16, copy=False),
            "q_groups": raw["q_groups"].astype(np.int16, copy=False),
        }
        out["q_perm"] = self._wrap(name + ".q_invperm", lambda: fx.perm_from_invperm(out["q_invperm"], xp=np))
        if "q_perm" in raw and not np.array_equal(raw["q_perm"].astype(np.int64), out["q_perm"]):
            rec = self.tensors[name + ".q_perm"]
            _fail(rec.file, "stored q_perm is not the inverse of q_invperm", rec.name)
        self._wrap(
            name + ".q_groups",
            lambda: fx.check_exl2(out["q_weight"], out["q_invperm"], out["q_scale"], out["q_scale_max"], out["q_groups"]),
        )
        if "bias" in raw:
            # An unpadded bias gets zeros for the padding columns, which dequantise to zero too.
            bias = np.zeros(info.out_features, dtype=np.float16)
            bias[: raw["bias"].shape[0]] = raw["bias"]
            out["bias"] = bias
        return out

    def qmatrix(self, name, device=None):
        """Build the :class:`cupyq.QMatrix` of a quantized layer.

        ``device=None`` keeps NumPy tensors, i.e. a CPU matrix (the float32 reference path); any other
        value is passed to ``QMatrix.from_gptq`` / ``from_exl2`` / ``from_awq`` (e.g. a CUDA device id).
        """
        from cupyq.qmatrix import QMatrix

        info = self._layer(name)
        if not info.quantized:
            raise CheckpointError(f"{self.path}: layer '{name}' is a plain {info.format} weight, not a quantized layer")
        t = self.load_layer(name)
        if info.format == "gptq":
            return QMatrix.from_gptq(
                t["qweight"],
                t["qzeros"],
                t["scales"],
                t["g_idx"],
                t.get("bias"),
                bits=info.bits[0],
                checkpoint_format=info.checkpoint_format,
                v1_encoding=info.v1_encoding or "field",
                group_size=info.group_size,
                device=device,
            )
        if info.format == "awq":
            return QMatrix.from_awq(
                t["qweight"], t["qzeros"], t["scales"], t.get("bias"), group_size=info.group_size, device=device
            )
        return QMatrix.from_exl2(
            t["q_weight"], t["q_invperm"], t["q_scale"], t["q_scale_max"], t["q_groups"], t.get("bias"), device=device
        )

    def dequantize(self, name) -> np.ndarray:
        """float32 ``[K, N]`` weight of a layer from the NumPy reference (plain weights transposed)."""
        from cupyq import reference

        info = self._layer(name)
        t = self.load_layer(name)
        if info.format == "gptq":
            return reference.dequantize_gptq(
                t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits=info.bits[0],
                checkpoint_format=info.checkpoint_format, v1_encoding=info.v1_encoding or "field",
                group_size=info.group_size,
            )
        if info.format == "exl2":
            return reference.dequantize_exl2(t["q_weight"], t["q_invperm"], t["q_scale"], t["q_scale_max"], t["q_groups"])
        if info.format == "awq":
            return reference.dequantize_awq(t["qweight"], t["qzeros"], t["scales"], group_size=info.group_size)
        return np.ascontiguousarray(t["weight"].astype(np.float32).T)


def _unsigned_invperm(q_invperm):
    """int32 copy of a stored q_invperm; 16-bit values are read as unsigned (K up to 65535)."""
    if q_invperm.dtype == np.int16:
        q_invperm = q_invperm.view(np.uint16)
    return q_invperm.astype(np.int32)


def zero_point_warnings(ckpt) -> dict:
    """Warnings about v1 zero points whose decoding is uncertain: ``{layer name: [message, ...]}``.

    A v1 GPTQ layer is listed when the config does not name a producer whose encoding is known
    (:func:`v1_zero_encoding`) and its ``qzeros`` hold an all-ones field (a true zero of 0): per-field and
    word-wise writers store such layers differently, and cupyq reads them per field. Reads only the qzeros
    of those layers. ckpt: an open :class:`Checkpoint`.
    """
    from cupyq.formats import gptq as fg

    found = {}
    for name, info in ckpt.layers.items():
        if info.format != "gptq" or info.v1_encoding_known:
            continue
        rec = ckpt.tensors[name + ".qzeros"]
        count = fg.ambiguous_v1_zeros(ckpt.load_tensor(rec.name), info.bits[0])
        if count:
            found[name] = [
                f"{rec.file}: tensor '{rec.name}': {count} v1 zero point(s) of 0 (all-ones fields), and the "
                "quantization config's meta.quantizer does not name the producer; read per field, which is wrong "
                "for files written by GPTQModel (its v1 zeros borrow from the neighbouring field); "
                "re-save the checkpoint as gptq_v2 or add meta.quantizer to the config"
            ]
    return found


def _safetensors_files(directory):
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        index = _read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            _fail(index_path, "expected an object with a non-empty 'weight_map' of tensor -> file")
        files = []
        for tensor, fname in weight_map.items():
            if not isinstance(fname, str) or Path(fname).name != fname:
                _fail(index_path, f"weight_map entry is not a plain file name: {fname!r}", tensor)
            if fname not in files:
                files.append(fname)
        return [directory / f for f in files], weight_map
    files = sorted(directory.glob("*.safetensors"))
    return files, None


def open_checkpoint(path) -> Checkpoint:
    """Open a GPTQ / EXL2 / AWQ / mixed checkpoint directory (or a single ``.safetensors`` file) lazily.

    Reads the config files and every safetensors header; no tensor data (except the scalar
    ``gptq_bits``/``gptq_groupsize`` of TGI-made checkpoints). With ``model.safetensors.index.json``
    the files it names are used and every entry is checked against their headers; without it, every
    ``*.safetensors`` in the directory. Raises :class:`CheckpointError` (naming file, tensor and
    problem) for malformed or inconsistent checkpoints, FileNotFoundError for a missing path.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint directory or file")
    if path.is_file():
        if path.suffix != ".safetensors":
            _fail(path, "expected a checkpoint directory or a .safetensors file")
        directory, files, weight_map = path.parent, [path], None
    else:
        directory = path
        files, weight_map = _safetensors_files(directory)
        if not files:
            _fail(directory, "no .safetensors files in the checkpoint directory")
    tensors = {}
    for f in files:
        if not f.is_file():
            if weight_map is None:
                what = "a directory" if f.is_dir() else "a broken link" if f.is_symlink() else "not a regular file"
                _fail(f, f"is {what}, not a safetensors file")
            _fail(directory / INDEX_FILE, f"names file '{f.name}', which does not exist")
        for name, rec in read_safetensors_header(f).items():
            if weight_map is not None and weight_map.get(name) != f.name:
                continue  # the index decides which copy of a tensor is used
            if name in tensors:
                _fail(f, f"tensor also stored in '{tensors[name].file.name}' (duplicate name)", name)
            tensors[name] = rec
    if weight_map is not None:
        for name, fname in weight_map.items():
            if name not in tensors:
                _fail(directory / INDEX_FILE, f"index says the tensor is in '{fname}', but that file has no such tensor", name)
    config = {}
    if (directory / "config.json").is_file():
        config = _read_json(directory / "config.json")
        if not isinstance(config, dict):
            _fail(directory / "config.json", "expected a JSON object")
    return Checkpoint(directory, files, tensors, config, read_quant_config(directory))


# ------------------------------------------------------------------------------------------------
# saving
# ------------------------------------------------------------------------------------------------


def _to_numpy(a, name):
    module = type(a).__module__.split(".")[0]
    if module == "torch":
        t = a.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            raise TypeError(f"{name}: bfloat16 cannot be saved through NumPy; convert it to float16 or float32 first")
        return t.numpy()
    if module == "cupy":
        return a.get()
    a = np.asarray(a)
    if a.dtype not in _NP_TO_ST:
        raise TypeError(f"{name}: dtype {a.dtype} cannot be stored in safetensors")
    return a


def _shards(tensors, shard_bytes):
    """Split {name: array} into lists of names, each at most shard_bytes (a larger tensor goes alone)."""
    shards, current, size = [], [], 0
    for name, arr in tensors.items():
        if current and size + arr.nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += arr.nbytes
    if current:
        shards.append(current)
    return shards


def _write_safetensors(path, tensors):
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata={"format": "pt"})


def _write_directory(directory, tensors, configs, shard_bytes, overwrite):
    """Write the files into a temporary directory beside ``directory``, then move them into place.

    Every argument is checked and every file written before anything in ``directory`` is replaced, so a
    bad argument or a failed write leaves an existing checkpoint as it was.
    """
    import os
    import shutil
    import uuid

    directory = Path(directory)
    if shard_bytes is not None and (not _is_int(shard_bytes) or shard_bytes <= 0):
        raise ValueError(f"shard_bytes: expected a positive integer, got {shard_bytes!r}")
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory}: exists and is not a directory")
    stale = sorted(directory.glob("*.safetensors")) + sorted(directory.glob(INDEX_FILE)) if directory.is_dir() else []
    if stale and not overwrite:
        raise FileExistsError(f"{directory}: already holds {stale[0].name}; pass overwrite=True to replace")
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.parent / f".{directory.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial"
    staging.mkdir()  # default permissions, as the directory itself gets when it is new
    try:
        if shard_bytes is None:
            _write_safetensors(staging / "model.safetensors", tensors)
        else:
            shards = _shards(tensors, int(shard_bytes))
            weight_map = {}
            for i, names in enumerate(shards, 1):
                fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                _write_safetensors(staging / fname, {n: tensors[n] for n in names})
                weight_map.update({n: fname for n in names})
            index = {"metadata": {"total_size": int(sum(a.nbytes for a in tensors.values()))}, "weight_map": weight_map}
            (staging / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        for fname, content in configs.items():
            (staging / fname).write_text(json.dumps(content, indent=2) + "\n")
        if not directory.exists():
            staging.rename(directory)
            return directory
        for p in stale:
            p.unlink()
        for p in sorted(staging.iterdir()):
            p.replace(directory / p.name)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return directory


def _collect(layers, parts, extra_tensors, check):
    if not isinstance(layers, Mapping):
        raise TypeError(f"layers: expected a dict of layer name -> tensors, got {type(layers).__name__}")
    tensors = {}
    for lname, lt in layers.items():
        if not isinstance(lt, Mapping):
            raise TypeError(f"layers[{lname!r}]: expected a dict of tensors, got {type(lt).__name__}")
        unknown = set(lt) - set(parts)
        if unknown:
            raise ValueError(f"layers[{lname!r}]: unexpected tensors {sorted(unknown)}; expected some of {list(parts)}")
        arrays = {k: _to_numpy(v, f"{lname}.{k}") for k, v in lt.items()}
        try:
            check(arrays)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"layers[{lname!r}]: {exc}") from exc
        for k in parts:
            if k in arrays:
                tensors[f"{lname}.{k}"] = arrays[k]
    for name, value in (extra_tensors or {}).items():
        if name in tensors:
            raise ValueError(f"extra_tensors: {name!r} is also a quantized layer tensor")
        tensors[name] = _to_numpy(value, name)
    if not tensors:
        raise ValueError("layers: nothing to save")
    return tensors


def _cupyq_version():
    from cupyq import __version__

    return __version__


def save_gptq(
    directory,
    layers,
    *,
    bits,
    group_size,
    desc_act,
    sym,
    checkpoint_format="gptq",
    extra_tensors=None,
    config=None,
    shard_bytes=None,
    overwrite=False,
    write_format=None,
):
    """Write a Hugging Face GPTQ checkpoint directory.

    Args:
        directory: created if missing; must hold no ``.safetensors`` unless ``overwrite``.
        layers: ``{module name: quantize_gptq output}`` (``qweight``, ``qzeros``, ``scales``, ``g_idx``,
            optional ``bias``; NumPy, CuPy or torch), stored as ``<name>.qweight`` etc.
        bits, group_size, desc_act, sym, checkpoint_format: the settings the layers were made with
            (each layer is checked against ``bits`` and ``group_size``; ``checkpoint_format`` is the
            format of the given ``qzeros``, v1 read per field as :func:`cupyq.quantize_gptq` writes it).
        write_format: the zero-point format of the files: ``"gptq"`` (v1) or ``"gptq_v2"``. None writes
            asymmetric layers (``sym=False``) as ``"gptq_v2"``, which every reader decodes the same way (v1
            zeros of 0 are stored differently by different tools), and symmetric ones as ``checkpoint_format``.
            The qzeros are converted when it differs from ``checkpoint_format``.
        extra_tensors: other tensors to store by full name (``lm_head.weight``, embeddings, norms...).
        config: base ``config.json`` content (e.g. the model config); ``quantization_config`` is added.
        shard_bytes: split into ``model-0000i-of-0000n.safetensors`` of at most this many bytes each
            plus ``model.safetensors.index.json``; None writes one ``model.safetensors``.

    Writes ``config.json`` (with ``quantization_config``) and ``quantize_config.json``.
    Returns the directory as a Path.
    """
    from cupyq.formats import gptq as fg

    if not _is_int(bits) or bits not in _GPTQ_BITS:
        raise ValueError(f"bits: expected one of {_GPTQ_BITS}, got {bits!r}")
    if not _is_int(group_size) or not (group_size == -1 or group_size > 0):
        raise ValueError(f"group_size: expected -1 or a positive integer, got {group_size!r}")
    if checkpoint_format not in _GPTQ_FORMATS:
        raise ValueError(f"checkpoint_format: expected one of {_GPTQ_FORMATS}, got {checkpoint_format!r}")
    if write_format is None:
        write_format = "gptq_v2" if not sym else checkpoint_format
    if write_format not in _GPTQ_FORMATS:
        raise ValueError(f"write_format: expected one of {_GPTQ_FORMATS} or None, got {write_format!r}")

    def check(t):
        for part in ("qweight", "qzeros", "scales"):
            if part not in t:
                raise ValueError(f"missing tensor '{part}'")
        layout = fg.check_gptq(t["qweight"], t["qzeros"], t["scales"], t.get("g_idx"), bits)
        groups = 1 if group_size == -1 else -(-layout.in_features // group_size)
        if layout.groups != groups:
            raise ValueError(f"scales: {layout.groups} groups, but group_size {group_size} over {layout.in_features} rows needs {groups}")

    tensors = _collect(layers, _GPTQ_PARTS, extra_tensors, check)
    if write_format != checkpoint_format:
        for lname in layers:
            key = f"{lname}.qzeros"
            n = tensors[f"{lname}.scales"].shape[1]
            zeros = fg.unpack_qzeros(tensors[key], bits, n, checkpoint_format=checkpoint_format)
            tensors[key] = fg.pack_qzeros(zeros, bits, checkpoint_format=write_format)
    qcfg = {
        "quant_method": "gptq",
        "bits": int(bits),
        "group_size": int(group_size),
        "desc_act": bool(desc_act),
        "sym": bool(sym),
        "format": write_format,
        "checkpoint_format": write_format,
        "pack_dtype": "int32",
        "meta": {"quantizer": [f"cupyq:{_cupyq_version()}"]},
    }
    cfg = dict(config or {})
    cfg["quantization_config"] = qcfg
    return _write_directory(directory, tensors, {"config.json": cfg, "quantize_config.json": qcfg}, shard_bytes, overwrite)


def save_exl2(directory, layers, *, extra_tensors=None, config=None, bits=None, shard_bytes=None, overwrite=False):
    """Write an EXL2 checkpoint directory.

    Args:
        directory: created if missing; must hold no ``.safetensors`` unless ``overwrite``.
        layers: ``{module name: quantize_exl2 output}`` (``q_weight``, ``q_invperm``, ``q_scale``,
            ``q_scale_max``, ``q_groups``, optional ``bias``; a ``q_perm`` entry is accepted and not
            written, as converters do not write it).
        extra_tensors, config, shard_bytes, overwrite: as in :func:`save_gptq`.
        bits: target bits per weight recorded in ``quantization_config`` (informational); None
            records the measured average of the layers' q_weight.

    Writes ``config.json`` with ``quantization_config = {"quant_method": "exl2", "version", "bits",
    "head_bits"}``. Returns the directory as a Path.
    """
    from cupyq.formats import exl2 as fx

    def check(t):
        for part in ("q_weight", "q_invperm", "q_scale", "q_scale_max", "q_groups"):
            if part not in t:
                raise ValueError(f"missing tensor '{part}'")
        fx.check_exl2(t["q_weight"], t["q_invperm"], t["q_scale"], t["q_scale_max"], t["q_groups"])

    stored = tuple(p for p in _EXL2_PARTS if p != "q_perm")
    tensors = _collect(layers, stored + ("q_perm",), extra_tensors, check)
    tensors = {k: v for k, v in tensors.items() if not (k.endswith(".q_perm") and k[: -len(".q_perm")] in layers)}
    if bits is None:
        packed = sum(np.asarray(layers[n]["q_weight"]).shape[0] * 32 for n in layers)
        rows = sum(np.asarray(layers[n]["q_invperm"]).shape[0] for n in layers)
        bits = round(packed / rows, 3)
    head = "lm_head"
    if head in layers:
        head_bits = round(np.asarray(layers[head]["q_weight"]).shape[0] * 32 / np.asarray(layers[head]["q_invperm"]).shape[0], 3)
    elif head + ".weight" in tensors:
        head_bits = 8 * tensors[head + ".weight"].dtype.itemsize
    else:
        head_bits = None
    qcfg = {"quant_method": "exl2", "version": f"cupyq {_cupyq_version()}", "bits": float(bits)}
    if head_bits is not None:
        qcfg["head_bits"] = head_bits
    cfg = dict(config or {})
    cfg["quantization_config"] = qcfg
    return _write_directory(directory, tensors, {"config.json": cfg}, shard_bytes, overwrite)


def save_awq(
    directory,
    layers,
    *,
    group_size,
    modules_to_not_convert=None,
    extra_tensors=None,
    config=None,
    shard_bytes=None,
    overwrite=False,
):
    """Write a Hugging Face AWQ (GEMM) checkpoint directory.

    Args:
        directory: created if missing; must hold no ``.safetensors`` unless ``overwrite``.
        layers: ``{module name: quantize_awq output}`` (``qweight`` int32 ``[K, N/8]``, ``qzeros`` int32
            ``[G, N/8]``, ``scales`` ``[G, N]``, optional ``bias``; NumPy, CuPy or torch), stored as
            ``<name>.qweight`` etc.; each layer is checked against ``group_size``.
        group_size: rows per group the layers were made with (-1: one group).
        modules_to_not_convert: names (or name parts) of modules kept dense, recorded in the config;
            no quantized layer may match one.
        extra_tensors, config, shard_bytes, overwrite: as in :func:`save_gptq`.

    Writes ``config.json`` with ``quantization_config = {"quant_method": "awq", "bits": 4, "group_size",
    "zero_point": true, "version": "gemm", "modules_to_not_convert"}``. Returns the directory as a Path.
    """
    from cupyq.formats import awq as fa

    if not _is_int(group_size) or not (group_size == -1 or group_size > 0):
        raise ValueError(f"group_size: expected -1 or a positive integer, got {group_size!r}")
    keep = [] if modules_to_not_convert is None else modules_to_not_convert
    if isinstance(keep, str) or not all(isinstance(k, str) and k for k in keep):
        raise ValueError(f"modules_to_not_convert: expected a list of module names, got {modules_to_not_convert!r}")
    if isinstance(layers, Mapping):
        clash = [n for n in layers if any(k in n for k in keep)]
        if clash:
            raise ValueError(f"layers[{clash[0]!r}]: quantized, but modules_to_not_convert keeps it dense")

    def check(t):
        for part in ("qweight", "qzeros", "scales"):
            if part not in t:
                raise ValueError(f"missing tensor '{part}'")
        fa.check_awq(t["qweight"], t["qzeros"], t["scales"], group_size)

    tensors = _collect(layers, _AWQ_PARTS, extra_tensors, check)
    qcfg = {
        "quant_method": "awq",
        "bits": 4,
        "group_size": int(group_size),
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": list(keep) or None,
    }
    cfg = dict(config or {})
    cfg["quantization_config"] = qcfg
    return _write_directory(directory, tensors, {"config.json": cfg}, shard_bytes, overwrite)
