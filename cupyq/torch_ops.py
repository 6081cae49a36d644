"""PyTorch front end: the ``cupyq::qgemm`` custom op and the ``QuantizedLinear`` module.

``torch.ops.cupyq.qgemm(x, handle, force_cuda)`` computes ``x @ W + bias`` for the quantized matrix
registered under the integer ``handle``. To ``torch.compile`` it is one opaque node with a fake
(meta) implementation, so ``fullgraph=True`` works and inductor never looks inside; to CUDA-graph
capture it is a plain sequence of kernels on torch's current stream with a torch-allocated output.

Handles are int keys into a registry of weak references (:mod:`cupyq.torch_handles`, re-exported here); the
modules hold their matrix in a :class:`QMatrixAttribute`, so a module always computes with the matrix it holds.

The op is defined with ``torch.library.custom_op`` (torch >= 2.4). On an older torch ``qgemm`` is a
plain Python function with the same signature (no ``torch.compile`` support, eager and graph capture
still work).
"""

from __future__ import annotations

import warnings

from cupyq.device import require_torch
from cupyq.torch_handles import (
    QMatrixAttribute,
    QMatrixModule,
    _by_handle,  # read directly on the eager fast path (apply_qgemm): a lookup call costs more than the dict get
    lookup_qmatrix,
    register_qmatrix,
    registered_handles,
    unregister_qmatrix,
)

torch = require_torch("cupyq.torch_ops (QuantizedLinear, the cupyq::qgemm op)")

__all__ = [
    "HAS_CUSTOM_OP",
    "QMatrixAttribute",
    "QMatrixModule",
    "QuantizedLinear",
    "TrimmedQuantizedLinear",
    "apply_qgemm",
    "fused_bias_property",
    "lookup_qmatrix",
    "qgemm",
    "register_qmatrix",
    "registered_handles",
    "unregister_qmatrix",
]

# --------------------------------------------------------------------------------------------
# the op
# --------------------------------------------------------------------------------------------


def _check_input(x: torch.Tensor, qm) -> None:
    if x.dim() < 1 or x.shape[-1] != qm.in_features:
        raise ValueError(f"x: expected shape [..., {qm.in_features}] (in_features), got {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x: expected a floating dtype, got {x.dtype}")


_gemm = None
_NO_PATHS: dict = {}


def _qgemm_impl(x: torch.Tensor, handle: int, force_cuda: bool) -> torch.Tensor:
    global _gemm
    if _gemm is None:  # resolved once: this runs per decode step, where microseconds count
        from cupyq import gemm as _gemm

    qm = lookup_qmatrix(handle)
    if type(x) is torch.Tensor:
        path = getattr(qm, "_fast_paths", _NO_PATHS).get((x.shape, x.dtype))  # see apply_qgemm
        y = path.run(qm, x, None) if path is not None else None
        if y is not None:
            return y
    _check_input(x, qm)
    # The kernels read x densely; compiled graphs may hand the op a strided view.
    y = _gemm(x.contiguous(), qm, force_cuda=force_cuda)
    if not isinstance(y, torch.Tensor):  # pragma: no cover - gemm returns torch for torch input
        raise TypeError(f"cupyq.gemm returned {type(y).__name__} for a torch tensor input")
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    # The op's contract (checked by the fake) is a fresh contiguous tensor, never a view of x.
    return y.contiguous()


def _dequantized(qm, like: torch.Tensor) -> torch.Tensor:
    """W [K, N] as a torch tensor for the backward of ``x @ W``: for a CPU matrix the float32 reference weight
    (``reference_weight()``, the W its forward multiplies by); for a GPU matrix the kernels' dequantised weight,
    on ``like``'s device in ``like``'s dtype."""
    if not qm.is_cuda:
        return torch.from_numpy(qm.reference_weight())
    w = qm.dequantize()
    if not isinstance(w, torch.Tensor):  # CuPy (matrix built from CuPy arrays)
        w = torch.from_dlpack(w)
    return w.to(device=like.device, dtype=like.dtype)


def _qgemm_fake(x: torch.Tensor, handle: int, force_cuda: bool) -> torch.Tensor:
    qm = lookup_qmatrix(handle)
    _check_input(x, qm)
    return x.new_empty(tuple(x.shape[:-1]) + (qm.out_features,))


HAS_CUSTOM_OP = hasattr(torch.library, "custom_op") and hasattr(torch.library, "register_fake")

if HAS_CUSTOM_OP:

    # An explicit schema: the handle is a plain int (never symbolic), so compiled graphs specialise on it.
    @torch.library.custom_op(
        "cupyq::qgemm", mutates_args=(), schema="(Tensor x, int handle, bool force_cuda) -> Tensor"
    )
    def _qgemm_def(x: torch.Tensor, handle: int, force_cuda: bool) -> torch.Tensor:
        """``x @ W + bias`` for the matrix registered under ``handle``.

        x: float tensor ``[..., in_features]`` (float16/bfloat16 on CUDA; any float dtype on the CPU, where the
        float32 reference path runs). handle: from :func:`register_qmatrix`. force_cuda: always use
        the quantized kernel, never the dequantise + dense matmul path (CUDA only).
        Returns a new tensor ``[..., out_features]`` with ``x``'s dtype and device.
        """
        return _qgemm_impl(x, handle, force_cuda)

    _qgemm_def.register_fake(_qgemm_fake)

    def _qgemm_setup_context(ctx, inputs, output):
        ctx.handle = inputs[1]

    def _qgemm_backward(ctx, grad):
        # d(x @ W)/dx: grad @ W^T, with W dequantised for the occasion (W itself is frozen).
        w = _dequantized(lookup_qmatrix(ctx.handle), grad)
        return (grad.to(w.dtype) @ w.t()).to(grad.dtype), None, None

    _qgemm_def.register_autograd(_qgemm_backward, setup_context=_qgemm_setup_context)
    # The OpOverload itself: what torch.compile and CUDA-graph capture see as one node.
    qgemm = torch.ops.cupyq.qgemm.default

else:  # pragma: no cover - torch < 2.4

    def qgemm(x: torch.Tensor, handle: int, force_cuda: bool) -> torch.Tensor:
        """``x @ W + bias`` for the matrix registered under ``handle`` (plain function on torch < 2.4)."""
        if torch.jit.is_tracing():
            raise RuntimeError("torch.jit.trace of a cupyq layer needs torch >= 2.4 (the cupyq::qgemm custom op); "
                               "on this torch the trace would record the traced call's output as a constant")
        if x.is_meta:
            return _qgemm_fake(x, handle, force_cuda)
        return _qgemm_impl(x, handle, force_cuda)


def _not_compiling() -> bool:
    return False  # pragma: no cover - torch without torch.compiler


# Bound once (dynamo recognises the function itself while tracing, however it is reached).
_is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", _not_compiling)
_is_grad_enabled = torch.is_grad_enabled
_is_tracing = getattr(torch._C, "_is_tracing", torch.jit.is_tracing)  # torch.jit.is_tracing without its Python frame


def apply_qgemm(x: torch.Tensor, handle: int, force_cuda: bool = False) -> torch.Tensor:
    """``qgemm`` as modules call it: the op node when traced, a direct call in plain eager inference.

    Under ``torch.compile``/export tracing and ``torch.jit.trace`` (which records the op), for tensor
    subclasses (fake, functional), when a gradient is needed and for meta tensors (the op's fake kernel
    gives the ``[..., out_features]`` output), this is ``torch.ops.cupyq.qgemm``. Otherwise it calls the
    same implementation without the dispatcher's per-call cost (several microseconds, a large share of a
    decode-sized GEMM); results, streams and graph-capture behaviour are identical. A call whose matrix
    already has a fast path for x's shape and dtype (see ``cupyq.dispatch.gemm``) goes straight to it: its
    output is a fresh contiguous tensor of x's dtype, as the op's contract asks.
    """
    if (_is_compiling() or type(x) is not torch.Tensor or (x.requires_grad and _is_grad_enabled())
            or _is_tracing()):
        if not isinstance(x, torch.Tensor):  # the dispatcher's own message would print all of x
            raise TypeError(f"x: expected a torch tensor [..., in_features], got {type(x).__module__}."
                            f"{type(x).__name__}; convert NumPy arrays with torch.from_numpy")
        return qgemm(x, handle, force_cuda)
    ref = _by_handle.get(handle) if type(handle) is int else None
    qm = ref() if ref is not None else None
    if qm is not None:
        path = getattr(qm, "_fast_paths", _NO_PATHS).get((x.shape, x.dtype))
        if path is not None:  # a fast path runs only on its CUDA device: a meta x gets None
            y = path.run(qm, x, None)
            if y is not None:
                return y
    if x.is_meta:
        return qgemm(x, handle, force_cuda)
    return _qgemm_impl(x, handle, force_cuda)


# --------------------------------------------------------------------------------------------
# module
# --------------------------------------------------------------------------------------------


def fused_bias_property(rebuild: str) -> property:
    """The read-only ``bias`` of a drop-in layer whose bias is fused into its quantized matrix (added in the
    kernel), kept as ``self._bias``: reading gives a copy of the bias ``[N]`` the matrix adds (the tensor given,
    its dtype and device) or None, so changing it changes nothing; assigning raises AttributeError saying
    ``rebuild`` (how to build a layer with another bias)."""

    def get(self):
        return None if self._bias is None else self._bias.clone()

    def refuse(self, value):
        raise AttributeError(f"bias: {type(self).__name__}'s bias is part of its quantized matrix (added in the "
                             f"kernel); it cannot be assigned: {rebuild}")

    return property(get, refuse, doc=fused_bias_property.__doc__)


_warned_weights_left_out = False


def _warn_weights_left_out(prefix: str) -> None:
    """Say once per process that a state dict of values leaves the quantized weights out."""
    global _warned_weights_left_out
    if _warned_weights_left_out:
        return
    _warned_weights_left_out = True
    name = prefix[:-1] if prefix.endswith(".") else prefix
    where = f"'{name}'" if name else "the module"
    warnings.warn(
        f"state_dict(): {where} is a cupyq QuantizedLinear, whose quantized weights are held by its QMatrix, not by "
        "parameters or buffers: the state dict leaves them out (of every such layer), so save_pretrained or "
        "torch.save(model.state_dict()) writes no quantized layer. Write them with cupyq.checkpoint.save_gptq / "
        "save_exl2 / save_awq, or keep the checkpoint directory and patch_model it again (warned once per process)",
        UserWarning,
        stacklevel=2,
    )


class QuantizedLinear(QMatrixModule, torch.nn.Module):
    """``y = x @ W + bias`` with a quantized ``W`` held by a ``cupyq.QMatrix``.

    qm: the matrix (GPTQ or EXL2, CUDA or CPU); the module keeps it alive. ``forward(x)``:
    x ``[..., in_features]`` -> ``[..., out_features]`` with x's dtype, through
    ``torch.ops.cupyq.qgemm`` (see :func:`apply_qgemm` for the eager shortcut): CUDA tensors run the
    cupyq kernels on torch's current stream (float16/bfloat16), CPU tensors the float32 reference path,
    meta tensors give a meta output of the right shape. Gradients flow to ``x`` (``grad @ W^T``, with ``W``
    dequantised during backward: the float32 reference weight on the CPU); the quantized weights themselves
    are frozen.

    ``qmatrix`` is the matrix forward uses: assigning another one (of the same features) switches to it
    (``handle`` is its ``cupyq::qgemm`` handle). ``torch.save(module)`` / ``torch.load`` and ``copy.deepcopy``
    work for CPU matrices (:class:`QMatrixModule`); a GPU matrix refuses to be pickled with TypeError.

    The weights are not parameters or buffers: ``.to()`` / ``.cuda()`` do not move them and
    ``state_dict()`` is empty. Build the QMatrix on the device it is used on. A state dict of values
    (``keep_vars=False``, what ``save_pretrained`` and ``torch.save(model.state_dict())`` write) warns once
    per process that the quantized weights are not in it.
    """

    qmatrix = QMatrixAttribute("handle")

    def __init__(self, qm, *, force_cuda: bool = False):
        super().__init__()
        self.qmatrix = qm
        self.in_features = int(qm.in_features)
        self.out_features = int(qm.out_features)
        self.force_cuda = bool(force_cuda)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_qgemm(x, self.handle, self.force_cuda)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not keep_vars:  # values to be saved; keep_vars=True is a look at the live tensors (patch_model's)
            _warn_weights_left_out(prefix)

    def extra_repr(self) -> str:
        qm = self.qmatrix
        parts = [f"in_features={self.in_features}", f"out_features={self.out_features}"]
        for attr in ("format", "bits", "group_size", "act_order"):
            value = getattr(qm, attr, None)
            if value is not None:
                parts.append(f"{attr}={value}")
        device = _qmatrix_device(qm)
        if device is not None:
            parts.append(f"device={device}")
        return ", ".join(parts)


class TrimmedQuantizedLinear(QuantizedLinear):
    """QuantizedLinear returning only the first ``out_features`` columns of its matrix (EXL2 stores N padded to
    a multiple of 32); ``stored_out_features`` is the matrix's width.

    qm: the matrix; out_features: the module's width, less than ``qm.out_features``. ``forward(x)``: x
    ``[..., in_features]`` -> ``[..., out_features]`` (a view of the padded product).
    """

    def __init__(self, qm, out_features):
        super().__init__(qm)
        self.stored_out_features = self.out_features
        self.out_features = int(out_features)

    def forward(self, x):
        return super().forward(x)[..., : self.out_features]


def _qmatrix_device(qm) -> str | None:
    is_cuda = getattr(qm, "is_cuda", None)
    if is_cuda is None:
        return None
    if not is_cuda:
        return "cpu"
    device_id = getattr(qm, "device_id", None)
    return "cuda" if device_id is None else f"cuda:{device_id}"
