"""Drop-in replacement for the exllamav2 layer module of LoRAX / text-generation-inference.

Serving code that imports ``QuantLinear``, ``set_device``, ``create_exllama_buffers``,
``ExLlamaV2DeviceTensors``, ``make_group_map``, ``ext_make_q_matrix``, ``ext_gemm_half_q_half``,
``none_tensor`` and ``LAYERS`` from its exllamav2 module can import them from here instead; the
compiled ``exllamav2_kernels`` extension is not needed. Differences that matter:

* **Nothing the caller owns is modified.** The original shuffles ``qweight`` in place, divides
  ``q_scale_max`` by 256 in place and casts dict entries; here every prepared buffer belongs to a
  :class:`cupyq.QMatrix`, so ``post_init`` and ``create_exllama_buffers`` may run any number of times.
* **Handles own their memory.** ``ext_make_q_matrix`` returns the ``QMatrix`` itself (a Python
  object, not a raw pointer); it stays valid as long as it is referenced.
* **Bounded scratch.** The scratch is used only by the large-m path (dequantise to fp16, then a dense
  matmul). ``create_exllama_buffers(max_total_tokens)`` sizes it from its argument: room for
  ``max(2 * max_total_tokens, MIN_DEQUANT_ROWS)`` dequantised rows of a layer (plus its gathered
  activations), never more than a full copy of the largest layer; larger layers are dequantised in
  row chunks. See :func:`dequant_scratch_budget`.
* **One dequantisation region, shared.** As in the original, all layers of a device share one
  dequantisation region (layers run one after another on a stream). ``get_scratch_slice`` on the
  other hand hands out *distinct* 128-byte aligned slices (a bump allocator), and says so clearly when
  the buffer is exhausted.
* **Correct results instead of shape errors.** Layers whose output width is not a multiple of 32 work
  (``forward`` returns the true width); GPTQ zero points decode with the ``& 0xF`` mask; any
  ``g_idx`` (None, trivial, act-order, all zero) gives ``x @ W`` for the ``W`` the checkpoint means.
* **Memory.** The ``QMatrix`` holds its own prepared copy of the weights. A layer keeps its
  checkpoint tensors too (the original's attributes) until ``release_checkpoint_tensors()``.
* CPU tensors are accepted too: they run the float32 reference path (slow, for tests and tools).

Both calling conventions exist: LoRAX's ``QuantLinear(qweight, qzeros, scales, g_idx, bias, bits,
groupsize)`` and TGI's ``QuantLinear(weight, bias)`` with a ``GPTQWeight``-like (``qweight``,
``qzeros``, ``scales``, ``g_idx``, ``bits``, ``groupsize``) or ``Exl2Weight``-like (``q_weight``,
``q_invperm``, ``q_scale``, ``q_scale_max``, ``q_groups``) object.

Only GPTQ 4-bit (and EXL2) layers are accepted by ``QuantLinear``, like the original; other GPTQ
widths work through :meth:`cupyq.QMatrix.from_gptq` and :class:`cupyq.torch_ops.QuantizedLinear`.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cupyq import torch_ops
from cupyq.scratch import (  # the scratch budget lives next to the dense path's buffer layout
    MIN_DEQUANT_ROWS, SCRATCH_ALIGN, ScratchNeed, _check_size, _round_up, dequant_scratch_budget, scratch_need,
)

__all__ = [
    "DEVICE",
    "FIXED_BYTES",
    "LAYERS",
    "MIN_DEQUANT_ROWS",
    "ExLlamaV2DeviceTensors",
    "ScratchNeed",
    "QuantLinear",
    "create_exllama_buffers",
    "dequant_scratch_budget",
    "ext_gemm_half_q_half",
    "ext_make_q_matrix",
    "make_group_map",
    "none_tensor",
    "scratch_need",
    "set_device",
]


# Placeholder for an absent tensor, as in the original module (which passed it to C++ for "None").
# Every function here also accepts plain None.
none_tensor = torch.empty((1, 1), device="meta")

# Module state, kept for compatibility with code that reads or resets it.
DEVICE = None  # set by set_device(); informational: scratch goes on each layer's own device
FIXED_BYTES = 0  # the largest full fp16 dequantised copy among constructed layers (temp_dq_size), bytes
LAYERS: list = []  # every constructed QuantLinear, in construction order
_DEVICE_TENSORS: dict = {}  # torch.device -> ExLlamaV2DeviceTensors made by create_exllama_buffers


def _normalise_device(device) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def _is_absent(t) -> bool:
    return t is None or (isinstance(t, torch.Tensor) and t.is_meta)


def set_device(device) -> None:
    """Record the serving device (``torch.device``, string or index) in ``DEVICE``.

    Kept for compatibility. Scratch buffers are placed on each layer's own device, so this only
    matters to callers that read ``DEVICE`` back.
    """
    global DEVICE
    DEVICE = None if device is None else torch.device(device)


# --------------------------------------------------------------------------------------------
# scratch
# --------------------------------------------------------------------------------------------


class ExLlamaV2DeviceTensors:
    """One scratch buffer on one device, handed out in 128-byte aligned float16 slices.

    device: ``torch.device``, string or CUDA index (CPU works too, for tests); scratch_bytes: the
    buffer size, rounded up to a multiple of 128. On first use one contiguous block is taken from CuPy's
    memory pool on that device (``buffer``, a uint8 CuPy array that owns the memory); ``scratch`` is a
    zero-copy float16 torch view of it (``[scratch_bytes // 2]``). Slices are views too: keep this object
    alive while they are in use. On the CPU the buffer is a plain ``torch.empty`` tensor.

    * :meth:`get_scratch_slice` returns *distinct* slices (bump pointer ``scratch_idx``, in halves);
      asking for more than is left raises ``ValueError``.
    * :meth:`get_dequant_slice` returns a prefix of one *shared* region (everything left in the
      buffer when it is first asked for), used by every layer's large-m dequantise path; layers run
      one after another on a stream, so they never use it at the same time. Do not run layers bound
      to the same region concurrently on different streams.
    """

    def __init__(self, device, scratch_bytes):
        self.device = _normalise_device(device)
        self.scratch_bytes = _round_up(_check_size("scratch_bytes", scratch_bytes), SCRATCH_ALIGN)
        self.buffer = None
        self.scratch = None
        self.scratch_idx = 0  # float16 elements handed out so far
        self._dequant = None

    def prepare(self) -> torch.Tensor:
        """Allocate the buffer if not done yet (idempotent); returns ``scratch`` (float16 ``[scratch_bytes // 2]``)."""
        if self.scratch is None:
            if self.device.type == "cuda" and self.scratch_bytes:
                import cupy

                from cupyq.dispatch import _torch_view

                with cupy.cuda.Device(self.device.index or 0):
                    self.buffer = cupy.empty(self.scratch_bytes, dtype=cupy.uint8)
                self.scratch = _torch_view(torch, self.buffer.view(cupy.float16), torch.float16)
            else:
                self.scratch = torch.empty((self.scratch_bytes // 2,), dtype=torch.float16, device=self.device)
        return self.scratch

    @property
    def used_bytes(self) -> int:
        """Bytes handed out by :meth:`get_scratch_slice` (including a reserved dequantisation region)."""
        return self.scratch_idx * 2

    @property
    def free_bytes(self) -> int:
        """Bytes :meth:`get_scratch_slice` can still hand out."""
        return self.scratch_bytes - self.used_bytes

    @property
    def dequant_bytes(self) -> int:
        """Size of the shared dequantisation region (what is free, until it is reserved)."""
        return self._dequant.numel() * 2 if self._dequant is not None else self.free_bytes

    def get_scratch_slice(self, size_bytes) -> torch.Tensor:
        """A new float16 slice of ``ceil(size_bytes / 128) * 128`` bytes, disjoint from every earlier one.

        Returns a contiguous view ``[rounded_bytes // 2]`` of ``scratch``, 128-byte aligned. Raises
        ``ValueError`` naming the sizes when fewer bytes are left.
        """
        size = _round_up(_check_size("size_bytes", size_bytes), SCRATCH_ALIGN)
        if size > self.free_bytes:
            raise ValueError(
                f"ExLlamaV2DeviceTensors on {self.device}: asked for a scratch slice of {size_bytes} bytes "
                f"({size} rounded up to {SCRATCH_ALIGN}), but only {self.free_bytes} of {self.scratch_bytes} "
                "bytes are left"
            )
        scratch = self.prepare()
        piece = scratch.narrow(0, self.scratch_idx, size // 2)
        self.scratch_idx += size // 2
        return piece

    def get_dequant_slice(self, size_bytes) -> torch.Tensor:
        """The first ``min(round_up(size_bytes, 128), dequant_bytes)`` bytes of the shared dequantisation region.

        The region is reserved on the first call as everything left in the buffer; every later call
        returns a prefix of the same memory. A layer handed less than its full dequantised size
        dequantises in row chunks. Raises ``ValueError`` if no byte is left for the region.
        """
        size = _round_up(_check_size("size_bytes", size_bytes), SCRATCH_ALIGN)
        if self._dequant is None:
            if self.free_bytes < SCRATCH_ALIGN:
                raise ValueError(
                    f"ExLlamaV2DeviceTensors on {self.device}: no room for a dequantisation region "
                    f"({self.free_bytes} of {self.scratch_bytes} bytes left)"
                )
            self._dequant = self.get_scratch_slice(self.free_bytes)
        return self._dequant.narrow(0, 0, min(size, self.dequant_bytes) // 2)

    def reset(self) -> None:
        """Hand slices out from offset 0 again (earlier slices then overlap later ones)."""
        self.scratch_idx = 0
        self._dequant = None

    def __repr__(self) -> str:
        return (
            f"ExLlamaV2DeviceTensors(device={self.device}, scratch_bytes={self.scratch_bytes}, "
            f"used_bytes={self.used_bytes}, allocated={self.scratch is not None})"
        )


# --------------------------------------------------------------------------------------------
# q-matrix construction
# --------------------------------------------------------------------------------------------


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
    host = q_groups.detach().cpu().numpy()
    group_map = np.ascontiguousarray(exl2.make_group_map(host, int(num_qrows), xp=np))
    return torch.from_numpy(group_map).to(q_groups.device)


_GPTQ_FIELDS = ("qweight", "qzeros", "scales", "g_idx", "bias", "bits", "checkpoint_format")
_EXL2_FIELDS = ("q_weight", "q_invperm", "q_perm", "q_scale", "q_scale_max", "q_groups", "q_group_map", "bias")


def _weight_fields(w):
    """``(fields, scale_max_divided)`` from a mapping (LoRAX) or a weight object (TGI)."""
    if isinstance(w, Mapping):
        return dict(w), False
    fields = {name: getattr(w, name) for name in _GPTQ_FIELDS + _EXL2_FIELDS if hasattr(w, name)}
    # TGI's Exl2Weight divides q_scale_max by 256 when it is created; the checkpoint value is 256x that.
    return fields, "q_weight" in fields


def _widen_invperm(q_invperm):
    # int16 holds K up to 65535 only when read as unsigned (TGI narrows q_invperm to int16).
    if isinstance(q_invperm, torch.Tensor) and q_invperm.dtype == torch.int16:
        return q_invperm.to(torch.int32) & 0xFFFF
    return q_invperm


def _make_exl2(fields, scale_max_divided, name):
    from cupyq.qmatrix import QMatrix

    missing = [k for k in ("q_weight", "q_scale", "q_scale_max", "q_groups") if _is_absent(fields.get(k))]
    if _is_absent(fields.get("q_invperm")) and _is_absent(fields.get("q_perm")):
        missing.append("q_invperm (or q_perm)")
    if missing:
        raise ValueError(f"{name}: EXL2 weights lack {', '.join(missing)}")
    q_invperm = fields.get("q_invperm")
    if _is_absent(q_invperm):
        q_perm = _widen_invperm(fields["q_perm"]).to(torch.int64)
        q_invperm = torch.argsort(q_perm).to(torch.int32)
    q_invperm = _widen_invperm(q_invperm)
    q_scale_max = fields["q_scale_max"]
    if scale_max_divided:
        q_scale_max = q_scale_max * 256  # a new tensor; exact (power of two)
    bias = None if _is_absent(fields.get("bias")) else fields["bias"]
    # q_group_map is not needed: QMatrix derives its row layout from q_groups and q_invperm.
    return QMatrix.from_exl2(
        fields["q_weight"], q_invperm, fields["q_scale"], q_scale_max, fields["q_groups"], bias
    )


def _make_gptq(fields, name):
    from cupyq.qmatrix import QMatrix

    missing = [k for k in ("qweight", "qzeros", "scales") if _is_absent(fields.get(k))]
    if missing:
        raise ValueError(f"{name}: GPTQ weights lack {', '.join(missing)}")
    qweight = fields["qweight"]
    g_idx = None if _is_absent(fields.get("g_idx")) else fields["g_idx"]  # any device (read on the host)
    bias = None if _is_absent(fields.get("bias")) else fields["bias"]
    bits = fields.get("bits", 4)
    checkpoint_format = fields.get("checkpoint_format", "gptq")
    return QMatrix.from_gptq(
        qweight, fields["qzeros"], fields["scales"], g_idx, bias, bits=bits, checkpoint_format=checkpoint_format
    )


def _qmatrix_bytes(qm) -> int:
    return scratch_need(qm).full_bytes


def _qmatrix_torch_device(qm) -> torch.device:
    if not getattr(qm, "is_cuda", False):
        return torch.device("cpu")
    return torch.device("cuda", int(qm.device_id))


def _bind_scratch(qm, temp_dq):
    """Give ``qm`` its dequantisation scratch from ``temp_dq``; returns the slice used (or None)."""
    if _is_absent(temp_dq) or not getattr(qm, "is_cuda", False):
        return None  # CPU matrices need no scratch; without one, gemm uses its bounded default
    device = _qmatrix_torch_device(qm)
    if isinstance(temp_dq, ExLlamaV2DeviceTensors):
        if temp_dq.device != device:
            raise ValueError(f"temp_dq: scratch is on {temp_dq.device} but the layer is on {device}")
        piece = temp_dq.get_dequant_slice(_qmatrix_bytes(qm))
    elif isinstance(temp_dq, torch.Tensor):
        piece = temp_dq
    elif hasattr(temp_dq, "get_scratch_slice"):  # another module's device-tensors object
        piece = temp_dq.get_scratch_slice(_qmatrix_bytes(qm))
    else:
        raise TypeError(
            f"temp_dq: expected an ExLlamaV2DeviceTensors, a CUDA tensor or None, got {type(temp_dq).__name__}"
        )
    if not isinstance(piece, torch.Tensor) or piece.device != device:
        where = piece.device if isinstance(piece, torch.Tensor) else type(piece).__name__
        raise ValueError(f"temp_dq: expected a scratch tensor on {device}, got {where}")
    qm.set_scratch(piece)
    return piece


def ext_make_q_matrix(w, temp_dq=None, key=None):
    """Build the quantized matrix of one layer; returns the ``cupyq.QMatrix`` (the handle).

    w: a mapping or a weight object with either
      GPTQ: ``qweight`` int32 ``[K/8, N]``, ``qzeros`` int32 ``[G, N/8]``, ``scales`` float16/float32
      ``[G, N]``, optional ``g_idx`` int32/int64 ``[K]`` (any device; ``None``/``none_tensor`` for none),
      optional ``bias`` ``[N]``, optional ``bits`` (default 4) and ``checkpoint_format``
      ("gptq" default, "gptq_v2");
      EXL2: ``q_weight`` int32 ``[Q, N]``, ``q_invperm`` int16/int32 ``[K]`` (or ``q_perm`` from which it
      is derived), ``q_scale`` int32 ``[G, N/8]``, ``q_scale_max`` float16 ``[G]`` as stored in the
      checkpoint for a mapping, already divided by 256 for a TGI ``Exl2Weight`` object, ``q_groups``
      int16 ``[2G]``, optional ``bias``; ``q_group_map`` is accepted and ignored.
    temp_dq: ``None``/``none_tensor``, a float16/uint8 CUDA tensor, or an :class:`ExLlamaV2DeviceTensors`
      (its shared dequantisation region is used) -- the scratch of the large-m path.
    key: layer name used in error messages.

    No tensor of ``w`` is modified, and ``w`` itself is not modified either.
    """
    fields, scale_max_divided = _weight_fields(w)
    qm = _build_qmatrix(fields, scale_max_divided, key or "w")
    _bind_scratch(qm, temp_dq)
    return qm


def _build_qmatrix(fields, scale_max_divided, name):
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


def _resolve_handle(q_handle):
    """``(qm, int handle)`` from a QMatrix or an int handle."""
    if q_handle is None:
        raise ValueError("q_handle: no quantized matrix (call post_init() or create_exllama_buffers() first)")
    if isinstance(q_handle, (int, np.integer)) and not isinstance(q_handle, bool):
        return torch_ops.lookup_qmatrix(int(q_handle)), int(q_handle)
    return q_handle, torch_ops.register_qmatrix(q_handle)


def ext_gemm_half_q_half(x, q_handle, q4_width, force_cuda=False):
    """``x @ W (+ bias)``: x ``[..., K]`` (float16 on CUDA) -> ``[..., q4_width]`` of x's dtype.

    q_handle: from :func:`ext_make_q_matrix` (or its int handle from
    :func:`cupyq.torch_ops.register_qmatrix`). q4_width must be at least the matrix's out_features;
    columns beyond it (a 32-padded width) are zeros. force_cuda: always run the quantized kernel,
    never the dequantise + matmul path.
    """
    qm, handle = _resolve_handle(q_handle)
    width = int(q4_width)
    if width < qm.out_features:
        raise ValueError(f"q4_width: expected at least out_features={qm.out_features}, got {width}")
    y = torch_ops.apply_qgemm(x, handle, bool(force_cuda))
    if width > qm.out_features:
        y = F.pad(y, (0, width - qm.out_features))
    return y


# --------------------------------------------------------------------------------------------
# layer and lifecycle
# --------------------------------------------------------------------------------------------


def create_exllama_buffers(max_total_tokens=None):
    """Size and bind the dequantisation scratch of every layer in ``LAYERS``.

    max_total_tokens: the most rows of x a forward will see (TGI passes its max prefill tokens);
    ``None`` (LoRAX calls it without argument) sizes for a full copy of the largest layer. The
    scratch per device is :func:`dequant_scratch_budget` of its layers. An existing buffer of the
    device is reused when it is large enough, otherwise a new one replaces it (re-capture CUDA graphs
    made before such a call). Builds every layer's matrix if not done yet. Safe to call again, e.g.
    after more layers were created. Returns ``{device: ExLlamaV2DeviceTensors}`` (empty without
    CUDA layers).

    A forward with more rows than ``max_total_tokens`` can need more scratch than budgeted (a layer
    with a row permutation gathers all its input rows first); the large-m path then raises
    ``ValueError`` naming the sizes. Call again with the larger bound.
    """
    by_device: dict = {}
    for layer in list(LAYERS):
        qm = layer._ensure_handle()
        if getattr(qm, "is_cuda", False):
            by_device.setdefault(_qmatrix_torch_device(qm), []).append(layer)
    result = {}
    for device, layers in by_device.items():
        need = dequant_scratch_budget([scratch_need(layer.q_handle) for layer in layers], max_total_tokens)
        tensors = _DEVICE_TENSORS.get(device)
        if tensors is None or tensors.dequant_bytes < need:
            tensors = ExLlamaV2DeviceTensors(device, need)
            _DEVICE_TENSORS[device] = tensors
        for layer in layers:
            layer.post_init(tensors)
        result[device] = tensors
    return result


def _validate_gptq4(qweight, qzeros, scales, g_idx, bits, groupsize):
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
    if g_idx is not None and not isinstance(g_idx, torch.Tensor):
        raise TypeError(f"g_idx: expected a torch tensor or None, got {type(g_idx).__name__}")
    layout = gptq.check_gptq(qweight, qzeros, scales, g_idx, 4)
    if groupsize is not None and groupsize != -1:
        if isinstance(groupsize, bool) or not isinstance(groupsize, (int, np.integer)) or groupsize <= 0:
            raise ValueError(f"groupsize: expected a positive int or -1, got {groupsize!r}")
        if g_idx is None and -(-layout.in_features // int(groupsize)) != layout.groups:
            raise ValueError(
                f"groupsize: {groupsize} gives {-(-layout.in_features // int(groupsize))} groups for "
                f"{layout.in_features} input features, but qzeros/scales have {layout.groups}"
            )
    return layout


def _implied_g_idx(qweight, groupsize, in_features, groups):
    """The explicit g_idx of a layer given without one, when its group size does not divide K."""
    from cupyq.formats import gptq

    if groupsize is None or groupsize == -1 or in_features % groups == 0 and in_features // groups == groupsize:
        return None
    g_idx = gptq.default_g_idx(in_features, int(groupsize))
    return torch.from_numpy(g_idx).to(qweight.device)


class QuantLinear(nn.Module):
    """GPTQ 4-bit / EXL2 linear layer with the LoRAX / TGI exllamav2 interface.

    ``QuantLinear(qweight, qzeros, scales, g_idx, bias, bits, groupsize)`` (LoRAX):
      qweight int32 ``[K/8, N]``, qzeros int32 ``[G, N/8]``, scales float16/float32 ``[G, N]``,
      g_idx int32/int64 ``[K]`` or None (a layer without g_idx uses ``k // groupsize``), bias ``[N]``
      or None, bits must be 4 (``ValueError`` otherwise), groupsize positive or -1.
    ``QuantLinear(weight, bias)`` (TGI): ``weight`` a ``GPTQWeight``- or ``Exl2Weight``-like object.

    Attributes as the original: ``infeatures`` (K), ``outfeatures`` (N rounded up to 32),
    ``padding`` (the rounding), ``q_handle`` (the ``cupyq.QMatrix`` once built), ``temp_dq``.
    Construction appends the layer to ``LAYERS`` and raises ``FIXED_BYTES`` to its ``temp_dq_size()``.

    ``forward(x, force_cuda=False)``: x ``[..., K]`` (float16 on CUDA) -> ``[..., N]`` with the bias
    added, N being the true output width. The matrix is built by ``post_init`` (or lazily by the first
    forward: do that before CUDA-graph capture or ``torch.compile``).
    """

    QUANT_TYPE = "exllamav2"

    def __init__(self, qweight, qzeros=None, scales=None, g_idx=None, bias=None, bits=4, groupsize=-1):
        super().__init__()
        if isinstance(qweight, torch.Tensor):
            self._init_lorax(qweight, qzeros, scales, g_idx, bias, bits, groupsize)
        elif hasattr(qweight, "shape") and hasattr(qweight, "dtype"):  # an array, not a weight object
            raise TypeError(
                f"qweight: expected a torch tensor (QuantLinear(qweight, qzeros, scales, g_idx, bias, bits, "
                f"groupsize)) or a GPTQ/EXL2 weight object, got {type(qweight).__module__}.{type(qweight).__name__}; "
                "convert NumPy arrays with torch.from_numpy"
            )
        else:
            if scales is not None or g_idx is not None:
                raise TypeError("QuantLinear(weight, bias): a weight object takes no further tensors")
            self._init_tgi(qweight, qzeros)
        self.padding = -self.outfeatures % 32
        self.outfeatures = self.outfeatures + self.padding
        self.q_handle = None
        self.temp_dq = None
        self._op_handle = None

        global FIXED_BYTES
        FIXED_BYTES = max(FIXED_BYTES, self.temp_dq_size())
        LAYERS.append(self)

    def _init_lorax(self, qweight, qzeros, scales, g_idx, bias, bits, groupsize):
        g_idx = None if _is_absent(g_idx) else g_idx
        layout = _validate_gptq4(qweight, qzeros, scales, g_idx, bits, groupsize)
        self.bits = 4
        self.maxq = 2**self.bits - 1
        self.infeatures = layout.in_features
        self.outfeatures = layout.out_features
        self.device = qweight.device
        self.qweight = qweight
        self.qzeros = qzeros
        self.scales = scales
        self.g_idx = g_idx
        self.bias = None if _is_absent(bias) else bias
        self.group_size = groupsize
        if g_idx is None:
            g_idx = _implied_g_idx(qweight, groupsize, layout.in_features, layout.groups)
        self.q_tensors = {"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx, "bias": self.bias}

    def _init_tgi(self, weight, bias):
        self.bias = None if _is_absent(bias) else bias
        if hasattr(weight, "q_weight"):
            fields, _ = _weight_fields(weight)
            absent = [k for k in ("q_scale", "q_scale_max", "q_groups") if _is_absent(fields.get(k))]
            perm = fields.get("q_invperm") if not _is_absent(fields.get("q_invperm")) else fields.get("q_perm")
            if _is_absent(perm):
                absent.insert(0, "q_invperm (or q_perm)")
            if absent:
                raise ValueError(f"weight: EXL2 weight object ({type(weight).__name__}) has no {', '.join(absent)}")
            self.bits = None
            self.infeatures = int(perm.shape[0])
            self.outfeatures = int(weight.q_weight.shape[1])
            self.device = weight.q_weight.device
            self.q_tensors = weight
        elif hasattr(weight, "qweight"):
            if getattr(weight, "use_awq_kernel", False):
                raise ValueError("weight: AWQ-packed weights (use_awq_kernel=True) are not GPTQ layouts")
            bits = getattr(weight, "bits", 4)
            groupsize = getattr(weight, "groupsize", -1)
            g_idx = getattr(weight, "g_idx", None)
            g_idx = None if _is_absent(g_idx) else g_idx
            layout = _validate_gptq4(weight.qweight, weight.qzeros, weight.scales, g_idx, bits, groupsize)
            self.bits = 4
            self.maxq = 15
            self.infeatures = layout.in_features
            self.outfeatures = layout.out_features
            self.device = weight.qweight.device
            self.group_size = groupsize
            if g_idx is None:
                g_idx = _implied_g_idx(weight.qweight, groupsize, layout.in_features, layout.groups)
            self.q_tensors = {
                "qweight": weight.qweight,
                "qzeros": weight.qzeros,
                "scales": weight.scales,
                "g_idx": g_idx,
                "checkpoint_format": getattr(weight, "checkpoint_format", "gptq"),
            }
        else:
            raise TypeError(
                f"weight: expected a GPTQ (qweight, qzeros, scales, g_idx, bits) or EXL2 (q_weight, q_invperm, "
                f"q_scale, q_scale_max, q_groups) weight object, got {type(weight).__name__}"
            )

    # -- matrix and scratch ---------------------------------------------------------------

    def _ensure_handle(self):
        """Build the QMatrix once (nothing the caller owns is modified); returns it."""
        if self.q_handle is None:
            if self.q_tensors is None:
                raise RuntimeError("QuantLinear: the checkpoint tensors were released before the matrix was built")
            fields, scale_max_divided = _weight_fields(self.q_tensors)
            fields["bias"] = self.bias  # fused into the matrix: one launch per forward
            qm = _build_qmatrix(fields, scale_max_divided, "QuantLinear")
            self.q_handle = qm
            self._op_handle = torch_ops.register_qmatrix(qm)
        return self.q_handle

    def post_init(self, temp_dq):
        """Build the matrix (first call only) and bind its dequantisation scratch.

        temp_dq: an :class:`ExLlamaV2DeviceTensors` (its shared dequantisation region is used), a
        CUDA scratch tensor, or None (gemm's bounded default scratch). May be called again; the
        matrix is not rebuilt, only rebound to the new scratch.
        """
        qm = self._ensure_handle()
        self.temp_dq = _bind_scratch(qm, temp_dq)

    def release_checkpoint_tensors(self):
        """Build the matrix if needed, then drop this layer's references to the checkpoint tensors.

        The ``QMatrix`` keeps its own prepared copy of the weights, so as long as the layer also holds
        ``qweight``/``qzeros``/``scales``/``g_idx`` (as the original's attributes do) a GPU holds the
        quantized weights twice. Afterwards those attributes and ``q_tensors`` are None; forward,
        ``post_init`` and ``create_exllama_buffers`` keep working (the matrix is never rebuilt).
        """
        self._ensure_handle()
        for name in ("qweight", "qzeros", "scales", "g_idx"):
            if hasattr(self, name):
                setattr(self, name, None)
        self.q_tensors = None

    def forward(self, x, force_cuda=False):
        if self._op_handle is None:
            self._ensure_handle()
        return torch_ops.apply_qgemm(x, self._op_handle, force_cuda)

    # -- sizes (bytes), as the original ---------------------------------------------------

    def temp_dq_size(self):
        """Bytes of a full fp16 copy of the (32-padded) matrix plus 128: ``infeatures * outfeatures * 2 + 128``."""
        return self.infeatures * self.outfeatures * 2 + 128

    def temp_fwd_size(self, max_input_len, max_batch_size):
        """``outfeatures * max_input_len * max_batch_size * 4 + 128`` (kept for compatibility; cupyq uses none)."""
        return self.outfeatures * max_input_len * max_batch_size * 4 + 128

    def scratch_space_fixed(self, max_input_len=4096, max_batch_size=16):
        """``temp_dq_size() + temp_fwd_size(max_input_len, max_batch_size)``, the original's per-layer figure."""
        return self.temp_dq_size() + self.temp_fwd_size(max_input_len, max_batch_size)

    def extra_repr(self) -> str:
        kind = "exl2" if self.bits is None else f"gptq, bits={self.bits}"
        return (
            f"infeatures={self.infeatures}, outfeatures={self.outfeatures - self.padding}, {kind}, "
            f"bias={self.bias is not None}, device={self.device}"
        )
