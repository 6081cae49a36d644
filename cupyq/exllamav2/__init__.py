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
  (``forward`` returns the true width; for EXL2, whose ``q_weight`` is stored padded, the width of the bias
  when one is given); GPTQ zero points decode with the ``& 0xF`` mask; any
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

Every public name is imported from here. This module holds the module state (``LAYERS``, ``FIXED_BYTES``,
``DEVICE``), :func:`create_exllama_buffers` and :class:`QuantLinear`; ``weights`` turns checkpoint tensors into
a :class:`cupyq.QMatrix`, ``device_tensors`` is the scratch buffer and ``ext`` the function-style API.
"""

from __future__ import annotations

from cupyq.device import require_torch

torch = require_torch("cupyq.exllamav2")
nn = torch.nn

from cupyq import torch_ops
from cupyq.formats.bias import check_bias
from cupyq.formats.exl2 import exl2_out_features
from cupyq.exllamav2.device_tensors import ExLlamaV2DeviceTensors
from cupyq.exllamav2.ext import bind_scratch, ext_gemm_half_q_half, ext_make_q_matrix, qmatrix_torch_device
from cupyq.exllamav2.weights import (build_qmatrix, implied_g_idx, is_absent, make_group_map, none_tensor,
                                     validate_exl2, validate_gptq4, weight_fields)
from cupyq.scratch import (  # the scratch budget lives next to the dense path's buffer layout
    MIN_DEQUANT_ROWS, ScratchNeed, check_token_bound, dequant_scratch_budget, scratch_need,
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


# Module state, kept for compatibility with code that reads or resets it.
DEVICE = None  # set by set_device(); informational: scratch goes on each layer's own device
FIXED_BYTES = 0  # the largest full fp16 dequantised copy among constructed layers (temp_dq_size), bytes
LAYERS: list = []  # every constructed QuantLinear, in construction order
_DEVICE_TENSORS: dict = {}  # torch.device -> ExLlamaV2DeviceTensors made by create_exllama_buffers


def set_device(device) -> None:
    """Record the serving device (``torch.device``, string or index) in ``DEVICE``.

    Kept for compatibility. Scratch buffers are placed on each layer's own device, so this only
    matters to callers that read ``DEVICE`` back.
    """
    global DEVICE
    DEVICE = None if device is None else torch.device(device)


# --------------------------------------------------------------------------------------------
# layer and lifecycle
# --------------------------------------------------------------------------------------------


def create_exllama_buffers(max_total_tokens=None):
    """Size and bind the dequantisation scratch of every layer in ``LAYERS``.

    max_total_tokens: the most rows of x a forward will see (TGI passes its max prefill tokens), a positive int;
    ``None`` (LoRAX calls it without argument) sizes for a full copy of the largest layer; anything else is a
    TypeError / ValueError naming it, whether or not a layer is on a GPU. The
    scratch per device is :func:`dequant_scratch_budget` of its layers. An existing buffer of the
    device is reused when it is large enough, otherwise a new one replaces it (re-capture CUDA graphs
    made before such a call). Builds every layer's matrix if not done yet. Safe to call again, e.g.
    after more layers were created. Returns ``{device: ExLlamaV2DeviceTensors}`` (empty without
    CUDA layers).

    A forward with more rows than ``max_total_tokens`` can need more scratch than budgeted (a layer
    with a row permutation gathers all its input rows first); the large-m path then raises
    ``ValueError`` naming the sizes. Call again with the larger bound.
    """
    check_token_bound(max_total_tokens)  # also where no layer is on a GPU, so a bad bound shows on the CPU too
    by_device: dict = {}
    for layer in list(LAYERS):
        qm = layer._ensure_handle()
        if getattr(qm, "is_cuda", False):
            by_device.setdefault(qmatrix_torch_device(qm), []).append(layer)
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


class QuantLinear(torch_ops.QMatrixModule, nn.Module):
    """GPTQ 4-bit / EXL2 linear layer with the LoRAX / TGI exllamav2 interface.

    ``QuantLinear(qweight, qzeros, scales, g_idx, bias, bits, groupsize)`` (LoRAX):
      qweight int32 ``[K/8, N]``, qzeros int32 ``[G, N/8]``, scales float16/float32 ``[G, N]``,
      g_idx int32/int64 ``[K]`` or None (a layer without g_idx uses ``k // groupsize``), bias ``[N]``
      or None, bits must be 4 (``ValueError`` otherwise), groupsize positive or -1.
    ``QuantLinear(weight, bias)`` (TGI): ``weight`` a ``GPTQWeight``- or ``Exl2Weight``-like object. An EXL2
      ``q_weight`` may hold up to 31 padding columns: bias ``[N]`` of the true width N, or the stored width, or
      None (the layer is then as wide as ``q_weight``; :meth:`cupyq.QMatrix.from_exl2`).

    Attributes as the original: ``infeatures`` (K), ``outfeatures`` (N rounded up to 32),
    ``padding`` (the rounding), ``q_handle`` (the ``cupyq.QMatrix`` once built; forward uses the matrix it
    holds), ``temp_dq``, ``bias`` (read-only: a copy of the bias the matrix adds, see :attr:`bias`).
    Construction checks the weight tensors (the GPTQ or EXL2 layout rules of :mod:`cupyq.formats`) and the bias
    (:func:`cupyq.formats.bias.check_bias`): ValueError/TypeError naming the tensor, before anything is registered;
    then it appends the layer to ``LAYERS`` and raises ``FIXED_BYTES`` to its
    ``temp_dq_size()``; so does unpickling or ``copy.deepcopy`` (:class:`cupyq.torch_ops.QMatrixModule`: a copy
    shares the matrix and ``temp_dq``; a layer on a GPU refuses to be pickled).

    ``forward(x, force_cuda=False)``: x ``[..., K]`` (float16 on CUDA) -> ``[..., N]`` with the bias
    added, N being the true output width. The matrix is built by ``post_init`` (or lazily by the first
    forward: do that before CUDA-graph capture or ``torch.compile``).
    """

    QUANT_TYPE = "exllamav2"
    q_handle = torch_ops.QMatrixAttribute("_op_handle")
    _shared_on_copy = ("temp_dq",)

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
        self._add_to_layers()

    def _add_to_layers(self):
        global FIXED_BYTES
        FIXED_BYTES = max(FIXED_BYTES, self.temp_dq_size())
        LAYERS.append(self)

    def __setstate__(self, state):
        super().__setstate__(state)
        self._add_to_layers()  # a layer of this process now, as a constructed one

    bias = torch_ops.fused_bias_property("build a new QuantLinear with the bias wanted")

    def _set_bias(self, bias, out_features, device):
        """Check ``bias`` against the layer's true width and keep a copy (None for an absent bias); a bias that
        is not a tensor is kept as the float32 tensor the rule gives, on ``device``."""
        if is_absent(bias):
            self._bias = None
            return
        checked = check_bias(bias, out_features)
        self._bias = bias.detach().clone() if isinstance(bias, torch.Tensor) else torch.as_tensor(checked, device=device)

    def _init_lorax(self, qweight, qzeros, scales, g_idx, bias, bits, groupsize):
        g_idx = None if is_absent(g_idx) else g_idx
        layout = validate_gptq4(qweight, qzeros, scales, g_idx, bits, groupsize)
        self.bits = 4
        self.maxq = 2**self.bits - 1
        self.infeatures = layout.in_features
        self.outfeatures = layout.out_features
        self.device = qweight.device
        self.qweight = qweight
        self.qzeros = qzeros
        self.scales = scales
        self.g_idx = g_idx
        self._set_bias(bias, layout.out_features, qweight.device)
        self.group_size = groupsize
        if g_idx is None:
            g_idx = implied_g_idx(qweight, groupsize, layout.in_features, layout.groups)
        self.q_tensors = {"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx, "bias": self._bias}

    def _init_tgi(self, weight, bias):
        bias = None if is_absent(bias) else bias
        if hasattr(weight, "q_weight"):
            layout = validate_exl2(weight)
            self.bits = None
            self.infeatures = layout.in_features
            # q_weight's columns may include padding; a bias of the true width says where the layer ends
            self.outfeatures = exl2_out_features(layout.out_features, bias)
            self._set_bias(bias, self.outfeatures, weight.q_weight.device)
            self.device = weight.q_weight.device
            self.q_tensors = weight
        elif hasattr(weight, "qweight"):
            if getattr(weight, "use_awq_kernel", False):
                raise ValueError("weight: AWQ-packed weights (use_awq_kernel=True) are not GPTQ layouts")
            bits = getattr(weight, "bits", 4)
            groupsize = getattr(weight, "groupsize", -1)
            g_idx = getattr(weight, "g_idx", None)
            g_idx = None if is_absent(g_idx) else g_idx
            qzeros, scales = getattr(weight, "qzeros", None), getattr(weight, "scales", None)
            checkpoint_format = getattr(weight, "checkpoint_format", None) or "gptq"
            layout = validate_gptq4(weight.qweight, qzeros, scales, g_idx, bits, groupsize, checkpoint_format)
            self.bits = 4
            self.maxq = 15
            self.infeatures = layout.in_features
            self.outfeatures = layout.out_features
            self._set_bias(bias, layout.out_features, weight.qweight.device)
            self.device = weight.qweight.device
            self.group_size = groupsize
            if g_idx is None:
                g_idx = implied_g_idx(weight.qweight, groupsize, layout.in_features, layout.groups)
            self.q_tensors = {
                "qweight": weight.qweight,
                "qzeros": qzeros,
                "scales": scales,
                "g_idx": g_idx,
                "checkpoint_format": checkpoint_format,
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
            fields, scale_max_divided = weight_fields(self.q_tensors)
            fields["bias"] = self._bias  # fused into the matrix: one launch per forward
            self.q_handle = build_qmatrix(fields, scale_max_divided, "QuantLinear")
        return self.q_handle

    def post_init(self, temp_dq):
        """Build the matrix (first call only) and bind its dequantisation scratch.

        temp_dq: an :class:`ExLlamaV2DeviceTensors` (its shared dequantisation region is used), a
        CUDA scratch tensor, or None (gemm's bounded default scratch). May be called again; the
        matrix is not rebuilt, only rebound to the new scratch.
        """
        qm = self._ensure_handle()
        self.temp_dq = bind_scratch(qm, temp_dq)

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
            f"bias={self._bias is not None}, device={self.device}"
        )
