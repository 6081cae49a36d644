"""Array kinds, conversions and device resolution shared by the front ends: which library an array belongs to
(torch, CuPy or NumPy), where a matrix's tensors live, zero-copy CuPy views, host copies, the one float32 -> bfloat16
rounding rule, and what a ``device=`` argument names."""

from __future__ import annotations

import numpy as np

from cupyq import reference
from cupyq.device import check_device_supported


def array_kind(a) -> str:
    """The library of an array: "torch", "cupy", or "numpy" for anything else."""
    mod = type(a).__module__.split(".", 1)[0]
    if mod == "torch":
        return "torch"
    if mod == "cupy":
        return "cupy"
    return "numpy"


def resolve_device(arrays, device):
    """(device_id or None for CPU, kind of the input arrays)."""
    present = [a for a in arrays if a is not None]
    kinds = {array_kind(a) for a in present}
    kind = "torch" if "torch" in kinds else "cupy" if "cupy" in kinds else "numpy"
    if device is not None:
        text = str(device)
        if text == "cpu":
            return None, kind
        return check_device_supported(device_index(device)), kind
    for a in present:
        k = array_kind(a)
        if k == "cupy":
            return int(a.device.id), kind
        if k == "torch" and a.device.type == "cuda":
            return int(a.device.index or 0), kind
    return None, kind


def to_cupy(a, device_id):
    """A CuPy array on device_id holding the data of a (zero-copy for CUDA torch/CuPy arrays on that device)."""
    import cupy

    if a is None:
        return None
    with cupy.cuda.Device(device_id):
        if array_kind(a) == "torch":
            import torch

            t = a.detach()
            if t.dtype == torch.bfloat16:
                t = t.float()
            if t.device.type == "cuda" and (t.device.index or 0) == device_id:
                return cupy.from_dlpack(t.contiguous())
            return cupy.asarray(t.cpu().numpy())
        if array_kind(a) == "cupy":
            return a if a.device.id == device_id else cupy.asarray(a.get())
        return cupy.asarray(np.asarray(a))


def host_copy(a):
    """A NumPy array of its own holding the data of a (NumPy, CPU torch or CuPy array)."""
    return np.array(reference.to_numpy(a), copy=True)


def to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (int16) of float32 values, rounded to nearest even."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return rounded.astype(np.uint16).view(np.int16)


def device_index(device) -> int:
    """The CUDA device index of ``device``: an int, ``"cuda"`` (the current device), ``"cuda:N"``, a
    ``torch.device`` of type cuda, or a CuPy ``Device``; None means the current CuPy device. Anything else is a
    ValueError naming what came."""
    if device is None or str(device) == "cuda" or (getattr(device, "type", None) == "cuda" and device.index is None):
        import cupy

        return cupy.cuda.runtime.getDevice()
    if isinstance(device, bool):
        raise ValueError(f"device: expected a CUDA device (int, 'cuda', 'cuda:N', torch.device), got {device!r}")
    if isinstance(device, int):
        if device < 0:
            raise ValueError(f"device: expected a non-negative device index, got {device}")
        return device
    if getattr(device, "type", None) == "cuda" and isinstance(device.index, int):  # torch.device
        return int(device.index)
    if type(device).__module__.startswith("cupy") and isinstance(getattr(device, "id", None), int):  # cupy Device
        return int(device.id)
    text = str(device)
    if text.startswith("cuda:") and text[5:].isdigit():
        return int(text[5:])
    raise ValueError(f"device: expected a CUDA device (int, 'cuda', 'cuda:N', torch.device or a CuPy Device), "
                     f"got {device!r}")
