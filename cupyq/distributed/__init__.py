"""Tensor parallelism for cupyq layers on torch.distributed (NCCL on GPUs, gloo on the CPU).

Scheme (world size W, rank r, a layer ``y = x @ weight + bias`` with ``weight`` ``[K, N]``):

- **Column-parallel** layers (q/k/v, gate/up) split the outputs: rank r holds columns
  ``[r*N/W, (r+1)*N/W)`` and its bias slice and computes its slice of ``y`` from the whole ``x``. GPTQ and
  AWQ zero points are packed along the outputs, so a rank's width must fill whole words; the GPTQ row order
  (``g_idx``) and the EXL2 row permutation are shared by all columns and stay whole.
- **Row-parallel** layers (o, down) split the inputs: rank r holds the original input rows
  ``[r*K/W, (r+1)*K/W)``, exactly the slice of the activations that the column-parallel layer before it
  produced (``input_is_parallel``), computes the partial product ``x_r @ W_r``, and one all-reduce sums the
  partials; the bias is added once, after the sum.

  GPTQ without act-order: a rank's rows use a contiguous range of groups; the rank keeps those rows of
  ``qzeros``/``scales`` and ``g_idx`` is rebased to start at 0. GPTQ with act-order: ``g_idx`` is not
  monotonic, so every rank keeps its rows' *absolute* ``g_idx`` and all of ``qzeros``/``scales``. The rank's
  :class:`cupyq.QMatrix` then sorts its own rows by group, exactly as the act-order path does for a whole
  matrix, and gathers its own activation columns: the permutation never crosses ranks, so every rank runs
  the fast kernels.

  EXL2 stores rows sorted by width and importance (``q_invperm`` maps original row -> stored row). A rank's
  original rows map to a subset of stored rows spread over groups of several widths. The rank gets its own
  EXL2 layer: for every original group holding some of its rows, one group with the same scale codes and
  ``q_scale_max`` and those rows in stored order. The format requires every group but the last to fill whole
  packing units, so a group that does not is stored at its kernel storage width (4 bits for 2/3/4-bit values,
  8 for 5/6/8-bit ones: exact, and the device layout is the same) and completed with padding rows holding
  the zero value; they are original rows ``K/W ..`` of the shard and ``QMatrix.from_exl2(...,
  in_features=K/W)`` has the kernels read no activation for them. All of a rank's widths go into one
  matrix, sorted by group like any permuted EXL2 matrix.

- AWQ (GEMM layout, no ``g_idx``): column shards slice whole words of ``qweight``/``qzeros``; row shards
  must hold whole groups.

Modules: :func:`shard_gptq`, :func:`shard_exl2`, :func:`shard_awq` (NumPy, no torch needed) and
:class:`CheckpointLayer` (reads only a rank's slices from safetensors); :class:`ColumnParallelQuantLinear`,
:class:`RowParallelQuantLinear` and :func:`patch_model_tp` need torch.
"""

from cupyq.distributed.shard import MODES, CheckpointLayer, shard_awq, shard_exl2, shard_gptq, shard_range

__all__ = [
    "MODES",
    "CheckpointLayer",
    "shard_gptq",
    "shard_exl2",
    "shard_awq",
    "shard_range",
    "shard_qmatrix",
    "ColumnParallelQuantLinear",
    "RowParallelQuantLinear",
    "patch_model_tp",
]

_TORCH_NAMES = {
    "ColumnParallelQuantLinear": "cupyq.distributed.layers",
    "RowParallelQuantLinear": "cupyq.distributed.layers",
    "shard_qmatrix": "cupyq.distributed.patch",
    "patch_model_tp": "cupyq.distributed.patch",
}


def __getattr__(name):
    # torch is imported only when a module or the model patcher is asked for.
    if name in _TORCH_NAMES:
        import importlib

        return getattr(importlib.import_module(_TORCH_NAMES[name]), name)
    raise AttributeError(f"module 'cupyq.distributed' has no attribute {name!r}")
