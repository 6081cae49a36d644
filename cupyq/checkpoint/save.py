"""Writing GPTQ, EXL2 and AWQ checkpoint directories: :func:`save_gptq`, :func:`save_exl2`, :func:`save_awq`.

Every argument and layer is checked, with the rules :func:`~cupyq.checkpoint.open_checkpoint` applies,
before any folder is created or file written. The files are written into a staging folder on the target's
filesystem and moved into place once all are written; an overwrite moves the old checkpoint's files aside
first and deletes them only when every new file is in place (:func:`cupyq.checkpoint.write.write_directory`), so
a bad argument or a failed write leaves an existing checkpoint as it was.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from cupyq.checkpoint.config import _GPTQ_BITS, _GPTQ_FORMATS, _parse_quant_config
from cupyq.checkpoint.layers import _AWQ_PARTS, _EXL2_PARTS, _GPTQ_PARTS, detect_layers
from cupyq.checkpoint.safetensors_io import _NP_TO_ST, TensorRecord, _to_numpy
from cupyq.checkpoint.write import write_directory
from cupyq.formats.common import is_int, require_bool

__all__ = ["save_gptq", "save_exl2", "save_awq"]


# ------------------------------------------------------------------------------------------------
# arguments and tensors
# ------------------------------------------------------------------------------------------------


def _mapping(name, value):
    """``value`` (a Mapping, or None for empty) as a dict; TypeError naming ``name`` otherwise."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"{name}: expected a dict or None, got {type(value).__name__}")
    return dict(value)


def _collect(layers, parts, extra_tensors, check, unstored=()):
    """``({tensor name: NumPy array}, extra tensor names)`` of the layers and the extra tensors.

    Each layer's tensors (``parts`` of it, NumPy, CuPy or torch) are converted and checked by ``check``;
    ``unstored`` parts are accepted and checked but not written.
    """
    if not isinstance(layers, Mapping):
        raise TypeError(f"layers: expected a dict of layer name -> tensors, got {type(layers).__name__}")
    extra_tensors = _mapping("extra_tensors", extra_tensors)
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
            if k in arrays and k not in unstored:
                tensors[f"{lname}.{k}"] = arrays[k]
    for name, value in extra_tensors.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"extra_tensors: tensor names must be non-empty strings, got {name!r}")
        if name in tensors:
            raise ValueError(f"extra_tensors: {name!r} is also a quantized layer tensor")
        tensors[name] = _to_numpy(value, name)
    if not tensors:
        raise ValueError("layers: nothing to save")
    return tensors, set(extra_tensors)


def _check_as_read(directory, layers, tensors, extra, qcfg, qcfg_file):
    """Refuse what :func:`open_checkpoint` would refuse in the directory about to be written.

    The reader's own checks run on ``qcfg`` as ``qcfg_file`` will hold it and on the tensors' headers as
    they will be stored (dtype, shape): desc_act without g_idx, a bias that is not out_features long, a
    plain weight or a quantized-only tensor (``scales``...) without its layer. An extra tensor the reader
    would take as part of one of ``layers`` is refused too: a layer's tensors are given (and checked
    whole) in ``layers``. Extra tensors may form layers of their own (a mixed checkpoint). Raises
    CheckpointError naming ``directory`` and the tensor, or ValueError naming ``extra_tensors``.
    """
    directory = Path(directory)
    quant_config = _parse_quant_config(qcfg, directory / qcfg_file)
    records = {n: TensorRecord(n, directory, _NP_TO_ST[a.dtype], tuple(a.shape), 0, a.nbytes) for n, a in tensors.items()}
    for name, info in detect_layers(records, quant_config, lambda: None).items():
        taken = [t for t in info.tensors if t in extra] if name in layers else []
        if taken:
            raise ValueError(
                f"extra_tensors: {taken[0]!r} would be read as part of layer {name!r}; give it in layers[{name!r}]"
            )


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
        directory: created if missing; must hold no ``.safetensors``, shard index, ``quantize_config.json``
            or ``quant_config.json`` unless ``overwrite``, which replaces them all (other files are kept;
            a failed save leaves the old checkpoint as it was).
        layers: ``{module name: quantize_gptq output}`` (``qweight``, ``qzeros``, ``scales``, ``g_idx``,
            optional ``bias``; NumPy, CuPy or torch), stored as ``<name>.qweight`` etc.
        bits, group_size, desc_act, sym, checkpoint_format: the settings the layers were made with
            (each layer is checked against ``bits`` and ``group_size``, and needs ``g_idx`` when
            ``desc_act``; ``desc_act`` and ``sym`` are bools; ``checkpoint_format`` is the format of the
            given ``qzeros``, v1 read per field as :func:`cupyq.quantize_gptq` writes it).
        write_format: the zero-point format of the files: ``"gptq"`` (v1) or ``"gptq_v2"``. None writes
            asymmetric layers (``sym=False``) as ``"gptq_v2"``, which every reader decodes the same way (v1
            zeros of 0 are stored differently by different tools), and symmetric ones as ``checkpoint_format``.
            The qzeros are converted when it differs from ``checkpoint_format``.
        extra_tensors: dict of other tensors to store by full name (``lm_head.weight``, embeddings,
            norms...; any shape, 0-d included); none may be read back as part of a quantized layer
            (``<layer>.weight``, ``<layer>.scales``...).
        config: dict, the base ``config.json`` content (e.g. the model config), JSON-encodable;
            ``quantization_config`` is added.
        shard_bytes: split into ``model-0000i-of-0000n.safetensors`` of at most this many bytes each
            plus ``model.safetensors.index.json``; None writes one ``model.safetensors``.
        overwrite: bool.

    Writes ``config.json`` (with ``quantization_config``) and ``quantize_config.json``, each file with the
    mode a new file gets (0o666 less the umask). Everything :func:`open_checkpoint` would refuse is
    refused before anything is written (TypeError / ValueError / CheckpointError naming the argument or
    tensor). Returns the directory as a Path.
    """
    from cupyq.formats import gptq as fg

    if not is_int(bits) or bits not in _GPTQ_BITS:
        raise ValueError(f"bits: expected one of {_GPTQ_BITS}, got {bits!r}")
    if not is_int(group_size) or not (group_size == -1 or group_size > 0):
        raise ValueError(f"group_size: expected -1 or a positive integer, got {group_size!r}")
    if checkpoint_format not in _GPTQ_FORMATS:
        raise ValueError(f"checkpoint_format: expected one of {_GPTQ_FORMATS}, got {checkpoint_format!r}")
    desc_act = require_bool("desc_act", desc_act)
    sym = require_bool("sym", sym)
    cfg = _mapping("config", config)
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

    tensors, extra = _collect(layers, _GPTQ_PARTS, extra_tensors, check)
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
        "desc_act": desc_act,
        "sym": sym,
        "format": write_format,
        "checkpoint_format": write_format,
        "pack_dtype": "int32",
        "meta": {"quantizer": [f"cupyq:{_cupyq_version()}"]},
    }
    _check_as_read(directory, layers, tensors, extra, qcfg, "quantize_config.json")
    cfg["quantization_config"] = qcfg
    return write_directory(directory, tensors, {"config.json": cfg, "quantize_config.json": qcfg}, shard_bytes, overwrite)


def save_exl2(directory, layers, *, extra_tensors=None, config=None, bits=None, shard_bytes=None, overwrite=False):
    """Write an EXL2 checkpoint directory.

    Args:
        directory: as in :func:`save_gptq`.
        layers: ``{module name: quantize_exl2 output}`` (``q_weight``, ``q_invperm``, ``q_scale``,
            ``q_scale_max``, ``q_groups``, optional ``bias``; a ``q_perm`` entry is accepted and not
            written, as converters do not write it).
        extra_tensors, config, shard_bytes, overwrite: as in :func:`save_gptq`.
        bits: target bits per weight recorded in ``quantization_config`` (informational): a finite
            number from 2 to 8 (the EXL2 widths); None records the measured average of the layers'
            q_weight.

    Writes ``config.json`` with ``quantization_config = {"quant_method": "exl2", "version", "bits",
    "head_bits"}``. Returns the directory as a Path.
    """
    from cupyq.formats import exl2 as fx

    lo, hi = min(fx.EXL2_BITS), max(fx.EXL2_BITS)
    if bits is not None and (isinstance(bits, (bool, np.bool_)) or not isinstance(bits, numbers.Real)):
        raise TypeError(f"bits: expected None or a number of bits per weight, got {type(bits).__name__} {bits!r}")
    if bits is not None and not (math.isfinite(bits) and lo <= bits <= hi):
        raise ValueError(f"bits: expected bits per weight from {lo} to {hi} (the EXL2 widths), got {bits!r}")
    cfg = _mapping("config", config)

    def check(t):
        for part in ("q_weight", "q_invperm", "q_scale", "q_scale_max", "q_groups"):
            if part not in t:
                raise ValueError(f"missing tensor '{part}'")
        fx.check_exl2(t["q_weight"], t["q_invperm"], t["q_scale"], t["q_scale_max"], t["q_groups"])

    tensors, extra = _collect(layers, _EXL2_PARTS, extra_tensors, check, unstored=("q_perm",))

    def packed_rows(n):
        return tensors[f"{n}.q_weight"].shape[0] * 32

    def rows(n):
        return tensors[f"{n}.q_invperm"].shape[0]

    if bits is None and layers:
        bits = round(sum(packed_rows(n) for n in layers) / sum(rows(n) for n in layers), 3)
    head = "lm_head"
    if head in layers:
        head_bits = round(packed_rows(head) / rows(head), 3)
    elif head + ".weight" in tensors:
        head_bits = 8 * tensors[head + ".weight"].dtype.itemsize
    else:
        head_bits = None
    qcfg = {"quant_method": "exl2", "version": f"cupyq {_cupyq_version()}", "bits": None if bits is None else float(bits)}
    if head_bits is not None:
        qcfg["head_bits"] = head_bits
    _check_as_read(directory, layers, tensors, extra, qcfg, "config.json")
    cfg["quantization_config"] = qcfg
    return write_directory(directory, tensors, {"config.json": cfg}, shard_bytes, overwrite)


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
        directory: as in :func:`save_gptq`.
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

    if not is_int(group_size) or not (group_size == -1 or group_size > 0):
        raise ValueError(f"group_size: expected -1 or a positive integer, got {group_size!r}")
    keep = [] if modules_to_not_convert is None else modules_to_not_convert
    if isinstance(keep, str) or not all(isinstance(k, str) and k for k in keep):
        raise ValueError(f"modules_to_not_convert: expected a list of module names, got {modules_to_not_convert!r}")
    cfg = _mapping("config", config)
    if isinstance(layers, Mapping):
        clash = [n for n in layers if any(k in n for k in keep)]
        if clash:
            raise ValueError(f"layers[{clash[0]!r}]: quantized, but modules_to_not_convert keeps it dense")

    def check(t):
        for part in ("qweight", "qzeros", "scales"):
            if part not in t:
                raise ValueError(f"missing tensor '{part}'")
        fa.check_awq(t["qweight"], t["qzeros"], t["scales"], group_size)

    tensors, extra = _collect(layers, _AWQ_PARTS, extra_tensors, check)
    qcfg = {
        "quant_method": "awq",
        "bits": 4,
        "group_size": int(group_size),
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": list(keep) or None,
    }
    _check_as_read(directory, layers, tensors, extra, qcfg, "config.json")
    cfg["quantization_config"] = qcfg
    return write_directory(directory, tensors, {"config.json": cfg}, shard_bytes, overwrite)
