"""An open checkpoint directory: :class:`Checkpoint` (lazy tensor and layer reads) and :func:`open_checkpoint`."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from cupyq.checkpoint.config import _GPTQ_BITS, read_quant_config
from cupyq.checkpoint.errors import CheckpointError, _fail, _read_json
from cupyq.checkpoint.layers import LayerInfo, _split, detect_layers
from cupyq.checkpoint.safetensors_io import INDEX_FILE, _read_record, _safetensors_files, read_safetensors_header
from cupyq.formats.common import require_fp16_range

__all__ = ["Checkpoint", "open_checkpoint", "zero_point_warnings"]


class Checkpoint:
    """A lazily read checkpoint directory (see :mod:`cupyq.checkpoint` for the tensor conventions).

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
        self.layers = detect_layers(self.tensors, self.quant_config, self._tgi_gptq_params)

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
            q_invperm = self.load_tensor(name + ".q_invperm")
            qrows = self.tensors[name + ".q_weight"].shape[0]
            groups = self._wrap(name + ".q_groups", lambda: fx.parse_q_groups(q_groups, qrows, info.in_features))
            perm = self._wrap(name + ".q_invperm", lambda: fx.perm_from_invperm(q_invperm, xp=np))
            mix = {}
            for g in groups:
                mix[g.bits] = mix.get(g.bits, 0) + g.rows
            full_sizes = {g.rows for g in groups[:-1]} or {groups[-1].rows}
            self._details[name] = replace(
                info,
                bits=tuple(sorted(mix, reverse=True)),
                bit_mix=tuple(sorted(mix.items(), reverse=True)),
                group_size=full_sizes.pop() if len(full_sizes) == 1 else None,
                act_order=not np.array_equal(perm, np.arange(perm.shape[0])),
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
        ``[G]``, ``q_groups`` int16 ``[2G]``, optional ``bias`` float16 ``[N_pad]``
        (zero-padded; :meth:`qmatrix` gives the layer the true width of a bias stored unpadded).
        AWQ: ``qweight`` int32 ``[K, N/8]``, ``qzeros`` int32 ``[G, N/8]`` (as stored), ``scales`` float16
        ``[G, N]`` (bf16/fp32 cast), optional ``bias`` float16 ``[N]``.
        Scales beyond float16's range (65504) are refused rather than cast to inf.
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

        out = {"qweight": raw["qweight"], "qzeros": raw["qzeros"], "scales": self._float16_scales(info, raw)}
        if "bias" in raw:
            out["bias"] = self._checked_bias(info, raw, info.out_features)
        self._wrap(info.name + ".qweight", lambda: fa.check_awq(out["qweight"], out["qzeros"], out["scales"], info.group_size))
        return out

    def _load_gptq(self, info, raw):
        from cupyq.formats import gptq as fg

        name = info.name
        out = {
            "qweight": raw["qweight"],
            "qzeros": raw["qzeros"],
            "scales": self._float16_scales(info, raw),
        }
        # The range of a stored g_idx is checked before it is narrowed to int32, which would wrap int64 values.
        g_idx = raw.get("g_idx")
        if g_idx is None:
            g_idx = fg.default_g_idx(info.in_features, info.group_size, xp=np)
        if "bias" in raw:
            out["bias"] = self._checked_bias(info, raw, info.out_features)
        bits = info.bits[0]
        tensor = name + (".g_idx" if "g_idx" in raw else ".qweight")
        self._wrap(tensor, lambda: fg.check_gptq(out["qweight"], out["qzeros"], out["scales"], g_idx, bits))
        out["g_idx"] = g_idx.astype(np.int32, copy=False)
        return out

    def _load_exl2(self, info, raw):
        from cupyq.formats import exl2 as fx

        name = info.name
        q_scale_max = raw["q_scale_max"].astype(np.float16, copy=False)
        # Checked as stored: narrowing q_invperm (int64) or q_groups (int32) first would wrap bad values into
        # plausible ones. Once they pass, the casts below lose nothing.
        self._wrap(
            name + ".q_groups",
            lambda: fx.check_exl2(raw["q_weight"], raw["q_invperm"], raw["q_scale"], q_scale_max, raw["q_groups"]),
        )
        out = {
            "q_weight": raw["q_weight"],
            "q_invperm": _unsigned_invperm(raw["q_invperm"]),
            "q_scale": raw["q_scale"],
            "q_scale_max": q_scale_max,
            "q_groups": raw["q_groups"].astype(np.int16, copy=False),
            "q_perm": fx.perm_from_invperm(raw["q_invperm"], xp=np),
        }
        if "q_perm" in raw and not np.array_equal(raw["q_perm"].astype(np.int64), out["q_perm"]):
            rec = self.tensors[name + ".q_perm"]
            _fail(rec.file, "stored q_perm is not the inverse of q_invperm", rec.name)
        if "bias" in raw:
            # An unpadded bias gets zeros for the padding columns, which dequantise to zero too (the stored width,
            # as shards read it); qmatrix() gives the layer the stored bias's width.
            bias = np.zeros(info.out_features, dtype=np.float16)
            bias[: raw["bias"].shape[0]] = self._checked_bias(info, raw, raw["bias"].shape[0])
            out["bias"] = bias
        return out

    def _float16_scales(self, info, raw):
        """The layer's stored ``scales`` (float16/bfloat16/float32/float64) as float16, the dtype the matrices
        use; CheckpointError naming the tensor for a finite value the cast would overflow."""
        return self._wrap(info.name + ".scales", lambda: _as_float16_scales(raw["scales"]))

    def _checked_bias(self, info, raw, width):
        """The layer's bias as float16 [width], checked by the rule of every QMatrix bias
        (:func:`cupyq.formats.bias.check_bias`) before the cast, so that no value becomes inf; CheckpointError naming the
        tensor otherwise."""
        from cupyq.formats.bias import check_bias

        return self._wrap(info.name + ".bias", lambda: check_bias(raw["bias"], width)).astype(np.float16)

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
        bias = t.get("bias")
        if bias is not None:  # as stored: an unpadded bias gives the layer's true width (QMatrix.from_exl2)
            bias = bias[: self.tensors[name + ".bias"].shape[0]]
        return QMatrix.from_exl2(
            t["q_weight"], t["q_invperm"], t["q_scale"], t["q_scale_max"], t["q_groups"], bias, device=device
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


def _as_float16_scales(scales):
    """float16 copy of float ``scales`` as read from a file; ValueError naming the largest finite value beyond
    65504, which the cast would turn into inf (NaN as stored is left to the format checks)."""
    require_fp16_range("scales", scales, "scales are loaded as float16")
    return scales.astype(np.float16, copy=False)


def _unsigned_invperm(q_invperm):
    """int32 copy of a stored q_invperm that :func:`cupyq.formats.exl2.check_exl2` accepted (so its values lie
    in ``[0, K)``, K <= 65535, and the cast loses nothing); 16-bit values are read as unsigned."""
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


def open_checkpoint(path) -> Checkpoint:
    """Open a GPTQ / EXL2 / AWQ / mixed checkpoint directory (or a single ``.safetensors`` file) lazily.

    Reads the config files and every safetensors header; no tensor data (except the scalar
    ``gptq_bits``/``gptq_groupsize`` of TGI-made checkpoints). With ``model.safetensors.index.json``
    the files it names are used, every entry is checked against their headers and every tensor of those files
    must be listed; without it, every ``*.safetensors`` in the directory. Raises :class:`CheckpointError` (naming file, tensor and
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
            if weight_map is not None and name not in weight_map:
                _fail(directory / INDEX_FILE, f"not listed in the index's weight_map, but '{f.name}' holds it "
                                              "(an incomplete or stale index)", name)
            if weight_map is not None and weight_map[name] != f.name:
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
