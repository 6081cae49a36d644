"""Writing GPTQ, EXL2 and AWQ checkpoint directories: :func:`save_gptq`, :func:`save_exl2`, :func:`save_awq`.

Every layer is checked and every file written into a staging directory beside the target before anything
there is replaced (:func:`_write_directory`), so a bad argument or a failed write leaves an existing
checkpoint as it was.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from cupyq.checkpoint.config import _GPTQ_BITS, _GPTQ_FORMATS, _is_int
from cupyq.checkpoint.layers import _AWQ_PARTS, _EXL2_PARTS, _GPTQ_PARTS
from cupyq.checkpoint.safetensors_io import INDEX_FILE, _shards, _to_numpy, _write_safetensors

__all__ = ["save_gptq", "save_exl2", "save_awq"]


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
