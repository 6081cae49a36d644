"""Drop-in replacement for the AWQ linear layer of LoRAX-style serving code.

Serving code that builds ``AWQLinear(w_bit, group_size, qweight, qzeros, scales, bias)`` from its AWQ
module (``get_linear(..., quantize="awq")``) can import it from here instead; no compiled AWQ
extension is needed. The layer takes the checkpoint tensors as AutoAWQ's GEMM format stores them
(:mod:`cupyq.formats.awq`) and runs the cupyq kernels through the ``cupyq::qgemm`` torch custom op,
so it works under ``torch.compile(fullgraph=True)`` and CUDA-graph capture.

Differences that matter:

* The matrix is prepared once, in the constructor, on the device of ``qweight`` (CPU tensors run the
  float32 reference path, for tests and tools). Nothing the caller owns is modified.
* ``bias`` is added inside the kernel's epilogue (one launch per forward).
* float16 and bfloat16 activations run as they are; other float dtypes on a GPU are computed in
  float16 and cast back, as the original does.
* The layer keeps its checkpoint tensors (the original's attributes) until
  :meth:`AWQLinear.release_checkpoint_tensors`; the prepared matrix is a second copy.
* ``bias`` is read-only (a copy of the bias the matrix adds): it is fused into the prepared matrix.
"""

from __future__ import annotations

from cupyq.device import require_torch

torch = require_torch("cupyq.awq (AWQLinear)")
nn = torch.nn

from cupyq import torch_ops
from cupyq.formats import awq as _awq

__all__ = ["AWQLinear"]


def _is_absent(t) -> bool:
    return t is None or (isinstance(t, torch.Tensor) and t.is_meta)


class AWQLinear(torch_ops.QMatrixModule, nn.Module):
    """AWQ (GEMM-packed, 4-bit) linear layer with the LoRAX interface.

    ``AWQLinear(w_bit, group_size, qweight, qzeros, scales, bias)``:
      w_bit must be 4 (``ValueError`` otherwise); group_size: rows per group, dividing K, or -1 for one
      group; qweight int32 ``[K, N/8]`` and qzeros int32 ``[K/group_size, N/8]``, outputs packed along
      the columns in the order 0, 2, 4, 6, 1, 3, 5, 7; scales float16/bfloat16/float32
      ``[K/group_size, N]``; bias ``[N]`` or None. All torch tensors on one device.

    Attributes as the original: ``in_features`` (K), ``out_features`` (N), ``w_bit``, ``group_size``
    (``in_features`` for -1), ``qweight``, ``qzeros``, ``scales``, ``bias`` (read-only, see :attr:`bias`);
    plus ``qmatrix`` (the prepared :class:`cupyq.QMatrix`, the one forward uses) and ``handle`` (its
    ``cupyq::qgemm`` handle). Pickling and ``copy.deepcopy`` as :class:`cupyq.torch_ops.QMatrixModule`
    says (a copy shares the matrix; a layer on a GPU refuses to be pickled).

    ``forward(x)``: x ``[..., K]`` -> ``[..., N]`` with x's dtype and the bias added.
    """

    qmatrix = torch_ops.QMatrixAttribute("handle")

    def __init__(self, w_bit, group_size, qweight, qzeros, scales, bias):
        super().__init__()
        if isinstance(w_bit, bool) or w_bit != 4:
            raise ValueError(f"w_bit: AWQ GEMM layers are 4-bit, got {w_bit!r}")
        for name, t in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name}: expected a torch tensor, got {type(t).__name__}")
            if t.is_meta:
                raise ValueError(f"{name}: expected the checkpoint's values, got a meta tensor (no data)")
        bias = None if _is_absent(bias) else bias
        if bias is not None and not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias: expected a torch tensor or None, got {type(bias).__name__}")
        tensors = {"qweight": qweight, "qzeros": qzeros, "scales": scales, "bias": bias}
        devices = {str(t.device) for t in tensors.values() if t is not None}
        if len(devices) > 1:
            raise ValueError(f"AWQLinear: tensors are on different devices: {sorted(devices)}")
        layout = _awq.check_awq(qweight, qzeros, scales, group_size)
        from cupyq.qmatrix import QMatrix

        device = qweight.device
        qm = QMatrix.from_awq(
            qweight, qzeros, scales, bias, group_size=group_size, device="cpu" if device.type == "cpu" else device.index
        )
        self.w_bit = 4
        self.in_features = layout.in_features
        self.out_features = layout.out_features
        self.group_size = layout.group_size
        self.device = device
        self.qweight, self.qzeros, self.scales = qweight, qzeros, scales
        self._bias = None if bias is None else bias.detach().clone()
        self.qmatrix = qm

    bias = torch_ops.fused_bias_property(
        "build a new AWQLinear(w_bit, group_size, qweight, qzeros, scales, bias) with the bias wanted")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and x.is_cuda and x.dtype not in (torch.float16, torch.bfloat16):
            return torch_ops.apply_qgemm(x.half(), self.handle, False).to(x.dtype)
        return torch_ops.apply_qgemm(x, self.handle, False)

    def release_checkpoint_tensors(self):
        """Drop this layer's references to ``qweight``/``qzeros``/``scales`` (the prepared matrix keeps
        its own copy); forward keeps working."""
        self.qweight = self.qzeros = self.scales = None

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, w_bit={self.w_bit}, "
            f"group_size={self.group_size}, bias={self._bias is not None}, device={self.device}"
        )
