"""Kernels built for an architecture-specific target (``sm_90a``: the ``wgmma`` instructions of qwgmma.cu).

CuPy's ``RawModule`` compiles for the device's plain architecture only, so these are compiled here with NVRTC
(the same options as every other kernel, :func:`cupyq.nvrtc.nvrtc_options`, with the target changed),
cached on disk beside CuPy's kernel cache, keyed by the source text, options, name and NVRTC version, and
loaded as a module. :func:`get_function` returns an object that the launch code uses like a CuPy kernel.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import threading

from cupyq import kernels, nvrtc as cupyq_nvrtc, runtime
from cupyq.sources import read_cuda_source

_lock = threading.Lock()
_functions: dict = {}
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


def _nvrtc_library():
    """The libnvrtc CuPy loaded (its program handles are only valid there), found in the process's mappings."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1]
            if "libnvrtc.so" in os.path.basename(path):
                return ctypes.CDLL(path)
    raise RuntimeError("cupyq: CuPy's NVRTC library is not loaded")


def _cubin_bytes(prog: int) -> bytes:
    # CuPy's nvrtc.getCUBIN returns one byte short of the image; ask NVRTC for the size itself.
    lib = _nvrtc_library()
    size = ctypes.c_size_t()
    if lib.nvrtcGetCUBINSize(ctypes.c_void_p(prog), ctypes.byref(size)) != 0:
        raise RuntimeError("cupyq: nvrtcGetCUBINSize failed")
    buf = ctypes.create_string_buffer(size.value)
    if lib.nvrtcGetCUBIN(ctypes.c_void_p(prog), buf) != 0:
        raise RuntimeError("cupyq: nvrtcGetCUBIN failed")
    return buf.raw


def _compile(source: str, name: str, arch: str) -> tuple:
    """(cubin bytes, lowered name) of one instantiation, from the disk cache or NVRTC."""
    from cupy_backends.cuda.libs import nvrtc

    code = read_cuda_source(source)
    options = cupyq_nvrtc.nvrtc_options(arch)
    key = hashlib.sha256(json.dumps([code, options, name, nvrtc.getVersion()]).encode()).hexdigest()
    cache = runtime.kernel_cache_dir() / f"cupyq_{arch}_{key}.cubin"
    meta = cache.with_suffix(".json")
    if cache.exists() and meta.exists():
        return cache.read_bytes(), json.loads(meta.read_text())["lowered"]
    prog = nvrtc.createProgram(code, source, [], [])
    try:
        nvrtc.addNameExpression(prog, name)
        try:
            nvrtc.compileProgram(prog, options)
        except Exception as exc:  # NVRTCError carries no log; fetch it
            raise cupyq_nvrtc.CompileError(f"{name} for {arch} failed:\n{nvrtc.getProgramLog(prog) or exc}") from None
        cubin = _cubin_bytes(prog)
        lowered = nvrtc.getLoweredName(prog, name)
    finally:
        nvrtc.destroyProgram(prog)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(cubin)
    os.replace(tmp, cache)  # readers see a whole file or none
    meta.write_text(json.dumps({"name": name, "lowered": lowered}))
    return cubin, lowered


def get_function(source: str, name: str, device_id: int, arch: str = "sm_90") -> CubinKernel:
    """Kernel ``name`` of ``cuda_src/source`` compiled for the target ``source`` needs on ``arch`` devices
    (:func:`cupyq.kernels.target_arch`) and loaded on ``device_id`` (cached)."""
    arch = kernels.target_arch(source, arch)
    key = (source, name, device_id, arch)
    fn = _functions.get(key)
    if fn is not None:
        return fn
    with _lock:
        fn = _functions.get(key)
        if fn is None:
            import cupy
            from cupy.cuda import function

            cubin, lowered = _compile(source, name, arch)
            with cupy.cuda.Device(device_id):
                module = function.Module()
                module.load(cubin)
                fn = _functions[key] = CubinKernel(module, module.get_function(lowered), name)
    return fn
