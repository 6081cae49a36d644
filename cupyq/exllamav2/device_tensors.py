"""The scratch buffer of one device for the exllamav2-compatible module: distinct slices for the caller and one
shared dequantisation region for the large-m path of every layer (:class:`ExLlamaV2DeviceTensors`).
"""

from __future__ import annotations

import torch

from cupyq.scratch import SCRATCH_ALIGN, _check_size, _round_up


def normalise_device(device) -> torch.device:
    """``torch.device`` of ``device`` (device, string or index), a bare ``cuda`` resolved to the current index."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


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
        self.device = normalise_device(device)
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
