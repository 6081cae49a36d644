"""Device memory the GEMM paths take from CuPy's memory pool: the split-K workspace, the buffer of gathered
activations, and the default dequantisation scratch of matrices given none of their own.

Serving code hands out its own scratch slices (``cupyq.exllamav2.ExLlamaV2DeviceTensors``)."""

from __future__ import annotations

import os

ALIGNMENT = 128
DEFAULT_SCRATCH_BYTES = int(os.environ.get("CUPYQ_SCRATCH_BYTES", 512 * 1024 * 1024))


def _round_up(n: int, m: int = ALIGNMENT) -> int:
    return -(-int(n) // m) * m


def _device_index(device) -> int:
    if device is None:
        import cupy

        return cupy.cuda.runtime.getDevice()
    if isinstance(device, int):
        return device
    index = None if isinstance(device, str) else getattr(device, "index", None)  # torch.device (str.index is a method)
    if index is not None:
        return int(index)
    text = str(device)
    if text.startswith("cuda"):
        return int(text.split(":", 1)[1]) if ":" in text else 0
    raise ValueError(f"device: expected a CUDA device (int, 'cuda:N' or torch.device), got {device!r}")


class Workspace:
    """Per-device buffers of the quantized GEMM: fp32 split-K partial sums and the zeroed tile counters the
    kernel resets itself. Grows outside of graph capture only."""

    def __init__(self, device: int):
        self.device = device
        self.partials = None
        self.counters = None
        self.gathered = None

    def ensure(self, partial_floats: int, counters: int, capturing):
        """(partials, counters) CuPy arrays of at least the given sizes; ``capturing()`` tells whether a CUDA
        graph is being captured (asked only when the buffers must grow)."""
        import cupy

        grow_p = self.partials is None or self.partials.size < partial_floats
        grow_c = self.counters is None or self.counters.size < counters
        if not (grow_p or grow_c):
            return self.partials, self.counters
        if capturing():
            raise RuntimeError(
                "cupyq: the GEMM workspace must grow while a CUDA graph is being captured; run the layer once "
                "(or QMatrix.warmup) with the largest batch before capturing"
            )
        with cupy.cuda.Device(self.device):
            if grow_p:
                self.partials = cupy.empty(max(partial_floats, 1 << 16), dtype=cupy.float32)
            if grow_c:
                self.counters = cupy.zeros(max(counters, 1024), dtype=cupy.int32)
            cupy.cuda.Device(self.device).synchronize()
        return self.partials, self.counters


    def gather_buffer(self, halves: int, capturing):
        """A CuPy float16 buffer of at least ``halves`` elements for activations in sorted row order."""
        import cupy

        buf = self.gathered
        if buf is None or buf.size < halves:
            if capturing():
                raise RuntimeError(
                    "cupyq: the activation buffer must grow while a CUDA graph is being captured; run the layer "
                    "once (or QMatrix.warmup) with the largest batch before capturing"
                )
            with cupy.cuda.Device(self.device):
                buf = self.gathered = cupy.empty(max(halves, 1 << 16), dtype=cupy.float16)
        return buf


_workspaces: dict = {}
_default_scratch: dict = {}


def workspace(device: int) -> Workspace:
    """The GEMM workspace of a device."""
    ws = _workspaces.get(device)
    if ws is None:
        ws = _workspaces[device] = Workspace(device)
    return ws


def default_scratch(device: int, needed_bytes: int):
    """A uint8 CuPy buffer of min(needed_bytes, DEFAULT_SCRATCH_BYTES) bytes on ``device`` for the dequantise
    path of matrices that were given no scratch of their own (grown on demand up to the bound)."""
    import cupy

    size = min(_round_up(needed_bytes), _round_up(DEFAULT_SCRATCH_BYTES))
    buf = _default_scratch.get(device)
    if buf is None or buf.size < size:
        with cupy.cuda.Device(device):
            buf = cupy.empty(size, dtype=cupy.uint8)
        _default_scratch[device] = buf
    return buf
