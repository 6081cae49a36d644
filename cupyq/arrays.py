"""Array kinds, conversions and device resolution shared by the front ends: which library an array belongs to
(torch, CuPy or NumPy), where a matrix's tensors live, zero-copy CuPy views, host copies, the one float32 -> bfloat16
rounding rule, and what a ``device=`` argument names."""

from __future__ import annotations

import re

import numpy as np

from cupyq import reference
from cupyq.device import check_device_supported, current_device


def array_kind(a) -> str:
    """The library of an array: "torch", "cupy", or "numpy" for anything else."""
    mod = type(a).__module__.split(".", 1)[0]
    if mod == "torch":
        return "torch"
    if mod == "cupy":
        return "cupy"
    return "numpy"


def resolve_device(arrays, device):
    """(device_id or None for CPU, kind of the input arrays): ``device`` as :func:`requested_device` resolves it,
    or where the arrays are when it is None (a CUDA torch or CuPy array; the CPU otherwise)."""
    present = [a for a in arrays if a is not None]
    kinds = {array_kind(a) for a in present}
    kind = "torch" if "torch" in kinds else "cupy" if "cupy" in kinds else "numpy"
    if device is not None:
        return requested_device(device), kind
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


# torch's device string grammar: a lower-case type, optionally ":" and an index without sign or leading zeros.
_DEVICE_STRING = re.compile(r"([a-z]+)(?::(0|[1-9][0-9]*))?")
_ACCEPTED = "'cpu', 'cpu:0', an int, 'cuda', 'cuda:N', a torch.device or a CuPy Device"


def requested_device(device):
    """What a ``device=`` argument names: None for the CPU, otherwise a CUDA device index that the kernels can use.

    The CPU is ``"cpu"``, ``"cpu:0"``, ``torch.device("cpu")`` or ``torch.device("cpu", 0)``; CUDA devices are
    spelled as :func:`device_index` takes them. Strings follow torch's spelling (lower case). Raises SetupError
    (:func:`cupyq.device.check_device_supported`) when no usable GPU is there, ValueError for anything else.
    """
    parsed = _type_and_index(device)
    if parsed is not None and parsed[0] == "cpu":
        if parsed[1] not in (None, 0):
            raise ValueError(f"device: the CPU is device 'cpu' or 'cpu:0' (there is no other), got {device!r}")
        return None
    return check_device_supported(device_index(device))


def _type_and_index(device):
    """(type, index or None) of a device string in torch's spelling or of a torch.device; None for anything else."""
    if isinstance(device, str):
        match = _DEVICE_STRING.fullmatch(device)
        return None if match is None else (match[1], None if match[2] is None else int(match[2]))
    if type(device).__module__ == "torch" and isinstance(getattr(device, "type", None), str):  # torch.device
        return device.type, device.index
    return None


def device_index(device) -> int:
    """The CUDA device index of ``device``: an int, ``"cuda"`` (the current device), ``"cuda:N"``, a
    ``torch.device`` of type cuda, or a CuPy ``Device``; None means the current CuPy device, which is asked only
    when a GPU is usable (:func:`cupyq.device.current_device`, else SetupError). Anything else (the meta device
    included) is a ValueError naming what came and what to pass."""
    parsed = _type_and_index(device)
    if device is None or parsed == ("cuda", None):
        return current_device()
    if isinstance(device, (int, np.integer)) and not isinstance(device, bool):
        if device < 0:
            raise ValueError(f"device: expected a non-negative device index, got {device}")
        return int(device)
    if parsed is not None and parsed[0] == "cuda":
        return parsed[1]
    if type(device).__module__.startswith("cupy") and isinstance(getattr(device, "id", None), int):  # cupy Device
        return int(device.id)
    if parsed is not None and parsed[0] == "meta":
        raise ValueError(f"device: {device!r} is the meta device, which holds no data, so cupyq cannot put weights "
                         f"on it; pass 'cpu' (the float32 reference path) or a CUDA device ('cuda', 'cuda:N', an int)")
    lower_case = not isinstance(device, str) or device == device.lower()
    hint = "" if lower_case else " (device strings are lower case, as in torch)"
    raise ValueError(f"device: expected {_ACCEPTED}{hint}, got {device!r}")
