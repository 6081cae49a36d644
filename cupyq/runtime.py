"""NVRTC compilation, the kernel module cache, stream resolution and launches.

Kernels live in ``cuda_src/*.cu`` and are compiled at run time: on a machine with a GPU through
``cupy.RawModule`` (cached on disk by CuPy, one compile per architecture and option set), and, for the
compile check, straight through NVRTC for any architecture on a machine without a GPU.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
import warnings
from pathlib import Path

from cupyq.sources import cuda_source_dir, read_cuda_source

# CUPYQ_NVRTC_OPTIONS adds compiler options (e.g. -D tuning macros of cuda_src) for experiments.
NVRTC_OPTIONS = ("--std=c++17",) + tuple(os.environ.get("CUPYQ_NVRTC_OPTIONS", "").split())

_DTYPES = ("__half", "__nv_bfloat16")
_STORAGES = ((False, True), (True, False), (True, True))  # (has 8-bit storage, has 4-bit storage)


def _b(v: bool) -> str:
    return "true" if v else "false"


def qgemv_name(ctype: str, mt: int, has8: bool, has4: bool) -> str:
    """Template instantiation name of the small-batch GEMM kernel (``mt`` m8 tiles of batch rows)."""
    return f"qgemv<{ctype}, {mt}, {_b(has8)}, {_b(has4)}>"


def dequant_name(ctype: str, has8: bool, has4: bool) -> str:
    """Template instantiation name of the dequantise kernel."""
    return f"dequant<{ctype}, {_b(has8)}, {_b(has4)}>"


def gather_name(ctype: str) -> str:
    """Template instantiation name of the activation gather kernel."""
    return f"gather_columns<{ctype}>"


def kernel_names(source: str) -> list[str]:
    """Every kernel instantiation a source file provides (what the compile check builds)."""
    if source == "qgemm.cu":
        names = [qgemv_name(t, 1, h8, h4) for t in _DTYPES for h8, h4 in _STORAGES]
        names.append(qgemv_name("__half", 2, False, True))  # two m8 tiles: fp16, 4-bit storage (dispatch.py)
        names += [dequant_name(t, h8, h4) for t in _DTYPES for h8, h4 in _STORAGES]
        names += [gather_name(t) for t in _DTYPES]
        return names
    if source == "qmma.cu":
        from cupyq import kernels

        return kernels.qmma_kernel_names()
    return []


class CompileError(RuntimeError):
    """NVRTC reported an error or a warning."""


@dataclasses.dataclass
class CompileReport:
    source: str
    arch: str
    seconds: float
    cubin_bytes: int
    kernels: list


def _normalise_arch(arch) -> str:
    a = str(arch).strip().lower()
    for prefix in ("sm_", "compute_"):
        if a.startswith(prefix):
            a = a[len(prefix):]
    a = a.replace(".", "")
    if not a[:2].isdigit():
        raise ValueError(f"arch: expected something like 'sm_80' or '90', got {arch!r}")
    return "sm_" + a


def _cuda_include_dirs() -> list[str]:
    dirs = []
    try:
        import cuda.pathfinder as pathfinder

        found = pathfinder.find_nvidia_header_directory("cudart")
        if found:
            dirs.append(str(found))
    except Exception:
        pass
    cuda_path = os.environ.get("CUDA_PATH") or os.environ.get("CUDA_HOME")
    if cuda_path and Path(cuda_path, "include").is_dir():
        dirs.append(str(Path(cuda_path, "include")))
    if not dirs and Path("/usr/local/cuda/include").is_dir():
        dirs.append("/usr/local/cuda/include")
    return dirs


def compile_sources(archs, *, sources=None, workers=None) -> list[CompileReport]:
    """Compile every CUDA source for each architecture with NVRTC; no GPU needed.

    archs: iterable of architectures such as ``"sm_80"``, ``"90"`` or ``"sm_90a"``.
    sources: file names inside ``cuda_src`` (default: every ``*.cu``).
    workers: compiles run at once in threads (NVRTC releases the GIL); default: one per CPU core.
    Returns one report per (architecture, source), in that order. Raises CompileError when NVRTC reports an
    error or any warning.
    """
    from concurrent.futures import ThreadPoolExecutor

    src_dir = cuda_source_dir()
    names = sources if sources is not None else sorted(p.name for p in src_dir.glob("*.cu"))
    if not names:
        raise CompileError(f"no CUDA sources found in {src_dir}")
    jobs = [(_normalise_arch(arch), name) for arch in archs for name in names]
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    if workers <= 1 or len(jobs) <= 1:
        return [_compile_source(arch, name) for arch, name in jobs]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda job: _compile_source(*job), jobs))


def _compile_source(arch: str, name: str) -> CompileReport:
    """Compile every kernel instantiation of one source for one architecture."""
    from cupy_backends.cuda.libs import nvrtc

    src_dir = cuda_source_dir()
    includes = [f"-I{src_dir}"] + [f"-I{d}" for d in _cuda_include_dirs()]
    code = read_cuda_source(name)
    exprs = kernel_names(name)
    start = time.perf_counter()
    prog = nvrtc.createProgram(code, name, [], [])
    try:
        for e in exprs:
            nvrtc.addNameExpression(prog, e)
        options = list(NVRTC_OPTIONS) + [f"-arch={arch}"] + includes
        try:
            nvrtc.compileProgram(prog, options)
        except Exception as exc:  # NVRTCError carries no log; fetch it
            log = nvrtc.getProgramLog(prog)
            raise CompileError(f"{name} for {arch} failed:\n{log or exc}") from None
        log = nvrtc.getProgramLog(prog).strip()
        if log:
            raise CompileError(f"{name} for {arch} compiled with warnings:\n{log}")
        cubin = nvrtc.getCUBIN(prog)
        lowered = [nvrtc.getLoweredName(prog, e) for e in exprs]
    finally:
        nvrtc.destroyProgram(prog)
    return CompileReport(name, arch, time.perf_counter() - start, len(cubin), list(zip(exprs, lowered)))


@dataclasses.dataclass
class KernelResources:
    """What ptxas reports for one kernel instantiation."""

    name: str
    arch: str
    registers: int  # per thread
    stack_bytes: int  # local memory frame per thread (spills, or arrays indexed at run time)
    spill_store_bytes: int
    spill_load_bytes: int


def kernel_resources(name: str, arch="sm_90", *, source: str = "qgemm.cu") -> KernelResources:
    """Compile one kernel instantiation (a name from :func:`kernel_names`) with NVRTC and return its register
    use and spills as ptxas reports them; no GPU needed."""
    from cupy_backends.cuda.libs import nvrtc

    arch = _normalise_arch(arch)
    src_dir = cuda_source_dir()
    prog = nvrtc.createProgram(read_cuda_source(source), source, [], [])
    try:
        nvrtc.addNameExpression(prog, name)
        options = list(NVRTC_OPTIONS) + [f"-arch={arch}", f"-I{src_dir}", "-Xptxas", "-v"]
        options += [f"-I{d}" for d in _cuda_include_dirs()]
        try:
            nvrtc.compileProgram(prog, options)
        except Exception as exc:
            raise CompileError(f"{name} for {arch} failed:\n{nvrtc.getProgramLog(prog) or exc}") from None
        log = nvrtc.getProgramLog(prog)
    finally:
        nvrtc.destroyProgram(prog)
    found = _parse_ptxas_report(log)
    if found is None:
        raise CompileError(f"{name} for {arch}: no resource report in the ptxas log:\n{log}")
    return KernelResources(name, arch, *found)


def _parse_ptxas_report(log: str):
    """(registers, stack frame, spill store, spill load bytes) from a ``ptxas -v`` log of one kernel, or None."""
    regs = re.search(r"Used (\d+) registers", log)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if regs is None or frame is None:
        return None
    return (int(regs.group(1)),) + tuple(int(v) for v in frame.groups())


def gpu_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device. Never raises."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def kernel_cache_dir() -> Path:
    """CuPy's on-disk kernel cache (``CUPY_CACHE_DIR`` or ``~/.cupy/kernel_cache``)."""
    return Path(os.environ.get("CUPY_CACHE_DIR", Path.home() / ".cupy" / "kernel_cache"))


def cached_kernel_files() -> list[Path]:
    """The compiled modules in the kernel cache, newest first."""
    d = kernel_cache_dir()
    if not d.is_dir():
        return []
    return sorted((p for p in d.iterdir() if p.is_file()), key=lambda p: p.stat().st_mtime, reverse=True)


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


# ---------------------------------------------------------------------------------------------------------
# Modules on a GPU

_modules: dict = {}
_functions: dict = {}
_sm_counts: dict = {}


def get_function(source: str, name: str, device_id: int):
    """The compiled kernel ``name`` from ``cuda_src/source`` on ``device_id``.

    Each instantiation is its own module, compiled on first use (and cached on disk by CuPy), so a model
    compiles only the variants it needs.
    """
    key = (source, name, device_id)
    fn = _functions.get(key)
    if fn is not None:
        return fn
    import cupy

    with cupy.cuda.Device(device_id):
        mod = cupy.RawModule(
            code=read_cuda_source(source),
            options=NVRTC_OPTIONS + (f"-I{cuda_source_dir()}",),
            name_expressions=[name],
        )
        fn = mod.get_function(name)
    _modules[key] = mod
    _functions[key] = fn
    return fn


def sm_count(device_id: int) -> int:
    """Number of multiprocessors of a device (cached)."""
    n = _sm_counts.get(device_id)
    if n is None:
        import cupy

        n = cupy.cuda.runtime.getDeviceProperties(device_id)["multiProcessorCount"]
        _sm_counts[device_id] = n
    return n


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


def warmup(qmatrices, *, max_m: int = 64) -> float:
    """Compile and load every kernel the given QMatrix objects need on their devices; returns seconds."""
    start = time.perf_counter()
    for qm in qmatrices:
        qm.warmup(max_m=max_m)
    return time.perf_counter() - start
