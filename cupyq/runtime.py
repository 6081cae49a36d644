"""Kernels on a GPU: each instantiation compiled on first use through ``cupy.RawModule`` with the options of
:mod:`cupyq.nvrtc` (and cached on disk by CuPy, one compile per architecture and option set), the kernel cache
directory, and the warmup that compiles everything a set of matrices needs at once.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

from cupyq import nvrtc
from cupyq.sources import read_cuda_source


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
COLD_LOAD_S = 0.25  # a first load slower than this means a cold kernel cache (warmup then compiles in threads)


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

    # A compile takes seconds; loading from CuPy's disk cache a few milliseconds. Say so when it is slow.
    notice = threading.Timer(COMPILE_NOTICE_S, lambda: print(
        f"cupyq: compiling {name} with NVRTC (first use on this machine; cached afterwards)...",
        file=sys.stderr, flush=True))
    notice.daemon = True
    notice.start()
    try:
        with cupy.cuda.Device(device_id):
            mod = cupy.RawModule(
                code=read_cuda_source(source),
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
        # The first load tells a cold kernel cache (seconds: compile the rest in threads) from a warm one
        # (milliseconds: threads only add overhead).
        t0 = time.perf_counter()
        get_function(jobs[0][1], jobs[0][2], jobs[0][0])
        rest = jobs[1:]
        if rest and time.perf_counter() - t0 > COLD_LOAD_S:
            with ThreadPoolExecutor(max_workers=workers or min(len(rest), os.cpu_count() or 1)) as pool:
                list(pool.map(lambda job: get_function(job[1], job[2], job[0]), rest))
        else:
            for dev, source, name in rest:
                get_function(source, name, dev)
    for i, qm in enumerate(qmatrices):
        qm.warmup(max_m=max_m)
        if progress is not None:
            progress(i, qm)
    return time.perf_counter() - start
