"""Hugging Face GPTQ, EXL2 and AWQ checkpoint directories: lazy loading and saving.

A checkpoint directory holds one or more ``*.safetensors`` files (optionally sharded with a
``model.safetensors.index.json``), a ``config.json`` and, for GPTQ and AWQ, the quantisation settings in
``quantize_config.json``, ``quant_config.json`` or ``config.json["quantization_config"]`` (searched in
that order; where several are present they must agree on the settings that change the decoding). Each
linear layer is detected by its tensor names, so one directory can mix formats:

- GPTQ: ``<name>.qweight`` int32 ``[K*bits/32, N]``, ``.qzeros`` int32 ``[G, N*bits/32]``, ``.scales``
  float ``[G, N]``, optional ``.g_idx`` int ``[K]`` and ``.bias`` ``[N]``;
- EXL2: ``<name>.q_weight`` int32 ``[Q, N_pad]``, ``.q_invperm`` int ``[K]``, ``.q_scale`` int32
  ``[G, N_pad/8]``, ``.q_scale_max`` float ``[G]``, ``.q_groups`` int16 ``[2G]``, optional ``.bias``;
- AWQ (GEMM packing, when the quantization config says ``awq``): ``<name>.qweight`` int32 ``[K, N/8]``,
  ``.qzeros`` int32 ``[G, N/8]``, ``.scales`` float ``[G, N]``, optional ``.bias`` (see
  :mod:`cupyq.formats.awq`); the tensor names are GPTQ's, so the config decides which one it is;
- plain: ``<name>.weight`` 2-D ``[out, in]`` (torch ``nn.Linear`` layout; e.g. an fp16 ``lm_head``).

Opening reads only the safetensors headers; tensors are read when a layer is loaded.

Modules: :mod:`~cupyq.checkpoint.safetensors_io` (headers, tensor reads, the shard index, writing),
:mod:`~cupyq.checkpoint.config` (the quantization config), :mod:`~cupyq.checkpoint.layers` (layer
detection and header checks), :mod:`~cupyq.checkpoint.directory` (:class:`Checkpoint`,
:func:`open_checkpoint`), :mod:`~cupyq.checkpoint.save` (the savers: arguments and tensors checked) and
:mod:`~cupyq.checkpoint.write` (writing a directory as one transaction).
"""

from cupyq.checkpoint.config import QUANT_CONFIG_FILES, QuantConfig, read_quant_config, v1_zero_encoding
from cupyq.checkpoint.directory import Checkpoint, open_checkpoint, zero_point_warnings
from cupyq.checkpoint.errors import CheckpointError
from cupyq.checkpoint.layers import LayerInfo
from cupyq.checkpoint.safetensors_io import (  # noqa: F401  (_ST_DTYPES and _read_record: used by cupyq.distributed and tests)
    _ST_DTYPES,
    INDEX_FILE,
    TensorRecord,
    _read_record,
    read_safetensors_header,
)
from cupyq.checkpoint.save import save_awq, save_exl2, save_gptq

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
