"""QMatrix: a prepared quantized matrix (GPTQ, EXL2 or AWQ). The builders return a :class:`GpuQMatrix` (the
kernels' device layout, launch plans, workspaces) or a :class:`CpuQMatrix` (the checkpoint tensors for the float32
reference path), both QMatrix. The three classes share this module (about 500 lines) because the builders, which
validate each format once, pick the type and fill it."""

from __future__ import annotations

import numpy as np

from cupyq import launch as _launch
from cupyq import layout as _layout
from cupyq import reference
from cupyq import rules as _rules
from cupyq.arrays import array_kind, host_copy, resolve_device, to_bf16_bits, to_cupy
from cupyq.formats import awq as _awq
from cupyq.formats import exl2 as _exl2
from cupyq.formats import gptq as _gptq
from cupyq.formats.bias import check_bias
from cupyq.formats.exl2 import exl2_out_features

DEQUANTIZE_DTYPES = ("float16", "bfloat16")


class QMatrix:
    """A quantized weight W [in_features, out_features] ready for :func:`cupyq.gemm`.

    Build it with :meth:`from_gptq`, :meth:`from_exl2` or :meth:`from_awq`, which return a :class:`GpuQMatrix`
    (a device copy of the weights in the kernels' layout; the caller's arrays are never modified and need not
    stay alive) or, for tensors and ``device`` on the CPU, a :class:`CpuQMatrix` (the checkpoint tensors as
    NumPy arrays for the float32 reference path). Both answer the methods below.

    Facts of every format, with the same types: ``format`` ("gptq", "exl2", "awq"), ``in_features``,
    ``out_features``, ``bits`` (tuple of the stored widths, widest first), ``group_sizes`` (dict width -> rows per
    group; -1 for one group over all rows), ``group_size`` (int: the rows per group, the smallest where EXL2
    widths differ; -1 for one group), ``act_order`` (bool: rows permuted), ``bits_per_weight`` (float),
    ``device_id`` (int, None on the CPU).
    """

    def __init__(self):
        raise TypeError("use QMatrix.from_gptq(...), QMatrix.from_exl2(...) or QMatrix.from_awq(...)")

    @classmethod
    def _new(cls, device_id, input_kind) -> "QMatrix":
        """An empty matrix of the type that lives on ``device_id`` (None: the CPU)."""
        kind = CpuQMatrix if device_id is None else GpuQMatrix
        if not issubclass(kind, cls):
            where = "the CPU" if device_id is None else f"cuda:{device_id}"
            raise ValueError(f"device: {cls.__name__} cannot live on {where}; build it with QMatrix.from_...(), "
                             f"which picks the type, or pass device= for the other")
        self = object.__new__(kind)
        self.device_id, self.input_kind = device_id, input_kind
        return self

    # -------------------------------------------------------------------------------------------- builders
    @classmethod
    def from_gptq(
        cls,
        qweight,
        qzeros,
        scales,
        g_idx=None,
        bias=None,
        *,
        bits: int = 4,
        checkpoint_format: str = "gptq",
        v1_encoding: str = "field",
        group_size=None,
        device=None,
    ) -> "QMatrix":
        """Prepare a GPTQ matrix.

        qweight: int32 [K*bits/32, N], input rows packed down the columns (3-bit: bit stream).
        qzeros: int32 [G, N*bits/32], zero points packed along the columns; v1 ("gptq") stores zero - 1,
            v2 ("gptq_v2") the zero itself.
        scales: float16/bfloat16/float32 [G, N].
        g_idx: int32/int64 [K] group of each input row (act-order when not monotonic), or None for
            k // group_size.
        bias: float [N] or None (as :func:`cupyq.formats.bias.check_bias` accepts it).
        bits: 2, 3, 4 or 8. v1_encoding: how v1 zeros were written, "field" or "word"
            (:mod:`cupyq.formats.gptq`; ignored for v2).
        group_size: rows per group (-1: one group), checked against G. Without g_idx it is needed unless
            the shapes fix it (one group, or a single size s with ceil(K / s) == G); else ValueError naming
            ``group_size`` (several sizes give the same G, e.g. 100..199 for 200 rows in 2 groups).
        device: None (where the tensors are; NumPy -> CPU), "cpu", an int or "cuda:N".
        Arrays may be NumPy, CuPy or torch; none is modified, and none is referenced afterwards.
        """
        layout = _gptq.check_gptq(qweight, qzeros, scales, g_idx, bits, group_size)
        if checkpoint_format not in ("gptq", "gptq_v2"):
            raise ValueError(f"checkpoint_format: expected 'gptq' or 'gptq_v2', got {checkpoint_format!r}")
        if v1_encoding not in _gptq.V1_ENCODINGS:
            raise ValueError(f"v1_encoding: expected one of {_gptq.V1_ENCODINGS}, got {v1_encoding!r}")
        if g_idx is None or group_size is not None:
            group_size = _gptq.check_group_size(layout.in_features, layout.groups, group_size)
        self = cls._new(*resolve_device((qweight, qzeros, scales, g_idx, bias), device))
        self.format = "gptq"
        self.in_features = layout.in_features
        self.out_features = layout.out_features
        self.bits = (int(bits),)
        self.checkpoint_format = checkpoint_format
        self.v1_encoding = v1_encoding
        self._bpw = float(bits)
        groups = layout.groups
        g_host = reference.to_numpy(g_idx)
        if g_host is None:
            g_host = _gptq.default_g_idx(self.in_features, group_size)
        g_host = g_host.astype(np.int64)
        self.act_order = bool(np.any(np.diff(g_host) < 0))
        if group_size is None:  # g_idx given: every group but a partial last one holds group_size rows
            group_size = -1 if groups == 1 else int(np.bincount(g_host, minlength=groups).max())
        self.group_sizes = {self.bits[0]: group_size}
        self._init_bias(bias)
        if self.device_id is None:
            self._cpu = dict(
                qweight=host_copy(qweight),
                qzeros=host_copy(qzeros),
                scales=reference.to_numpy(scales).astype(np.float32),
                g_idx=g_host.astype(np.int32),
            )
            return self
        import cupy

        with cupy.cuda.Device(self.device_id):
            perm, row_group, storage8 = _layout.gptq_rows(g_host, bits)
            q = _gptq.unpack_qweight(to_cupy(qweight, self.device_id), bits, xp=cupy)
            zeros = _gptq.unpack_qzeros(
                to_cupy(qzeros, self.device_id), bits, self.out_features, checkpoint_format=checkpoint_format,
                v1_encoding=v1_encoding, xp=cupy,
            )
            s = to_cupy(scales, self.device_id)
            q_sorted = q if perm is None else q[cupy.asarray(perm)]
            self._build(q_sorted, perm, row_group, storage8, s, zeros)
        return self

    @classmethod
    def from_exl2(
        cls, q_weight, q_invperm, q_scale, q_scale_max, q_groups, bias=None, *, device=None, in_features=None,
        out_features=None,
    ) -> "QMatrix":
        """Prepare an EXL2 matrix.

        q_weight: int32 [Q, N] rows in sorted order, each group a little-endian bit stream of its width.
        q_invperm: int16/int32/int64 [K], sorted position of each original row.
        q_scale: int32 [G, N/8] 4-bit scale codes packed along the columns; q_scale_max: float16 [G] (as
        stored, before any division by 256); q_groups: int16 [2G] pairs (bits, first packed row), widths in
        descending order. bias: float [out_features] or None (as :func:`cupyq.formats.bias.check_bias` accepts it). Arrays may be
        NumPy, CuPy or torch; none is modified.
        out_features: the layer's true width, at most N and above N - 32 (q_weight's last columns are then
        padding, ignored: quantizers pad N to a multiple of 32); None: the length of a bias shorter than N,
        else N. The matrix's ``out_features``, gemm's output and ``dequantize`` have this width.
        in_features: None (K), or fewer rows: original rows ``in_features..K-1`` are padding, which must
        dequantise to zero (stored as ``2**(bits-1)``); they read no input. Row shards of a permuted layer
        use them to fill groups to whole packing units (:func:`cupyq.distributed.shard_exl2`).
        """
        layout = _exl2.check_exl2(q_weight, q_invperm, q_scale, q_scale_max, q_groups)
        padded = _exl2_padding_rows(layout, in_features, q_weight, q_invperm)
        self = cls._new(*resolve_device((q_weight, q_invperm, q_scale, q_scale_max, bias), device))
        self.format = "exl2"
        self.in_features = layout.in_features - padded
        self.out_features = exl2_out_features(layout.out_features, bias, out_features)
        groups = list(layout.groups)
        self.bits = tuple(sorted({g.bits for g in groups}, reverse=True))
        self._bpw = sum(g.rows * g.bits for g in groups) / layout.in_features
        self.group_sizes = {}
        for g in groups:
            self.group_sizes.setdefault(g.bits, g.rows)
        perm = _exl2.perm_from_invperm(reference.to_numpy(q_invperm)).astype(np.int64)
        self.act_order = not np.array_equal(perm, np.arange(layout.in_features))
        perm[perm >= self.in_features] = -1  # padding rows: the kernels read a zero activation for them
        self._init_bias(bias)
        if self.device_id is None:
            self._cpu = dict(
                q_weight=host_copy(q_weight),
                q_invperm=host_copy(q_invperm),
                q_scale=host_copy(q_scale),
                q_scale_max=host_copy(q_scale_max),
                q_groups=host_copy(q_groups),
            )
            return self
        import cupy

        with cupy.cuda.Device(self.device_id):
            q_sorted = _exl2.unpack_q_weight(to_cupy(q_weight, self.device_id), groups, xp=cupy)[:, : self.out_features]
            scales = _exl2.decode_scales(
                to_cupy(q_scale, self.device_id), to_cupy(q_scale_max, self.device_id), xp=cupy
            )[:, : self.out_features]
            row_group, storage8 = _layout.exl2_rows(groups)
            zero_of_group = cupy.asarray([1 << (g.bits - 1) for g in groups], dtype=cupy.int32)
            zeros = cupy.broadcast_to(zero_of_group[:, None], scales.shape)
            self._build(q_sorted, perm, row_group, storage8, scales, zeros)
            self.layout.in_features = self.in_features
        return self

    @classmethod
    def from_awq(cls, qweight, qzeros, scales, bias=None, *, group_size, device=None) -> "QMatrix":
        """Prepare an AWQ (AutoAWQ GEMM-packed, 4-bit) matrix.

        qweight: int32 [K, N/8], outputs packed along the columns in the order 0, 2, 4, 6, 1, 3, 5, 7
            (see :mod:`cupyq.formats.awq`); qzeros: int32 [K/group_size, N/8] packed the same way, zero
            points stored as they are; scales: float16/bfloat16/float32 [K/group_size, N]; bias: float [N]
            or None (as :func:`cupyq.formats.bias.check_bias` accepts it). group_size: rows per group (dividing K), or -1 for one group.
        device: None (where the tensors are; NumPy -> CPU), "cpu", an int or "cuda:N".
        Arrays may be NumPy, CuPy or torch; none is modified, and none is referenced afterwards. On a GPU the
        matrix runs the same kernels as a GPTQ matrix without act-order (sequential groups, integer zero points).
        """
        layout = _awq.check_awq(qweight, qzeros, scales, group_size)
        self = cls._new(*resolve_device((qweight, qzeros, scales, bias), device))
        self.format = "awq"
        self.in_features = layout.in_features
        self.out_features = layout.out_features
        self.bits = (layout.bits,)
        self.checkpoint_format = None
        self._bpw = float(layout.bits)
        self.act_order = False
        self.group_sizes = {self.bits[0]: -1 if layout.groups == 1 else layout.group_size}
        self._init_bias(bias)
        if self.device_id is None:
            self._cpu = dict(
                qweight=host_copy(qweight),
                qzeros=host_copy(qzeros),
                scales=reference.to_numpy(scales).astype(np.float32),
            )
            return self
        import cupy

        with cupy.cuda.Device(self.device_id):
            rows = _awq.awq_rows(
                to_cupy(qweight, self.device_id), to_cupy(qzeros, self.device_id), to_cupy(scales, self.device_id),
                group_size, xp=cupy,
            )
            self._build(rows.q, None, rows.row_group, rows.storage8, rows.scales, rows.zeros)
        return self

    def _init_bias(self, bias):
        self._bias_host = None if bias is None else check_bias(bias, self.out_features)

    # -------------------------------------------------------------------------------------------- facts
    @property
    def is_cuda(self) -> bool:
        """True when the matrix lives on a GPU."""
        return self.device_id is not None

    @property
    def bias(self):
        """float32 NumPy [N] copy of the bias, or None."""
        return None if self._bias_host is None else self._bias_host.copy()

    @property
    def shape(self) -> tuple:
        """(in_features, out_features)."""
        return (self.in_features, self.out_features)

    @property
    def group_size(self) -> int:
        """Rows per group (-1: one group over all rows); the smallest of ``group_sizes`` where EXL2 widths differ."""
        return min(self.group_sizes.values())

    @property
    def bits_per_weight(self) -> float:
        """Average stored bits per weight (EXL2 mixes widths; GPTQ: ``bits``)."""
        return self._bpw

    def __repr__(self):
        where = "cpu" if self.device_id is None else f"cuda:{self.device_id}"
        return (
            f"QMatrix(format={self.format!r}, in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, act_order={self.act_order}, device={where!r})"
        )

    # -------------------------------------------------------------------------------------------- data
    # Implemented by both types: dequant_scratch_bytes, reference_weight, reference_product, dequantize,
    # set_scratch, warmup, needed_kernels, close.


class CpuQMatrix(QMatrix):
    """A QMatrix on the CPU: the checkpoint tensors as NumPy arrays (``_cpu``), multiplied by the float32
    reference (:mod:`cupyq.reference`)."""

    @property
    def dequant_scratch_bytes(self) -> int:
        """Bytes of a full fp16 dequantised copy ([K, N]), plus 128."""
        return self.in_features * self.out_features * 2 + 128

    def reference_weight(self) -> np.ndarray:
        """float32 NumPy [K, N] dequantised weight in original row order: the float32 reference."""
        c = self._cpu
        if self.format == "gptq":
            return reference.dequantize_gptq(
                c["qweight"], c["qzeros"], c["scales"], c["g_idx"], bits=self.bits[0],
                checkpoint_format=self.checkpoint_format, v1_encoding=self.v1_encoding,
            )
        if self.format == "awq":
            return reference.dequantize_awq(c["qweight"], c["qzeros"], c["scales"], group_size=self.group_size)
        w = reference.dequantize_exl2(c["q_weight"], c["q_invperm"], c["q_scale"], c["q_scale_max"], c["q_groups"])
        return np.ascontiguousarray(w[: self.in_features, : self.out_features])

    def reference_product(self, x, *, block_rows=None) -> np.ndarray:
        """float32 NumPy ``x @ W + bias``, W dequantised a block of rows at a time.

        x: float [..., K] (NumPy or CPU torch). Memory beyond x and the result is one block of float32
        rows (about 16 MiB, or ``block_rows`` rows); no copy of W is kept. Equals
        ``reference.matmul(x, self.reference_weight(), self.bias)`` up to float32 rounding of the sums.
        """
        c = self._cpu
        if self.format == "gptq":
            return reference.matmul_gptq(
                x, c["qweight"], c["qzeros"], c["scales"], c["g_idx"], self._bias_host, bits=self.bits[0],
                checkpoint_format=self.checkpoint_format, v1_encoding=self.v1_encoding, block_rows=block_rows,
            )
        if self.format == "awq":
            return reference.matmul_awq(x, c["qweight"], c["qzeros"], c["scales"], self._bias_host,
                                        group_size=self.group_size, block_rows=block_rows)
        rows = c["q_invperm"].shape[0]
        if rows > self.in_features:  # padding rows (see from_exl2) meet zero activations
            x = reference.to_numpy(x)
            x = np.concatenate([x, np.zeros(x.shape[:-1] + (rows - self.in_features,), x.dtype)], axis=-1)
        stored = c["q_weight"].shape[1]
        bias = self._bias_host
        if bias is not None and stored > self.out_features:  # padding columns (see from_exl2), dropped below
            bias = np.concatenate([bias, np.zeros(stored - self.out_features, np.float32)])
        y = reference.matmul_exl2(
            x, c["q_weight"], c["q_invperm"], c["q_scale"], c["q_scale_max"], c["q_groups"], bias,
            block_rows=block_rows,
        )
        return y if stored == self.out_features else np.ascontiguousarray(y[..., : self.out_features])

    def dequantize(self, dtype="float16"):
        """The float32 reference weight [K, N] in original row order, rounded to ``dtype`` (float16 or bfloat16,
        as :func:`dequantize_dtype` reads it; the meaning of GpuQMatrix.dequantize): a torch tensor when the
        matrix was built from torch tensors, else a NumPy array (bfloat16 as its int16 bit pattern)."""
        name = dequantize_dtype(dtype)
        w = self.reference_weight()
        if self.input_kind == "torch":
            import torch

            t = torch.from_numpy(w)
            return t.to(torch.bfloat16) if name == "bfloat16" else t.to(torch.float16)
        return to_bf16_bits(w) if name == "bfloat16" else w.astype(np.float16)

    def layout_shape(self) -> _layout.LayoutShape:
        """The sizes the device layout of this matrix would have (:class:`cupyq.layout.LayoutShape`), worked out
        on the CPU from the row plan alone (groups and storage widths; no weight is unpacked): what
        :func:`cupyq.rules.explain` reads for a CPU matrix."""
        c = self._cpu
        if self.format == "exl2":
            groups = _exl2.parse_q_groups(c["q_groups"], c["q_weight"].shape[0], c["q_invperm"].shape[0])
            row_group, storage8 = _layout.exl2_rows(groups)
        else:
            g_idx = c["g_idx"] if self.format == "gptq" else _gptq.default_g_idx(self.in_features, self.group_size)
            _, row_group, storage8 = _layout.gptq_rows(g_idx, self.bits[0])
        shape = _layout.layout_shape(row_group, storage8, self.out_features)
        shape.in_features = self.in_features  # EXL2 padding rows are in the plan, not in the input (from_exl2)
        return shape

    def set_scratch(self, buf):
        """Nothing to do: the reference path needs no scratch."""

    def warmup(self, *, max_m: int = 64, dtypes=("float16",)):
        """Nothing to do: the reference path compiles nothing."""

    def needed_kernels(self, *, max_m: int = 64, dtypes=("float16",)) -> set:
        """The empty set: no kernel runs on the CPU."""
        return set()

    def close(self):
        """Nothing to release."""


class GpuQMatrix(QMatrix):
    """A QMatrix on a GPU: the weights in the kernels' device layout (``layout``, :mod:`cupyq.layout`), the bias
    in fp16 and bf16 (``bias16``, ``bias_bf16``), and what the launches cache: ``_plans`` (launch plans by batch
    and element type, :mod:`cupyq.plans`; facts worked out once, :mod:`cupyq.rules`), ``_fast_paths`` (eager torch
    calls by input shape and dtype, :mod:`cupyq.dispatch`) and ``_scratch`` (a caller's scratch, or None)."""

    def _build(self, q_sorted, perm, row_group, storage8, scales, zeros):
        import cupy

        self.layout = _layout.build_layout(q_sorted, perm, row_group, storage8, scales, zeros, cupy)
        self.bias16 = self.bias_bf16 = None
        if self._bias_host is not None:
            self.bias16 = cupy.asarray(self._bias_host.astype(np.float16))
            self.bias_bf16 = cupy.asarray(to_bf16_bits(self._bias_host))
        self._plans = {}
        self._fast_paths = {}  # eager torch calls by (x.shape, x.dtype): cupyq.dispatch._TorchFastPath
        self._scratch = None

    def __reduce_ex__(self, protocol):
        """Refused (TypeError): device buffers and launch plans cannot be restored from a pickle."""
        raise TypeError(
            f"a QMatrix on cuda:{self.device_id} cannot be pickled or copied (its weights are device buffers in the "
            "kernels' layout): save a model's quantized layers with cupyq.checkpoint.save_gptq / save_exl2 / "
            "save_awq, or keep the checkpoint directory and load it again (cupyq.patch_model); CPU matrices pickle"
        )

    @property
    def dequant_scratch_bytes(self) -> int:
        """Bytes of a full fp16 dequantised copy as the large-batch path stores it (W^T in padded row and
        column order), plus 128."""
        return self.layout.padded_rows * self.layout.padded_cols * 2 + 128

    def reference_weight(self) -> np.ndarray:
        """float32 NumPy [K, N] dequantised weight in original row order: the fp16 dequantise kernel's output,
        widened to float32."""
        return self.dequantize_cupy(np.float16).get().astype(np.float32)

    def reference_product(self, x, *, block_rows=None) -> np.ndarray:
        """Not available on a GPU matrix (the float32 reference runs on CPU matrices): raises ValueError."""
        raise ValueError(f"reference_product: the matrix lives on cuda:{self.device_id}; use cupyq.gemm")

    def dequantize(self, dtype="float16"):
        """The dequantised weight [K, N] in original row order, float16 or bfloat16 (as :func:`dequantize_dtype`
        reads ``dtype``): a torch tensor when the matrix was built from torch tensors, else a CuPy array
        (bfloat16 as its int16 bit pattern)."""
        bf16 = dequantize_dtype(dtype) == "bfloat16"
        w = self.dequantize_cupy(dtype)
        if self.input_kind == "torch":
            import torch

            t = torch.from_dlpack(w)
            return t.view(torch.bfloat16) if bf16 else t
        return w

    def dequantize_cupy(self, dtype="float16"):
        """The dequantised weight as a CuPy array [K, N], float16 or bfloat16 (as :func:`dequantize_dtype` reads
        ``dtype``; bfloat16 returned as its int16 bit pattern)."""
        import cupy

        with cupy.cuda.Device(self.device_id):
            ctype = "__nv_bfloat16" if dequantize_dtype(dtype) == "bfloat16" else "__half"
            buf = cupy.empty((self.in_features, self.layout.padded_cols), dtype=np.float16 if ctype == "__half" else np.int16)
            _launch.dequantize_into(self, buf, ctype, cupy.cuda.get_current_stream())
            return cupy.ascontiguousarray(buf[:, : self.out_features])

    def set_scratch(self, buf):
        """Use ``buf`` (CuPy uint8 array or CUDA torch tensor) as scratch for the large-batch path; None: the
        stream's default scratch again."""
        if buf is None:
            self._scratch = None
            return
        if array_kind(buf) == "torch":
            import cupy

            buf = cupy.from_dlpack(buf.detach().view(-1).view(__import__("torch").uint8))
        self._scratch = buf.view(np.uint8).reshape(-1)

    def warmup(self, *, max_m: int = 64, dtypes=("float16",)):
        """Compile and load every kernel this matrix uses for batches up to ``max_m`` and size the workspace."""
        _launch.warmup_matrix(self, max_m=max_m, dtypes=dtypes)

    def needed_kernels(self, *, max_m: int = 64, dtypes=("float16",)) -> set:
        """(CUDA source, kernel name) of every kernel this matrix uses for batches up to ``max_m``; nothing is
        compiled."""
        return _rules.needed_kernels(self, max_m=max_m, dtypes=dtypes)

    def close(self):
        """Release the device buffers now (the matrix is unusable afterwards)."""
        for name in ("layout", "bias16", "bias_bf16", "_scratch"):
            if hasattr(self, name):
                setattr(self, name, None)
        self._plans = {}
        self._fast_paths = {}


def _exl2_padding_rows(layout, in_features, q_weight, q_invperm) -> int:
    """How many trailing original rows of an EXL2 layer are padding (see ``QMatrix.from_exl2``); checks that
    they dequantise to zero."""
    total = layout.in_features
    if in_features is None:
        return 0
    if isinstance(in_features, bool) or not isinstance(in_features, (int, np.integer)) or not 1 <= in_features <= total:
        raise ValueError(f"in_features: expected 1..{total} (the rows of q_invperm), got {in_features!r}")
    if in_features == total:
        return 0
    inv = reference.to_numpy(q_invperm).astype(np.int64) & (0xFFFF if str(q_invperm.dtype).endswith("int16") else -1)
    pad_rows = inv[int(in_features):]
    words = reference.to_numpy(q_weight)
    for g in layout.groups:
        mine = pad_rows[(pad_rows >= g.row_start) & (pad_rows < g.row_start + g.rows)] - g.row_start
        if mine.size:
            q = reference._fields(words, g.bits, 32 * g.qrow_start + g.bits * mine.astype(np.int64))
            if np.any(q != 1 << (g.bits - 1)):
                raise ValueError(
                    f"q_weight: padding rows (original rows {int(in_features)}..{total - 1}) must hold the zero "
                    f"value {1 << (g.bits - 1)} of their {g.bits}-bit group"
                )
    return total - int(in_features)


def dequantize_dtype(dtype) -> str:
    """"float16" or "bfloat16": the element type ``dequantize`` produces for ``dtype`` (a name such as
    ``"bfloat16"`` or ``"torch.bfloat16"``, a NumPy dtype or type, or a torch dtype). Raises ValueError for any
    other, listing the accepted ones (the float32 weight is ``reference_weight()``)."""
    name = dtype if isinstance(dtype, str) else str(dtype)
    if not isinstance(dtype, str) and type(dtype).__module__.split(".", 1)[0] != "torch":
        try:
            name = np.dtype(dtype).name
        except TypeError:
            pass
    name = name.removeprefix("torch.")
    if name not in DEQUANTIZE_DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(DEQUANTIZE_DTYPES)} (a name, NumPy or torch dtype; "
                         f"the float32 weight is reference_weight()), got {dtype!r}")
    return name
