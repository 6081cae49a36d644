"""Where a shard reads a layer's tensors from: a mapping of arrays or a :class:`CheckpointLayer` that reads only
the requested slices of a checkpoint's safetensors files (NumPy; no torch needed)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from cupyq import reference
from cupyq.formats import gptq as _gptq
from cupyq.formats.common import require_shape

__all__ = ["CheckpointLayer"]


class CheckpointLayer(Mapping):
    """One quantized layer of a :class:`cupyq.checkpoint.Checkpoint`, read lazily.

    A read-only mapping from the layer's tensor keys (``qweight``, ``qzeros``, ``scales``, ``g_idx``, ``bias``
    for GPTQ; ``q_weight``, ``q_invperm``, ``q_scale``, ``q_scale_max``, ``q_groups``, ``bias`` for EXL2) to
    NumPy arrays with the dtypes of :meth:`Checkpoint.load_layer` (scales and bias float16, g_idx int32 and
    ``k // group_size`` when the file has none, q_invperm int32, q_groups int16, EXL2 bias zero-padded to the
    stored width; a stored ``q_perm`` is left out, being ``argsort(q_invperm)``). :meth:`read` reads a row or
    column range through a memory map, so a shard touches only the bytes it needs (column slices read the row
    pieces of each row).
    """

    def __init__(self, ckpt, name):
        from cupyq.checkpoint import _ST_DTYPES

        self.checkpoint = ckpt
        self.name = name
        self.info = ckpt.layer_info(name)
        if not self.info.quantized:
            raise ValueError(f"{ckpt.path}: layer '{name}' is a plain {self.info.format} weight, not a quantized layer")
        self.format = self.info.format
        self._records = {t.rsplit(".", 1)[1]: ckpt.tensors[t] for t in self.info.tensors}
        self._records.pop("q_perm", None)  # rebuilt from q_invperm, as load_layer does
        self._dtypes = _ST_DTYPES
        keys = list(self._records)
        if self.format == "gptq" and "g_idx" not in keys:
            keys.append("g_idx")
        self._keys = tuple(keys)

    def __repr__(self):
        return f"CheckpointLayer({self.name!r}, format={self.format!r})"

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)

    def __getitem__(self, key):
        return self.read(key)

    def shape(self, key) -> tuple:
        """Shape of tensor ``key`` as :meth:`read` returns it whole."""
        if key == "g_idx" and key not in self._records:
            return (self.info.in_features,)
        if key == "bias" and self.format == "exl2":
            return (self.info.out_features,)
        return tuple(self._records[key].shape)

    def read(self, key, rows=None, cols=None) -> np.ndarray:
        """Tensor ``key`` (or its ``rows`` / ``cols`` slice, Python slices of dims 0 / 1) as a new NumPy array."""
        if key not in self._keys:
            raise KeyError(f"{self.checkpoint.path}: layer '{self.name}' has no tensor {key!r} (it has {list(self._keys)})")
        if key == "g_idx" and key not in self._records:
            g = _gptq.default_g_idx(self.info.in_features, self.info.group_size)
            return g[rows or slice(None)].copy()
        if key == "bias" and self.format == "exl2":
            stored = self._mapped(key)
            bias = np.zeros(self.info.out_features, dtype=np.float16)
            bias[: stored.shape[0]] = stored
            return bias[rows or slice(None)].copy()
        view = self._mapped(key)
        index = (rows or slice(None),) if cols is None else (rows or slice(None), cols)
        out = np.array(view[index])
        rec = self._records[key]
        if rec.dtype == "BF16":
            out = (out.astype(np.uint32) << 16).view(np.float32)
        out = out.astype(out.dtype.newbyteorder("="), copy=False)
        return out.astype(_NORMAL_DTYPES.get(key, out.dtype), copy=False)

    def _mapped(self, key):
        rec = self._records[key]
        return np.memmap(rec.file, dtype=self._dtypes[rec.dtype], mode="r", offset=rec.offset, shape=rec.shape)


_NORMAL_DTYPES = {
    "scales": np.float16,
    "bias": np.float16,
    "g_idx": np.int32,
    "q_invperm": np.int32,
    "q_scale_max": np.float16,
    "q_groups": np.int16,
}


def _read(tensors, key, rows=None, cols=None):
    """A NumPy copy of ``tensors[key]`` or of its row / column slice."""
    if isinstance(tensors, CheckpointLayer):
        return tensors.read(key, rows, cols)
    a = tensors[key]
    if hasattr(a, "detach") or type(a).__module__.split(".", 1)[0] == "cupy":
        a = a[rows or slice(None)] if cols is None else a[rows or slice(None), cols]
        return np.array(reference.to_numpy(a))
    a = np.asarray(a)
    return np.array(a[rows or slice(None)] if cols is None else a[rows or slice(None), cols])


def _shape(tensors, key) -> tuple:
    if isinstance(tensors, CheckpointLayer):
        return tensors.shape(key)
    return tuple(int(s) for s in tensors[key].shape)


def _require_shapes(tensors, expected):
    """ValueError naming the tensor unless each present ``tensors[key]`` has the shape ``expected[key]`` (a shard
    of inconsistent tensors would otherwise drop or misplace some rows or columns without a word)."""
    for key, shape in expected.items():
        if key in tensors:
            require_shape(key, np.broadcast_to(np.uint8(0), _shape(tensors, key)), shape)  # a view: no copy
