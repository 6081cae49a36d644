"""safetensors files: header parsing and validation, tensor reads, the shard index, writing and sharding.

Opening a checkpoint reads only headers (:func:`read_safetensors_header`); :func:`_read_record` reads one
tensor's bytes when a layer is loaded.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cupyq.checkpoint.errors import _fail, _read_json

__all__ = ["INDEX_FILE", "TensorRecord", "read_safetensors_header"]

INDEX_FILE = "model.safetensors.index.json"

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
# the shard index
# ------------------------------------------------------------------------------------------------


def _safetensors_files(directory):
    """The ``.safetensors`` files of a directory and the index's ``weight_map`` (None without an index)."""
    index_path = directory / INDEX_FILE
    if index_path.is_file():
        index = _read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            _fail(index_path, "expected an object with a non-empty 'weight_map' of tensor -> file")
        files = []
        for tensor, fname in weight_map.items():
            if not isinstance(fname, str) or fname in ("", ".", "..") or Path(fname).name != fname:
                _fail(index_path, f"weight_map entry is not a plain file name: {fname!r}", tensor)
            if fname not in files:
                files.append(fname)
        return [directory / f for f in files], weight_map
    files = sorted(directory.glob("*.safetensors"))
    return files, None


# ------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------


def _to_numpy(a, name):
    """A NumPy array (CPU copy of a CuPy or torch array, NumPy input as is) of a safetensors dtype.

    Raises TypeError naming ``name`` for a dtype safetensors cannot store through NumPy (bfloat16,
    complex, object...), whatever the array's library.
    """
    module = type(a).__module__.split(".")[0]
    if module == "torch":
        t = a.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            raise TypeError(f"{name}: bfloat16 cannot be saved through NumPy; convert it to float16 or float32 first")
        try:
            a = t.numpy()
        except TypeError as exc:  # a torch dtype without a NumPy counterpart
            raise TypeError(f"{name}: dtype {t.dtype} cannot be stored in safetensors ({exc})") from None
    elif module == "cupy":
        a = a.get()
    else:
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
    """Write ``{name: NumPy array}`` (any shape, 0-d included, kept as is) as one new safetensors file.

    The file gets the permissions a newly created file has (0o666 less the umask), like the JSON files
    beside it: it is created first with ``open``, whose mode is kept after safetensors replaces it.
    """
    import os
    import stat

    from safetensors.numpy import save_file

    with open(path, "xb") as f:
        mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
    # np.asarray keeps 0-d arrays 0-d (np.ascontiguousarray would make them [1]).
    save_file({k: np.asarray(v, order="C") for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    os.chmod(path, mode)
