"""``gemm(x, qm)``: x @ W + bias for a quantized matrix, on the GPU kernels or the float32 reference.

The boundary (torch, CuPy or NumPy arrays in and out, checks), the CPU reference path and the dense path
(dequantise into scratch + cuBLAS); which kernel runs is a launch plan of cupyq.plans, launched by cupyq.launch."""

from __future__ import annotations

import warnings

import numpy as np

from cupyq import kernels
from cupyq.arrays import array_kind
from cupyq.device import torch_stream
from cupyq.formats.common import dtype_name
from cupyq.launch import (
    _gather_columns, _launch_lock, _launch_plan, _launch_qgemm, _plan_for, dequantize_into, dequantize_t_into,
)
from cupyq.qmatrix import QMatrix
from cupyq.rules import dense_threshold
from cupyq.scratch import default_scratch, workspace

_warned_cpu = False
REFERENCE_DTYPES = ("float16", "bfloat16", "float32", "float64")  # x dtypes of the CPU path
_Tensor = None  # torch.Tensor once a torch tensor came through the checked path (torch stays an optional import)
_NO_PATHS: dict = {}


def gemm(x, qm: QMatrix, out=None, *, force_cuda: bool = False):
    """``x @ W + bias`` for a quantized matrix.

    x: [..., K] float16 or bfloat16 (GPU), contiguous; torch CUDA tensor or CuPy array on the matrix's device.
       NumPy arrays (or CPU torch tensors) with a CPU matrix run the float32 reference; the result has x's dtype.
    qm: a :class:`~cupyq.QMatrix`.
    out: optional output [..., N] of x's dtype and kind (contiguous), written in place and returned.
    force_cuda: always use the quantized kernel, for any number of rows (default: batches of more than
       :func:`dense_threshold` rows dequantise into scratch and call the dense matmul, in row chunks when the
       scratch is smaller than the matrix; a scratch too small for one chunk of 64 rows falls back to the
       quantized kernel).
    Returns [..., N] of the same kind (torch -> torch, CuPy -> CuPy, NumPy -> NumPy) and dtype as x. GPU kernels
    launch on torch's current stream for torch tensors and on CuPy's current stream for CuPy arrays.
    """
    if type(x) is _Tensor:
        # Eager calls repeat: a shape and dtype that passed every check before runs its cached fast path, which
        # checks the rest (device, contiguity, out) and hands anything unusual back to the checked path below.
        path = getattr(qm, "_fast_paths", _NO_PATHS).get((x.shape, x.dtype))
        if path is not None:
            y = path.run(qm, x, out)
            if y is not None:
                return y
    if not isinstance(qm, QMatrix):
        raise TypeError(f"qm: expected a cupyq.QMatrix, got {type(qm).__name__}")
    kind = array_kind(x)
    if kind == "numpy" and not isinstance(x, np.ndarray):
        raise TypeError(f"x: expected a torch tensor, a CuPy array or a NumPy array, got {type(x).__name__}")
    if kind == "torch":
        if x.device.type != "cuda":
            return _gemm_reference(x, qm, out, kind)
        return _gemm_torch(x, qm, out, force_cuda)
    if kind == "cupy":
        return _gemm_cupy(x, qm, out, force_cuda)
    return _gemm_reference(x, qm, out, kind)


# ------------------------------------------------------------------------------------------------ checks
def _check_input(x, qm: QMatrix, on_gpu: bool):
    if qm.device_id is None and on_gpu:
        raise ValueError("qm: the matrix lives on the CPU but x is on a GPU; build it with device='cuda:N'")
    if x.ndim < 1 or x.shape[-1] != qm.in_features:
        raise ValueError(f"x: expected shape (..., {qm.in_features}), got {tuple(x.shape)}")


_KIND_NAMES = {"torch": "a torch tensor", "cupy": "a CuPy array", "numpy": "a NumPy array"}


def _array_description(a) -> str:
    """What ``a`` is, for a message: "a torch tensor", "a CuPy array", "a NumPy array", or its type's name."""
    kind = array_kind(a)
    is_array = isinstance(a, np.ndarray) if kind == "numpy" else hasattr(a, "shape") and hasattr(a, "dtype")
    return _KIND_NAMES[kind] if is_array else type(a).__name__


def _check_out(out, x, qm: QMatrix, is_contiguous):
    wanted, got = _array_description(x), _array_description(out)
    if got != wanted:
        raise TypeError(f"out: expected an array of x's kind ({wanted}), got {got}")
    expected = tuple(x.shape[:-1]) + (qm.out_features,)
    if tuple(out.shape) != expected:
        raise ValueError(f"out: expected shape {expected}, got {tuple(out.shape)}")
    if out.dtype != x.dtype:
        raise TypeError(f"out: expected dtype {x.dtype}, got {out.dtype}")
    if not is_contiguous(out):
        raise ValueError("out: expected a contiguous array")


# ------------------------------------------------------------------------------------------------ CPU
def _gemm_reference(x, qm: QMatrix, out, kind):
    global _warned_cpu
    if qm.device_id is not None:
        raise ValueError(f"x: the matrix lives on cuda:{qm.device_id}; expected a CUDA tensor or CuPy array")
    _check_input(x, qm, on_gpu=False)
    # One dtype rule for torch and NumPy: a torch float8 x, say, would otherwise run and come back in float8.
    if dtype_name(x) not in REFERENCE_DTYPES:
        raise TypeError(f"x: expected a floating dtype ({', '.join(REFERENCE_DTYPES)}), got {dtype_name(x)}")
    if out is not None:
        _check_out(out, x, qm, (lambda t: t.is_contiguous()) if kind == "torch" else (lambda a: a.flags.c_contiguous))
    if not _warned_cpu:
        warnings.warn("cupyq: no GPU kernel ran; the product was computed by the float32 reference", RuntimeWarning,
                      stacklevel=3)
        _warned_cpu = True
    if kind == "torch":
        import torch

        x_np = x.detach().float().numpy()
        y = torch.from_numpy(qm.reference_product(x_np)).to(x.dtype)
        if out is not None:
            out.copy_(y)
            return out
        return y
    y = qm.reference_product(x).astype(x.dtype, copy=False)
    if out is not None:
        out[...] = y
        return out
    return y


# ------------------------------------------------------------------------------------------------ GPU
_torch_ctypes: dict = {}


def _torch_ctype(dtype):
    """Kernel element type of a torch dtype, or None (cached per dtype object: ``str(dtype)`` is slow)."""
    ctype = _torch_ctypes.get(dtype)
    if ctype is None and dtype not in _torch_ctypes:
        ctype = _torch_ctypes[dtype] = kernels.CTYPES.get(str(dtype).removeprefix("torch."))
    return ctype


def _gemm_torch(x, qm: QMatrix, out, force_cuda):
    global _Tensor
    import torch

    _Tensor = torch.Tensor
    _check_input(x, qm, on_gpu=True)
    ctype = _torch_ctype(x.dtype)
    if ctype is None:
        raise TypeError(f"x: expected dtype float16 or bfloat16, got {x.dtype}")
    if not x.is_contiguous():
        raise ValueError("x: expected a contiguous tensor (call .contiguous())")
    dev = x.get_device()
    if dev != qm.device_id:
        raise ValueError(f"x: expected a tensor on cuda:{qm.device_id}, got {x.device}")
    n = qm.out_features
    m = x.numel() // qm.in_features
    if out is None:
        out = torch.empty(x.shape[:-1] + (n,), dtype=x.dtype, device=x.device)
    else:
        _check_out(out, x, qm, lambda t: t.is_contiguous())
        if out.device != x.device:
            raise ValueError(f"out: expected a tensor on {x.device}, got {out.device}")
    if m == 0:
        return out
    stream = torch_stream(dev)
    dense = m > dense_threshold(qm) and not force_cuda
    capturing = torch.cuda.is_current_stream_capturing
    if not (dense and _dense(x.view(m, qm.in_features), out.view(m, n), qm, ctype, stream,
                             _TorchDense(qm, ctype, x.dtype), capturing)):
        _launch_qgemm(qm, x.data_ptr(), out.data_ptr(), m, ctype, stream, capturing)
        if m <= dense_threshold(qm) and type(x) is torch.Tensor:
            _add_fast_path(torch, qm, x, ctype, dev)
    return out


# ------------------------------------------------------------------------------------------------ fast path
MAX_FAST_PATHS = 256  # per matrix, one per (x.shape, x.dtype) seen: batch shapes up to the dense threshold


def _add_fast_path(torch, qm: QMatrix, x, ctype: str, dev: int):
    paths = qm._fast_paths
    key = (x.shape, x.dtype)
    if key not in paths and len(paths) < MAX_FAST_PATHS:
        m = x.numel() // qm.in_features
        out_shape = torch.Size(tuple(x.shape[:-1]) + (qm.out_features,))
        paths[key] = _TorchFastPath(torch, _plan_for(qm, m, ctype), m, ctype, x.dtype, out_shape, dev)


class _TorchFastPath:
    """``gemm`` for one (matrix, x.shape, x.dtype) that has passed the checks of :func:`_gemm_torch` once, on the
    quantized kernel (batches of at most :func:`dense_threshold` rows).

    Per call it checks what the key does not fix (x's device and contiguity, out's kind, dtype, shape,
    contiguity and device) with plain comparisons and returns None when any differs, so that the checked path
    raises its usual error; it reads torch's current stream as a raw handle (CuPy stream objects and workspaces
    cached per handle) and launches the cached plan under the launch lock, as the checked path does.
    """

    __slots__ = ("device", "m", "ctype", "dtype", "out_shape", "plan", "raw_stream",
                 "capturing", "streams")

    def __init__(self, torch, plan, m: int, ctype: str, dtype, out_shape, dev: int):
        self.device = dev
        self.m = m
        self.ctype = ctype
        self.dtype = dtype
        self.out_shape = out_shape
        self.plan = plan
        self.raw_stream = _raw_stream_reader(torch)
        self.capturing = torch.cuda.is_current_stream_capturing
        self.streams = {}  # raw stream handle -> (CuPy stream, workspace)

    def run(self, qm: QMatrix, x, out):
        """out (allocated when None) = x @ W + bias; None, having done nothing, when a check fails."""
        dev = self.device
        if x.get_device() != dev or not x.is_contiguous():
            return None
        if out is None:
            out = x.new_empty(self.out_shape)  # x's dtype and device: 0.9 us less host time than torch.empty(...)
        elif (type(out) is not _Tensor or out.dtype is not self.dtype or out.shape != self.out_shape
              or not out.is_contiguous() or out.get_device() != dev):
            return None
        ptr = self.raw_stream(dev)
        found = self.streams.get(ptr)
        if found is None:
            found = self.streams[ptr] = (torch_stream(dev), workspace(dev, ptr, self.capturing))
        _launch_plan(qm, self.plan, x.data_ptr(), out.data_ptr(), self.m, self.ctype, found[0], self.capturing,
                     found[1])
        return out


def _raw_stream_reader(torch):
    """device index -> raw handle of torch's current stream there (an int, without building a Stream object
    where torch offers that)."""
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if raw is not None:
        return raw
    return lambda dev: torch.cuda.current_stream(dev).cuda_stream


def _gemm_cupy(x, qm: QMatrix, out, force_cuda):
    import cupy

    _check_input(x, qm, on_gpu=True)
    ctype = kernels.CTYPES.get(str(x.dtype))
    if ctype is None:
        raise TypeError(f"x: expected dtype float16 (CuPy), got {x.dtype}")
    if not x.flags.c_contiguous:
        raise ValueError("x: expected a C-contiguous array (cupy.ascontiguousarray)")
    if x.device.id != qm.device_id:
        raise ValueError(f"x: expected an array on device {qm.device_id}, got device {x.device.id}")
    n = qm.out_features
    m = x.size // qm.in_features
    with cupy.cuda.Device(qm.device_id):
        if out is None:
            out = cupy.empty(x.shape[:-1] + (n,), dtype=x.dtype)
        else:
            _check_out(out, x, qm, lambda a: a.flags.c_contiguous)
        if m == 0:
            return out
        stream = cupy.cuda.get_current_stream()
        dense = m > dense_threshold(qm) and not force_cuda
        if not (dense and _dense(x.reshape(m, qm.in_features), out.reshape(m, n), qm, ctype, stream,
                                 _CupyDense(qm), stream.is_capturing)):
            _launch_qgemm(qm, x.data.ptr, out.data.ptr, m, ctype, stream, stream.is_capturing)
    return out


def _dense_buffers(qm: QMatrix, m: int, stream_ptr: int, capturing):
    """(scratch uint8 CuPy buffer, bytes of gathered activations at its start, rows of W^T per chunk), or None
    when the scratch cannot hold one chunk of 64 rows next to the gathered activations."""
    lay = qm.layout
    gathered = -(-(m * lay.padded_rows * 2) // 256) * 256 if lay.row_src is not None else 0
    column_bytes = lay.padded_cols * 2
    full = gathered + lay.padded_rows * column_bytes
    buf = qm._scratch if qm._scratch is not None else default_scratch(qm.device_id, full, stream_ptr, capturing)
    rows = (buf.size - gathered) // column_bytes // 64 * 64
    if rows < 64:
        return None
    return buf, gathered, min(rows, lay.padded_rows)


def _half_view(buf, offset: int, rows: int, cols: int):
    return buf[offset: offset + rows * cols * 2].view(np.float16).reshape(rows, cols)


class _CudaArray:
    """Exposes a CuPy array through ``__cuda_array_interface__`` version 2 (no stream field): torch wraps it
    without the cross-stream synchronisation DLPack performs, which would break CUDA-graph capture."""

    def __init__(self, a):
        self.__cuda_array_interface__ = {
            "shape": tuple(a.shape), "typestr": a.dtype.str, "data": (int(a.data.ptr), False),
            "strides": tuple(a.strides), "version": 2,
        }


def _torch_view(torch, a, dtype):
    t = torch.as_tensor(_CudaArray(a), device=torch.device("cuda", a.device.id))
    return t.view(dtype) if dtype == torch.bfloat16 else t


class _TorchDense:
    """The dense products of the dequantise path on torch tensors (fp16 or bf16), through cuBLAS."""

    def __init__(self, qm: QMatrix, ctype: str, dtype):
        import torch

        self.torch, self.dtype = torch, dtype
        self.bias = None
        if qm._bias_host is not None:
            self.bias = self.wrap(qm.bias16 if ctype == "__half" else qm.bias_bf16.view(np.float16))

    def wrap(self, a):
        return _torch_view(self.torch, a, self.dtype)

    @staticmethod
    def ptr(x) -> int:
        return x.data_ptr()

    def product(self, x, w, out, *, accumulate=False, bias=False):
        """out = x @ w (+ bias), or out += x @ w."""
        if accumulate:
            out.addmm_(x, w)
        elif bias and self.bias is not None:
            self.torch.addmm(self.bias, x, w, out=out)
        else:
            self.torch.mm(x, w, out=out)

    def add_bias(self, out):
        if self.bias is not None:
            out.add_(self.bias)


class _CupyDense:
    """The same on CuPy arrays (fp16), through cupy.matmul."""

    def __init__(self, qm: QMatrix):
        self.bias = qm.bias16

    @staticmethod
    def wrap(a):
        return a

    @staticmethod
    def ptr(x) -> int:
        return x.data.ptr

    def product(self, x, w, out, *, accumulate=False, bias=False):
        import cupy

        if accumulate:
            out += cupy.matmul(x, w)
            return
        cupy.matmul(x, w, out=out)
        if bias:
            self.add_bias(out)

    def add_bias(self, out):
        if self.bias is not None:
            out += self.bias


def _dense(x2, out2, qm: QMatrix, ctype: str, stream, ops, capturing) -> bool:
    """out2 = x2 @ W + bias by dequantising into scratch and dense products (``ops``: _TorchDense or _CupyDense):
    W^T in sorted padded row order (in chunks of rows when the scratch is smaller than the matrix, activations
    gathered into the same order for permuted matrices), or W in original row order for a permuted matrix that
    fits whole. Returns False, having done nothing, when the scratch cannot hold one chunk of 64 rows."""
    found = _dense_buffers(qm, x2.shape[0], stream.ptr, capturing)
    if found is None:
        return False
    # The stream's scratch holds gathered activations and dequantised weights from the first launch to the
    # last product: threads sharing the stream must not interleave their launches in between.
    with _launch_lock:
        _dense_launches(x2, out2, qm, ctype, stream, ops, found)
    return True


def _dense_launches(x2, out2, qm: QMatrix, ctype: str, stream, ops, found):
    lay = qm.layout
    n = qm.out_features
    m = x2.shape[0]
    buf, offset, rows = found
    if lay.row_src is not None and buf.size >= qm.in_features * lay.padded_cols * 2:
        # Permuted rows, whole matrix in scratch: W in original row order, so x needs no gather (gathering a
        # large batch costs more than it saves).
        w = _half_view(buf, 0, qm.in_features, lay.padded_cols)
        dequantize_into(qm, w, ctype, stream)
        ops.product(x2, ops.wrap(w)[:, :n], out2, bias=True)
        return
    xs = x2
    if lay.row_src is not None:  # sorted, padded activations to pair with the sorted weight rows
        g = _half_view(buf, 0, m, lay.padded_rows)
        _gather_columns(qm, ops.ptr(x2), int(g.data.ptr), m, ctype, stream)
        xs = ops.wrap(g)
    chunks = lay.chunks8 + lay.chunks4
    step = rows // 64
    for c0 in range(0, chunks, step):
        c1 = min(chunks, c0 + step)
        wt = _half_view(buf, offset, lay.padded_cols, rows)
        dequantize_t_into(qm, wt, ctype, stream, c0, c1)
        r0, r1 = c0 * 64, min(c1 * 64, xs.shape[1])
        w = ops.wrap(wt)[:n, : r1 - r0].T
        ops.product(xs[:, r0:r1], w, out2, accumulate=c0 > 0, bias=c1 == chunks and c0 == 0)
    if chunks > step:
        ops.add_bias(out2)


