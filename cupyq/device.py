"""The machine the kernels run on: whether a usable GPU is there (and if not, why), the CUDA versions a process
mixes, the per-device check of a QMatrix, device properties and torch's current stream as a CuPy stream.

Everything here works, and never raises on a missing library, without a GPU (``device_summary`` then has fewer
keys); only :func:`check_device_supported`, :func:`current_device` and :func:`require_cupy` raise
:class:`SetupError` by design (and :func:`require_torch` an ImportError).
"""

from __future__ import annotations

import warnings

# Oldest architecture the kernels compile for: they use cp.async, bf16 mma and ldmatrix (sm_80 and newer).
MIN_COMPUTE_CAPABILITY = (8, 0)
SUPPORTED_GPUS = "sm_80 and newer: A100, A30, A10, L4, L40, RTX 30xx/40xx/50xx, H100/H200, B200"


def gpu_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device. Never raises."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


INSTALL_HINT = (
    "pip install 'cupyq[cuda12]' or 'cupyq[cuda13]', the extra matching the CUDA major of torch.version.cuda "
    "and of the driver (nvidia-smi shows it)"
)


class SetupError(RuntimeError):
    """This machine cannot run what was asked: CuPy missing, no usable GPU, or a GPU older than sm_80."""


def require_cupy(what: str):
    """Import and return CuPy; SetupError naming ``what`` and the install command when it is missing."""
    try:
        import cupy
    except ImportError as exc:
        raise SetupError(f"{what} needs CuPy, which is not installed ({exc}); {INSTALL_HINT}") from None
    return cupy


def require_torch(what: str):
    """Import and return torch; ImportError naming ``what`` and the install command when it is missing (the torch
    front ends: :mod:`cupyq.torch_ops`, the drop-in modules, ``patch_model``, tensor parallelism)."""
    try:
        import torch
    except ImportError as exc:
        raise ImportError(f"{what} needs torch, which is not installed ({exc}): pip install torch") from None
    return torch


def gpu_unavailable_reason():
    """None when CuPy imports and sees a CUDA device; otherwise one sentence naming the cause and the fix."""
    try:
        import cupy
    except ImportError as exc:
        return f"CuPy is not installed ({exc}); {INSTALL_HINT}"
    try:
        driver = cupy.cuda.runtime.driverGetVersion()
    except Exception:
        driver = None
    if driver == 0:
        return "no NVIDIA driver found: the GPU kernels need an NVIDIA GPU and its driver (nvidia-smi lists them)"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        text = str(exc)
        if "InsufficientDriver" in text and driver:
            runtime_version = cuda_version_text(cupy.cuda.runtime.runtimeGetVersion())
            return (f"the NVIDIA driver supports CUDA {cuda_version_text(driver)} but CuPy uses the CUDA "
                    f"{runtime_version} runtime: update the driver or install the extra of the driver's CUDA "
                    f"major ({INSTALL_HINT})")
        return f"CuPy cannot reach a GPU: {text}"
    if count == 0:
        return "no CUDA device is visible (check CUDA_VISIBLE_DEVICES and nvidia-smi)"
    return None


def cuda_version_text(version: int) -> str:
    """``"12.8"`` from CUDA's integer version 12080; ``"none"`` for 0 (what the driver query gives without a
    driver)."""
    if version == 0:
        return "none"
    return f"{version // 1000}.{version % 1000 // 10}"


def cuda_majors() -> dict:
    """CUDA major versions this process would mix: ``torch`` (torch.version.cuda), ``cupy`` (CuPy's CUDA
    runtime) and ``nvrtc``; a key is absent when that library is missing or has no CUDA."""
    majors = {}
    try:
        import torch

        if torch.version.cuda:
            majors["torch"] = int(str(torch.version.cuda).split(".")[0])
    except Exception:
        pass
    try:
        import cupy

        majors["cupy"] = int(cupy.cuda.runtime.runtimeGetVersion()) // 1000
        from cupy_backends.cuda.libs import nvrtc

        majors["nvrtc"] = int(nvrtc.getVersion()[0])
    except Exception:
        pass
    return majors


def cuda_mismatch_message(majors=None):
    """None when every CUDA major in :func:`cuda_majors` agrees; otherwise a warning text with the fix."""
    majors = cuda_majors() if majors is None else majors
    if len(set(majors.values())) <= 1:
        return None
    found = ", ".join(f"{name} CUDA {major}" for name, major in majors.items())
    want = majors.get("torch", majors.get("cupy"))
    return (f"cupyq: CUDA major versions differ in this process ({found}): two CUDA runtimes in one process "
            f"can fail to load kernels or share memory. Install the cupyq extra matching torch.version.cuda: "
            f"pip install 'cupyq[cuda{want}]' (and uninstall the other cupy-cuda*x package)")


def _require_usable_gpu(device):
    """SetupError naming ``device`` (an index, or ``cuda``) and :func:`gpu_unavailable_reason` when no GPU is
    usable."""
    reason = gpu_unavailable_reason()
    if reason is not None:
        raise SetupError(f"device {device}: {reason}")


def current_device() -> int:
    """The index of CuPy's current CUDA device (what ``device="cuda"`` names), asked only when a GPU is usable:
    otherwise the SetupError of :func:`check_device_supported`, naming the device ``cuda``."""
    _require_usable_gpu("cuda")
    import cupy

    return cupy.cuda.runtime.getDevice()


_checked_devices: set = set()
_warned_mismatch = False


def check_device_supported(device_id: int) -> int:
    """``device_id`` back when it is a usable GPU the kernels support (compute capability 8.0 or newer).

    SetupError names the cause and the fix (CuPy missing, no driver, no device, an older GPU); ValueError
    for a device index that does not exist. Warns once per process when the CUDA majors of torch, CuPy and
    NVRTC differ. A device that passed is not asked again.
    """
    global _warned_mismatch
    if device_id in _checked_devices:
        return device_id
    _require_usable_gpu(device_id)
    import cupy

    count = cupy.cuda.runtime.getDeviceCount()
    if isinstance(device_id, bool) or not isinstance(device_id, int) or not 0 <= device_id < count:
        raise ValueError(f"device: expected a CUDA device index 0..{count - 1}, got {device_id!r}")
    props = cupy.cuda.runtime.getDeviceProperties(device_id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    if (props["major"], props["minor"]) < MIN_COMPUTE_CAPABILITY:
        raise SetupError(
            f"GPU {device_id} ({name}) has compute capability {props['major']}.{props['minor']}; cupyq's kernels "
            f"need 8.0 or newer ({SUPPORTED_GPUS})"
        )
    if not _warned_mismatch:
        _warned_mismatch = True
        message = cuda_mismatch_message()
        if message:
            warnings.warn(message, RuntimeWarning, stacklevel=3)
    _checked_devices.add(device_id)
    return device_id


def device_summary() -> dict:
    """GPUs, compute capabilities and library versions; works (with fewer keys) without a GPU."""
    info: dict = {"gpus": []}
    try:
        import cupy

        info["cupy"] = cupy.__version__
        try:
            info["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
            info["cuda_driver"] = cupy.cuda.runtime.driverGetVersion()
        except Exception:
            pass
        try:
            from cupy_backends.cuda.libs import nvrtc

            info["nvrtc"] = ".".join(map(str, nvrtc.getVersion()))
        except Exception:
            pass
        if gpu_available():
            for i in range(cupy.cuda.runtime.getDeviceCount()):
                p = cupy.cuda.runtime.getDeviceProperties(i)
                info["gpus"].append(
                    {
                        "index": i,
                        "name": p["name"].decode() if isinstance(p["name"], bytes) else str(p["name"]),
                        "compute_capability": f"{p['major']}.{p['minor']}",
                        "sms": p["multiProcessorCount"],
                        "memory_bytes": p["totalGlobalMem"],
                    }
                )
    except Exception:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
    except Exception:
        pass
    return info


_sm_counts: dict = {}


def sm_count(device_id: int) -> int:
    """Number of multiprocessors of a device (cached)."""
    n = _sm_counts.get(device_id)
    if n is None:
        import cupy

        n = cupy.cuda.runtime.getDeviceProperties(device_id)["multiProcessorCount"]
        _sm_counts[device_id] = n
    return n


_capabilities: dict = {}


def compute_capability(device_id) -> tuple:
    """(major, minor) compute capability of a device (cached); (0, 0) for ``None`` (a CPU matrix); that of the
    architecture for a key from :func:`architecture_key` (no device asked)."""
    cc = _capabilities.get(device_id)
    if cc is None:
        if device_id is None:
            return (0, 0)
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(device_id)
        cc = _capabilities[device_id] = (int(props["major"]), int(props["minor"]))
    return cc


def architecture_key(compute_capability) -> tuple:
    """A stand-in device id for an architecture ((major, minor), e.g. (9, 0)): :func:`compute_capability` gives
    back that architecture for it without asking any device, so that the dispatch rules can be worked out for a
    GPU that is not there (:func:`cupyq.rules.explain`). The key is ``("arch", major, minor)``."""
    major, minor = (int(v) for v in compute_capability)
    key = ("arch", major, minor)
    _capabilities[key] = (major, minor)
    return key


_external_streams: dict = {}


def _raw_torch_stream(device_id: int) -> int:
    import torch

    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # an int, without building a Stream object
    if raw is not None:
        return raw(device_id)
    return torch.cuda.current_stream(device_id).cuda_stream


def torch_stream(device_id: int):
    """A CuPy view of torch's current stream on ``device_id``, read now (never cached across calls)."""
    ptr = _raw_torch_stream(device_id)
    s = _external_streams.get((ptr, device_id))
    if s is None:
        import cupy

        # Wrapping objects are cached by pointer; which stream is current is read at every call.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            s = cupy.cuda.ExternalStream(ptr, device_id)
        _external_streams[(ptr, device_id)] = s
    return s
