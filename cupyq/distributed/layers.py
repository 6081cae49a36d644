"""Column- and row-parallel quantized linear modules over a torch.distributed process group."""

from __future__ import annotations

from cupyq.device import require_torch

torch = require_torch("cupyq.distributed (tensor parallelism)")
import torch.distributed as dist

from cupyq.formats.bias import check_bias
from cupyq.torch_ops import QuantizedLinear, apply_qgemm

__all__ = ["ColumnParallelQuantLinear", "RowParallelQuantLinear", "group_rank_and_size"]

# all_gather_single is the newer name of all_gather_into_tensor (same arguments).
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def group_rank_and_size(group=None) -> tuple:
    """``(rank, world_size)`` of this process in ``group`` (None: the default group); ``(0, 1)`` when
    torch.distributed is not initialised. Raises ValueError when this process is not a member of ``group``
    (torch gives it rank -1: its layers would compute a part that no collective sums)."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise RuntimeError("group: torch.distributed is not initialised (call init_process_group first)")
        return 0, 1
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"group: this process (global rank {dist.get_rank()}) is not a member of the process group "
                         "(build the layers only on its members)")
    return rank, dist.get_world_size(group)


class ColumnParallelQuantLinear(QuantizedLinear):
    """A column-parallel quantized linear layer: this rank's outputs ``y[..., r*N/W:(r+1)*N/W]``.

    qm: the rank's :class:`cupyq.QMatrix` (a column shard, its bias slice included), K inputs by N/W outputs.
    gather_output: False (default) returns the local outputs ``[..., N/W]``, as the layer feeding a
        row-parallel one wants; True all-gathers them into ``[..., N]`` (one gather into a new tensor and one
        reordering copy).
    group: the process group (None: the default group). force_cuda: as in QuantizedLinear.
    ``forward(x)``: x ``[..., K]`` (whole on every rank) -> ``[..., N/W]`` or ``[..., N]`` in x's dtype. The
    gather is a collective: every rank passes x of the same shape and dtype (nothing checks it, which would
    cost a second collective per call).
    """

    def __init__(self, qm, *, gather_output: bool = False, group=None, force_cuda: bool = False):
        super().__init__(qm, force_cuda=force_cuda)
        self.group = group
        self.rank, self.world_size = group_rank_and_size(group)
        self.gather_output = bool(gather_output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = apply_qgemm(x, self.handle, self.force_cuda)
        if not self.gather_output or self.world_size == 1:
            return y
        rows = y.numel() // self.out_features
        parts = y.new_empty((self.world_size * rows, self.out_features))
        _all_gather(parts, y.view(rows, self.out_features), group=self.group)
        whole = parts.view(self.world_size, rows, self.out_features).transpose(0, 1)
        return whole.reshape(*y.shape[:-1], self.world_size * self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, world_size={self.world_size}, gather_output={self.gather_output}"


class RowParallelQuantLinear(QuantizedLinear):
    """A row-parallel quantized linear layer: ``y = sum over ranks of x_r @ W_r``, then ``+ bias``.

    qm: the rank's :class:`cupyq.QMatrix` (a row shard without bias), K/W inputs by N outputs.
    bias: float ``[N]`` tensor or None, added once after the sum (a buffer: ``.to()`` moves and casts it;
        keep it in the activations' dtype); checked by the rule of every QMatrix bias
        (:func:`cupyq.formats.bias.check_bias`: TypeError or ValueError naming ``bias``).
    input_is_parallel: True (default): x is the rank's slice ``[..., K/W]`` (the output of a column-parallel
        layer); False: x is whole ``[..., K]`` and the rank takes its columns (one copy).
    reduce_results: False leaves the partial product unsummed and the bias unadded (for callers that fuse the
        reduce with something else).
    group: the process group (None: the default group).
    ``forward``: the quantized product into a new tensor, an in-place ``torch.distributed.all_reduce`` (SUM) on
    it, an in-place bias add: no host synchronisation and no allocation besides the output, so it can be
    captured in a CUDA graph with an NCCL group.
    """

    def __init__(self, qm, bias=None, *, input_is_parallel: bool = True, reduce_results: bool = True, group=None,
                 force_cuda: bool = False):
        super().__init__(qm, force_cuda=force_cuda)
        if getattr(qm, "bias", None) is not None:
            raise ValueError("qm: a row shard must not hold the bias (it would be added once per rank); pass bias=")
        self.group = group
        self.rank, self.world_size = group_rank_and_size(group)
        self.input_is_parallel = bool(input_is_parallel)
        self.reduce_results = bool(reduce_results)
        if bias is not None:
            check_bias(bias, self.out_features)  # the rule of every QMatrix bias: float [N], finite, fp16 range
            bias = torch.as_tensor(bias).detach()
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            k = self.in_features
            if x.shape[-1] != k * self.world_size:
                raise ValueError(f"x: expected shape [..., {k * self.world_size}] (whole input), got {tuple(x.shape)}")
            x = x[..., self.rank * k : (self.rank + 1) * k].contiguous()
        y = apply_qgemm(x, self.handle, self.force_cuda)
        if not self.reduce_results:
            return y
        if self.world_size > 1:
            dist.all_reduce(y, group=self.group)
        if self.bias is not None:
            y.add_(self.bias)
        return y

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, rank={self.rank}, world_size={self.world_size}, "
                f"input_is_parallel={self.input_is_parallel}, bias={self.bias is not None}")
