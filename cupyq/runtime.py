"""Kernels on a GPU: each instantiation compiled on first use through ``cupy.RawModule`` with the options of
:mod:`cupyq.nvrtc` (and cached on disk by CuPy, one compile per architecture and option set), the kernel cache
directory, and the warmup that compiles everything a set of matrices needs at once.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import sys
import threading
import time
from pathlib import Path

from cupyq import kernels, nvrtc
from cupyq.device import compute_capability
from cupyq.sources import kernel_source


def kernel_cache_dir() -> Path:
    """CuPy's on-disk kernel cache (``CUPY_CACHE_DIR`` or ``~/.cupy/kernel_cache``)."""
    return Path(os.environ.get("CUPY_CACHE_DIR", Path.home() / ".cupy" / "kernel_cache"))


def cached_kernel_files() -> list[Path]:
    """The compiled modules in the kernel cache, newest first."""
    d = kernel_cache_dir()
    if not d.is_dir():
        return []
    return sorted((p for p in d.iterdir() if p.is_file()), key=lambda p: p.stat().st_mtime, reverse=True)


_modules: dict = {}
_functions: dict = {}
COMPILE_NOTICE_S = 1.0  # a kernel load that takes longer than this prints one line on stderr


def get_function(source: str, name: str, device_id: int):
    """The compiled kernel ``name`` from ``cuda_src/source`` on ``device_id``.

    Each instantiation is its own module, compiled on first use (and cached on disk by CuPy), so a model
    compiles only the variants it needs. Sources that need an architecture-specific target on this device
    (:func:`cupyq.kernels.target_arch`: qwgmma.cu on sm_90 is built for sm_90a) are compiled by NVRTC directly
    and loaded from a cubin (:class:`CubinKernel`).
    """
    key = (source, name, device_id)
    fn = _functions.get(key)
    if fn is not None:
        return fn
    import cupy

    if kernels.has_specific_targets(source):
        arch = "sm_{}{}".format(*compute_capability(device_id))
        target = kernels.target_arch(source, arch)
        if target != arch:
            return _load_cubin_function(source, name, device_id, target)

    # A compile takes seconds; loading from CuPy's disk cache a few milliseconds. Say so when it is slow.
    notice = threading.Timer(COMPILE_NOTICE_S, lambda: print(
        f"cupyq: compiling {name} with NVRTC (first use on this machine; cached afterwards)...",
        file=sys.stderr, flush=True))
    notice.daemon = True
    notice.start()
    try:
        nvrtc.load_builtins()
        with cupy.cuda.Device(device_id):
            mod = cupy.RawModule(
                code=kernel_source(source),
                options=nvrtc.kernel_options(),
                name_expressions=[name],
            )
            fn = mod.get_function(name)
    finally:
        notice.cancel()
    _modules[key] = mod
    _functions[key] = fn
    return fn


def warmup(qmatrices, *, max_m: int = 64, progress=None, workers=None) -> float:
    """Compile and load every kernel the given QMatrix objects need on their devices; returns seconds.

    The kernels are compiled first, all at once in ``workers`` threads (default: one per CPU core; NVRTC
    releases the GIL), then each matrix sizes its workspaces. progress: optional callable, given
    ``(index, qmatrix)`` after each matrix is ready.
    """
    from concurrent.futures import ThreadPoolExecutor

    start = time.perf_counter()
    qmatrices = list(qmatrices)
    jobs = sorted({(qm.device_id, source, name) for qm in qmatrices for source, name in qm.needed_kernels(max_m=max_m)})
    if jobs:
        # The first load runs alone: CuPy preprocesses an empty program once per option set before its first
        # compile or cache lookup, and the first loads of several threads would each do that, one after another
        # (0.13 s of a warm warmup on an H200 host). The rest run in threads whether the kernel cache is cold or
        # warm: guessing which from the first load's time sent a fast machine's cold cache down a serial path.
        get_function(jobs[0][1], jobs[0][2], jobs[0][0])
        rest = jobs[1:]
        workers = workers or min(len(rest), os.cpu_count() or 1)
        if workers > 1 and len(rest) > 1:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                list(pool.map(lambda job: get_function(job[1], job[2], job[0]), rest))
        else:
            for dev, source, name in rest:
                get_function(source, name, dev)
    for i, qm in enumerate(qmatrices):
        qm.warmup(max_m=max_m)
        if progress is not None:
            progress(i, qm)
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------------------
# Architecture-specific kernels, loaded from cubins

_cubin_lock = threading.Lock()
_MAX_DYNAMIC_SMEM_ATTR = 8  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES


class CubinKernel:
    """A kernel loaded from a cubin: ``kernel.ptr`` is its CUfunction, ``name`` its expression, and
    ``max_dynamic_shared_size_bytes`` reads and raises its dynamic shared-memory limit."""

    def __init__(self, module, function, name: str):
        self._module = module  # keeps the module loaded
        self.kernel = function
        self.name = name

    @property
    def max_dynamic_shared_size_bytes(self) -> int:
        from cupy_backends.cuda.api import driver

        return driver.funcGetAttribute(_MAX_DYNAMIC_SMEM_ATTR, self.kernel.ptr)

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, value: int):
        from cupy_backends.cuda.api import driver

        driver.funcSetAttribute(self.kernel.ptr, _MAX_DYNAMIC_SMEM_ATTR, int(value))


def _cubin_bytes(prog: int) -> bytes:
    # CuPy's nvrtc.getCUBIN returns one byte short of the image; ask NVRTC for the size itself.
    lib = ctypes.CDLL(nvrtc.loaded_library_path())
    size = ctypes.c_size_t()
    if lib.nvrtcGetCUBINSize(ctypes.c_void_p(prog), ctypes.byref(size)) != 0:
        raise RuntimeError("cupyq: nvrtcGetCUBINSize failed")
    buf = ctypes.create_string_buffer(size.value)
    if lib.nvrtcGetCUBIN(ctypes.c_void_p(prog), buf) != 0:
        raise RuntimeError("cupyq: nvrtcGetCUBIN failed")
    return buf.raw


def _compile_cubin(source: str, name: str, arch: str) -> tuple:
    """(cubin bytes, lowered name) of one instantiation, from the disk cache or NVRTC."""
    from cupy_backends.cuda.libs import nvrtc as libnvrtc

    code = kernel_source(source)
    options = nvrtc.nvrtc_options(arch)
    key = hashlib.sha256(json.dumps([code, options, name, libnvrtc.getVersion()]).encode()).hexdigest()
    cache = kernel_cache_dir() / f"cupyq_{arch}_{key}.cubin"
    meta = cache.with_suffix(".json")
    if cache.exists():
        return cache.read_bytes(), json.loads(meta.read_text())["lowered"]
    nvrtc.load_builtins()
    prog = libnvrtc.createProgram(code, source, [], [])
    try:
        libnvrtc.addNameExpression(prog, name)
        try:
            libnvrtc.compileProgram(prog, options)
        except Exception as exc:  # NVRTCError carries no log; fetch it
            raise nvrtc.CompileError(f"{name} for {arch} failed:\n{libnvrtc.getProgramLog(prog) or exc}") from None
        cubin = _cubin_bytes(prog)
        lowered = libnvrtc.getLoweredName(prog, name)
    finally:
        libnvrtc.destroyProgram(prog)
    cache.parent.mkdir(parents=True, exist_ok=True)
    # Each file appears whole or not at all, the name record first: a reader that sees the cubin sees both.
    for path, data in ((meta, json.dumps({"name": name, "lowered": lowered}).encode()), (cache, cubin)):
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return cubin, lowered


def _load_cubin_function(source: str, name: str, device_id: int, arch: str) -> CubinKernel:
    """Kernel ``name`` of ``cuda_src/source`` compiled for ``arch`` and loaded on ``device_id`` (cached)."""
    key = (source, name, device_id)
    import cupy
    from cupy.cuda import function

    cubin, lowered = _compile_cubin(source, name, arch)  # outside the lock: warm-up compiles in threads
    with _cubin_lock:
        fn = _functions.get(key)
        if fn is None:
            with cupy.cuda.Device(device_id):
                module = function.Module()
                module.load(cubin)
                fn = _functions[key] = CubinKernel(module, module.get_function(lowered), name)
    return fn
