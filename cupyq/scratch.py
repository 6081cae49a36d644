"""Device memory the GEMM paths take from CuPy's memory pool: split-K partial sums and tile counters, the buffer
of gathered activations, and the dequantisation scratch of matrices given none of their own.

All of it belongs to one (device, stream) :class:`Workspace`: launches on different streams (or from threads
using different streams) never share partial sums, counters, gathered activations or dequantised weights, and
launches on one stream are ordered by the stream. Buffers grow outside CUDA-graph capture only. A stream first
seen while it captures a graph (``torch.cuda.graph`` captures on a stream of its own) takes the device's spare
workspace, which every growth outside capture keeps as large as the largest workspace of the device; so a
layer run once before capture (or warmed up with ``QMatrix.warmup``) can be captured on any stream.

Serving code hands out its own scratch slices (``cupyq.exllamav2.ExLlamaV2DeviceTensors``), which it must not
use from two streams at once.
"""

from __future__ import annotations

import os
import threading
from typing import NamedTuple

import numpy as np

from cupyq.formats.common import is_int

ALIGNMENT = 128
SCRATCH_ALIGN = ALIGNMENT  # bytes; every scratch slice starts and ends on this boundary
DEFAULT_SCRATCH_BYTES = int(os.environ.get("CUPYQ_SCRATCH_BYTES", 512 * 1024 * 1024))
MIN_DEQUANT_ROWS = 256  # dequantised rows per chunk never go below this (small max_total_tokens)

_CAPTURE_HINT = "run the layer once (or QMatrix.warmup) with the largest batch before capturing"


def _round_up(n: int, m: int = ALIGNMENT) -> int:
    return -(-int(n) // m) * m


def _check_size(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}: expected an int number of bytes, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name}: expected a non-negative number of bytes, got {value}")
    return int(value)


class Workspace:
    """The buffers of one (device, stream); see the module docstring."""

    def __init__(self, device: int):
        self.device = device
        self.partials = None
        self.counters = None
        self.gathered = None
        self.scratch_buf = None
        self.version = 0  # counts replacements of the buffers (launch plans keep pointers into them)

    def sizes(self) -> tuple:
        """(partial floats, counters, gathered halves, scratch bytes) held now."""
        return tuple(0 if a is None else int(a.size) for a in (self.partials, self.counters, self.gathered,
                                                               self.scratch_buf))

    def ensure(self, partial_floats: int, counters: int, capturing):
        """(partials, counters) CuPy arrays of at least the given sizes; ``capturing()`` tells whether a CUDA
        graph is being captured (asked only when the buffers must grow)."""
        if (self.partials is None or self.partials.size < partial_floats
                or self.counters is None or self.counters.size < counters):
            self._grow(capturing, "the GEMM workspace", partial_floats, counters, 0, 0)
        return self.partials, self.counters

    def gather_buffer(self, halves: int, capturing):
        """A CuPy float16 buffer of at least ``halves`` elements for activations in sorted row order."""
        if self.gathered is None or self.gathered.size < halves:
            self._grow(capturing, "the activation buffer", 0, 0, halves, 0)
        return self.gathered

    def scratch(self, needed_bytes: int, capturing):
        """A uint8 CuPy buffer of min(needed_bytes, DEFAULT_SCRATCH_BYTES) bytes or more, for the dequantise
        path of matrices that were given no scratch of their own."""
        size = min(_round_up(needed_bytes), _round_up(DEFAULT_SCRATCH_BYTES))
        if self.scratch_buf is None or self.scratch_buf.size < size:
            self._grow(capturing, "the dequantisation scratch", 0, 0, 0, size)
        return self.scratch_buf

    def _grow(self, capturing, what: str, partial_floats: int, counters: int, halves: int, scratch_bytes: int):
        if capturing():
            # Take over the spare's buffers (no allocation): it is kept as large as any workspace of the device.
            need = [max(a, b) for a, b in zip(self.sizes(), (partial_floats, counters, halves, scratch_bytes))]
            with _lock:
                spare = _spares.get(self.device)
                if spare is not None and all(h >= n for h, n in zip(spare.sizes(), need)):
                    del _spares[self.device]
                    _retired.append(self._buffers())
                    self.partials, self.counters, self.gathered, self.scratch_buf = spare._buffers()
                    self.version += 1
                    return
            raise RuntimeError(f"cupyq: {what} must grow while a CUDA graph is being captured; {_CAPTURE_HINT}")
        with _lock:
            self._grow_to((partial_floats, counters, halves, scratch_bytes))
            spare = _spares.get(self.device)
            if spare is None:
                spare = _spares[self.device] = Workspace(self.device)
            largest = [0, 0, 0, 0]
            for (dev, _), ws in _workspaces.items():
                if dev == self.device:
                    largest = [max(a, b) for a, b in zip(largest, ws.sizes())]
            spare._grow_to([max(a, b) for a, b in zip(largest, self.sizes())])

    def _buffers(self) -> tuple:
        return (self.partials, self.counters, self.gathered, self.scratch_buf)

    def _grow_to(self, sizes):
        import cupy

        want = [max(a, b) for a, b in zip(self.sizes(), sizes)]
        if want == list(self.sizes()):
            return
        with cupy.cuda.Device(self.device):
            # Kernels already queued may still use the old buffers: let them finish before the pool can hand
            # their memory out again, and zero new counters before any launch can read them.
            cupy.cuda.Device(self.device).synchronize()
            _retired.append(self._buffers())
            have = self.sizes()
            if want[0] > have[0]:
                self.partials = cupy.empty(max(want[0], 1 << 16), dtype=cupy.float32)
            if want[1] > have[1]:
                self.counters = cupy.zeros(max(want[1], 1024), dtype=cupy.int32)
            if want[2] > have[2]:
                self.gathered = cupy.empty(max(want[2], 1 << 16), dtype=cupy.float16)
            if want[3] > have[3]:
                self.scratch_buf = cupy.empty(want[3], dtype=cupy.uint8)
            self.version += 1
            cupy.cuda.Device(self.device).synchronize()


_workspaces: dict = {}
_spares: dict = {}
# Buffers replaced by larger ones stay allocated: a captured CUDA graph may still point at them.
_retired: list = []
_lock = threading.RLock()


def workspace(device: int, stream_ptr: int = 0, capturing=lambda: False) -> Workspace:
    """The workspace of a (device, stream); ``stream_ptr`` is the raw CUDA stream handle. A stream seen for the
    first time while ``capturing()`` takes the device's spare workspace."""
    key = (device, stream_ptr)
    ws = _workspaces.get(key)
    if ws is None:
        with _lock:
            ws = _workspaces.get(key)
            if ws is None:
                if capturing():
                    ws = _spares.pop(device, None)
                    if ws is None:
                        raise RuntimeError("cupyq: a stream that captures a CUDA graph needs a workspace; "
                                           + _CAPTURE_HINT)
                else:
                    ws = Workspace(device)
                _workspaces[key] = ws
    return ws


def default_scratch(device: int, needed_bytes: int, stream_ptr: int = 0, capturing=lambda: False):
    """The dequantisation scratch of the (device, stream) workspace: see :meth:`Workspace.scratch`."""
    return workspace(device, stream_ptr, capturing).scratch(needed_bytes, capturing)


# ------------------------------------------------------------------------------------------------------------
# The dense path's buffer (dispatch._dense_buffers): gathered activations rounded to 256 bytes, then dequantised rows

class ScratchNeed(NamedTuple):
    """What one layer's large-m path needs from the dequantisation scratch (bytes).

    full_bytes: a whole fp16 dequantised copy (+128): with that much, no chunking at all.
    row_bytes: one dequantised row in the chunked path (padded output width * 2).
    gather_bytes: per input row of x, the activations gathered into sorted row order first (layers
        with a row permutation: act-order GPTQ, most EXL2), else 0.
    """

    full_bytes: int
    row_bytes: int
    gather_bytes: int


def scratch_need(qm) -> ScratchNeed:
    """The :class:`ScratchNeed` of a ``cupyq.QMatrix`` (a CPU matrix has no device layout: its figures are
    those the layout would have)."""
    layout = getattr(qm, "layout", None)
    if layout is None:
        cols, rows, gathers = _round_up(qm.out_features, 16), _round_up(qm.in_features, 64), bool(qm.act_order)
    else:
        cols, rows, gathers = layout.padded_cols, layout.padded_rows, layout.row_src is not None
    return ScratchNeed(int(qm.dequant_scratch_bytes), cols * 2, rows * 2 if gathers else 0)


def check_token_bound(max_total_tokens) -> int | None:
    """``max_total_tokens`` (the most rows of x one forward sees) as an int, or None for no bound; TypeError /
    ValueError naming it for anything but None or a positive int."""
    if max_total_tokens is None:
        return None
    if not is_int(max_total_tokens):
        raise TypeError(f"max_total_tokens: expected an int or None, got {type(max_total_tokens).__name__}")
    if max_total_tokens <= 0:
        raise ValueError(f"max_total_tokens: expected a positive number of tokens, got {max_total_tokens}")
    return int(max_total_tokens)


def dequant_scratch_budget(needs, max_total_tokens=None) -> int:
    """Bytes of dequantisation scratch for layers that share one region.

    needs: one :class:`ScratchNeed` per layer; max_total_tokens: the most rows of x one forward sees
    (``None``: no token bound, every layer gets its full copy).

    With a token bound ``T`` a layer gets at most what it needs to dequantise ``R = max(2T,
    MIN_DEQUANT_ROWS)`` rows (rounded up to 64) per chunk after gathering ``T`` rows of activations:
    ``min(full_bytes, ceil256(T * gather_bytes) + 256 + R * row_bytes + 128)``. ``R * row_bytes`` is
    about the ``4 * T * N`` bytes the original module reserved per layer as (unused) forward scratch;
    a chunk of at least ``2 * m`` rows keeps the dense matmul of ``m`` input rows efficient. The result
    is the largest per-layer figure rounded up to 128.
    """
    needs = [ScratchNeed(*(_check_size("needs", int(v)) for v in need)) for need in needs]
    tokens = check_token_bound(max_total_tokens)
    if not needs:
        return 0
    if tokens is None:
        return _round_up(max(n.full_bytes for n in needs), SCRATCH_ALIGN)
    rows = _round_up(max(2 * tokens, MIN_DEQUANT_ROWS), 64)
    per_layer = [
        min(n.full_bytes, _round_up(tokens * n.gather_bytes, 256) + 256 + rows * n.row_bytes + SCRATCH_ALIGN)
        for n in needs
    ]
    return _round_up(max(per_layer), SCRATCH_ALIGN)
