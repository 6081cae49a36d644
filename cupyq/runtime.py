"""NVRTC compilation, the kernel module cache, stream resolution and launches.

Kernels live in ``cuda_src/*.cu`` and are compiled at run time: on a machine with a GPU through
``cupy.RawModule`` (cached on disk by CuPy, one compile per architecture and option set), and, for the
compile check, straight through NVRTC for any architecture on a machine without a GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import sys
import threading
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
    resources: list = dataclasses.field(default_factory=list)  # KernelResources per kernel, when asked for


# Oldest architecture the kernels compile for: they use cp.async, bf16 mma and ldmatrix (sm_80 and newer).
MIN_COMPUTE_CAPABILITY = (8, 0)
SUPPORTED_GPUS = "sm_80 and newer: A100, A30, A10, L4, L40, RTX 30xx/40xx/50xx, H100/H200, B200"


def _normalise_arch(arch) -> str:
    """``"sm_NN"`` (with an ``a``/``f`` suffix kept) from ``"sm_90"``, ``"90"``, ``"compute_90"`` or ``"9.0"``;
    ValueError for anything else or an architecture older than sm_80."""
    a = str(arch).strip().lower()
    for prefix in ("sm_", "compute_"):
        if a.startswith(prefix):
            a = a[len(prefix):]
    a = a.replace(".", "")
    digits = a[:-1] if a[-1:] in ("a", "f") else a
    if not (2 <= len(digits) <= 3 and digits.isdigit()):
        raise ValueError(f"arch: expected something like 'sm_80', '90' or 'sm_90a', got {arch!r}")
    if (int(digits[:-1]), int(digits[-1])) < MIN_COMPUTE_CAPABILITY:
        raise ValueError(f"arch: {arch!r} is older than the kernels support ({SUPPORTED_GPUS})")
    return "sm_" + a


def kernel_options() -> tuple:
    """The NVRTC options cupyq chooses for its kernels (CuPy's ``RawModule`` adds its own, see
    :func:`nvrtc_options`): ``NVRTC_OPTIONS`` and the include path of ``cuda_src``."""
    return NVRTC_OPTIONS + (f"-I{cuda_source_dir()}",)


def nvrtc_options(arch) -> list:
    """Every option NVRTC receives when the kernels are compiled for ``arch`` at run time.

    ``cupy.RawModule`` compiles :func:`kernel_options` with CuPy's include paths (its bundled CCCL, its own
    headers, the CUDA headers it found) around them, ``-ftz=true``, ``-arch=sm_NN`` and
    ``--device-as-default-execution-space``; the offline compile check builds the same list so that it
    proves what runs. Needs CuPy, not a GPU.
    """
    from cupy._core import core

    options = list(core.assemble_cupy_compiler_options(kernel_options()))
    options += ["-ftz=true", f"-arch={_normalise_arch(arch)}", "--device-as-default-execution-space"]
    if os.environ.get("CUPY_NVRTC_USE_PCH", "0") not in ("", "0"):
        from cupy_backends.cuda.libs import nvrtc

        if nvrtc.getVersion() >= (12, 8):
            options.append("--pch")
    return options


def compile_sources(archs, *, sources=None, workers=None, progress=None, resources=False) -> list[CompileReport]:
    """Compile every CUDA source for each architecture with NVRTC; no GPU needed (CuPy and NVRTC are).

    archs: iterable of architectures such as ``"sm_80"``, ``"90"`` or ``"sm_90a"`` (sm_80 or newer).
    sources: file names inside ``cuda_src`` (default: every ``*.cu``).
    workers: compiles run at once in threads (NVRTC releases the GIL); default: one per CPU core.
    progress: optional callable, given each :class:`CompileReport` as its compile finishes.
    resources: also fill each report's ``resources`` with the ptxas report of every kernel (the same compile,
    with ``-Xptxas -v``).
    Returns one report per (architecture, source), in that order. Raises CompileError when NVRTC reports an
    error or any warning, ValueError for a bad architecture, SetupError without CuPy. On an exception
    (Ctrl-C included) compiles not yet started are dropped and running ones are not waited for.
    """
    require_cupy("cupyq compile (NVRTC)")
    src_dir = cuda_source_dir()
    names = sources if sources is not None else sorted(p.name for p in src_dir.glob("*.cu"))
    if not names:
        raise CompileError(f"no CUDA sources found in {src_dir}")
    jobs = [(_normalise_arch(arch), name) for arch in archs for name in names]
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    compile_one = functools.partial(_compile_source, resources=True) if resources else _compile_source
    if workers <= 1 or len(jobs) <= 1:
        reports = []
        for job in jobs:
            reports.append(compile_one(*job))
            if progress is not None:
                progress(reports[-1])
        return reports
    return _run_in_daemon_threads(jobs, workers, progress, compile_one)


_COMPILE_THREAD_PREFIX = "cupyq-nvrtc-"


def _run_in_daemon_threads(jobs, workers, progress, compile_one):
    """Run ``compile_one`` (``_compile_source`` or a partial of it) on each job in ``workers`` daemon threads;
    reports in job order.

    Daemon threads rather than a ThreadPoolExecutor: an executor's threads are joined when the interpreter
    exits, so Ctrl-C would still wait for every running NVRTC compile (tens of seconds). After a compile error
    the compiles already running are waited for (the rest are dropped); after Ctrl-C nothing is waited for.
    """
    import queue
    import threading

    todo = queue.SimpleQueue()
    for index, job in enumerate(jobs):
        todo.put((index, job))
    finished = queue.SimpleQueue()
    stop = threading.Event()

    def work():
        while not stop.is_set():
            try:
                index, job = todo.get_nowait()
            except queue.Empty:
                return
            try:
                finished.put((index, compile_one(*job), None))
            except BaseException as exc:  # handed to the caller's thread
                stop.set()
                finished.put((index, None, exc))

    threads = [threading.Thread(target=work, name=f"{_COMPILE_THREAD_PREFIX}{n}", daemon=True) for n in range(workers)]
    for t in threads:
        t.start()
    reports = [None] * len(jobs)
    try:
        for _ in jobs:
            while True:
                try:
                    index, report, exc = finished.get(timeout=0.1)  # short waits keep Ctrl-C responsive
                    break
                except queue.Empty:
                    continue
            if exc is not None:
                raise exc
            reports[index] = report
            if progress is not None:
                progress(report)
    except KeyboardInterrupt:
        stop.set()
        raise
    except BaseException:
        stop.set()
        for t in threads:
            t.join()
        raise
    return reports


def compile_threads_running() -> bool:
    """True while an interrupted :func:`compile_sources` still has NVRTC compiles running in its threads."""
    import threading

    return any(t.name.startswith(_COMPILE_THREAD_PREFIX) and t.is_alive() for t in threading.enumerate())


def _compile_source(arch: str, name: str, resources: bool = False) -> CompileReport:
    """Compile every kernel instantiation of one source for one architecture, with the run time's options
    (and ``-Xptxas -v`` for the ptxas report of each kernel when ``resources``)."""
    from cupy_backends.cuda.libs import nvrtc

    code = read_cuda_source(name)
    exprs = kernel_names(name)
    options = nvrtc_options(arch) + (["-Xptxas", "-v"] if resources else [])
    start = time.perf_counter()
    prog = nvrtc.createProgram(code, name, [], [])
    try:
        for e in exprs:
            nvrtc.addNameExpression(prog, e)
        try:
            nvrtc.compileProgram(prog, options)
        except Exception as exc:  # NVRTCError carries no log; fetch it
            log = nvrtc.getProgramLog(prog)
            raise CompileError(f"{name} for {arch} failed:\n{log or exc}") from None
        log = nvrtc.getProgramLog(prog)
        warnings_text = _without_ptxas_info(log).strip()
        if warnings_text:
            raise CompileError(f"{name} for {arch} compiled with warnings:\n{warnings_text}")
        cubin = nvrtc.getCUBIN(prog)
        lowered = [nvrtc.getLoweredName(prog, e) for e in exprs]
    finally:
        nvrtc.destroyProgram(prog)
    report = CompileReport(name, arch, time.perf_counter() - start, len(cubin), list(zip(exprs, lowered)))
    if resources:
        report.resources = _kernel_reports(log, report)
    return report


@dataclasses.dataclass
class KernelResources:
    """What ptxas reports for one kernel instantiation."""

    name: str
    arch: str
    registers: int  # per thread
    stack_bytes: int  # local memory frame per thread (spills, or arrays indexed at run time)
    spill_store_bytes: int
    spill_load_bytes: int

    @property
    def uses_local_memory(self) -> bool:
        """A stack frame or spills: per-thread local memory, which no dispatched kernel may need."""
        return bool(self.stack_bytes or self.spill_store_bytes or self.spill_load_bytes)

    def describe(self) -> str:
        """One line: the kernel, its architecture, registers, stack frame and spills."""
        return (f"{self.name} for {self.arch}: {self.registers} registers, {self.stack_bytes} bytes stack frame, "
                f"{self.spill_store_bytes} bytes spill stores, {self.spill_load_bytes} bytes spill loads")


def kernel_resources(name: str, arch="sm_90", *, source: str = "qgemm.cu") -> KernelResources:
    """Compile one kernel instantiation (a name from :func:`kernel_names`) with NVRTC and return its register
    use and spills as ptxas reports them; no GPU needed."""
    from cupy_backends.cuda.libs import nvrtc

    arch = _normalise_arch(arch)
    prog = nvrtc.createProgram(read_cuda_source(source), source, [], [])
    try:
        nvrtc.addNameExpression(prog, name)
        options = nvrtc_options(arch) + ["-Xptxas", "-v"]
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


_PTXAS_INFO = re.compile(r"^ptxas(\s+info\s*:|\s+\.)")  # lines of the -v report, not warnings


def _without_ptxas_info(log: str) -> str:
    """An NVRTC log without the lines ``-Xptxas -v`` adds (and the NUL that ends the log), so that what is left
    are warnings."""
    return "\n".join(line for line in log.replace("\0", "").splitlines() if not _PTXAS_INFO.match(line))


def _kernel_reports(log: str, report: CompileReport) -> list:
    """KernelResources of every kernel of ``report`` from the ``ptxas -v`` log of its module (one section per
    entry function, named by its lowered name, whose own properties follow "Function properties for" and its
    name); CompileError for a kernel the log does not cover."""
    sections = {}
    for part in log.split("Compiling entry function '")[1:]:
        lowered, _, rest = part.partition("'")
        sections[lowered] = rest.partition(f"Function properties for {lowered}\n")[2] or rest
    found = []
    for name, lowered in report.kernels:
        values = _parse_ptxas_report(sections.get(lowered, ""))
        if values is None:
            raise CompileError(f"{name} for {report.arch}: no resource report in the ptxas log:\n{log}")
        found.append(KernelResources(name, report.arch, *values))
    return found


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
            runtime_version = _cuda_version_text(cupy.cuda.runtime.runtimeGetVersion())
            return (f"the NVIDIA driver supports CUDA {_cuda_version_text(driver)} but CuPy uses the CUDA "
                    f"{runtime_version} runtime: update the driver or install the extra of the driver's CUDA "
                    f"major ({INSTALL_HINT})")
        return f"CuPy cannot reach a GPU: {text}"
    if count == 0:
        return "no CUDA device is visible (check CUDA_VISIBLE_DEVICES and nvidia-smi)"
    return None


def _cuda_version_text(version: int) -> str:
    """``"12.8"`` from CUDA's integer version 12080."""
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
    reason = gpu_unavailable_reason()
    if reason is not None:
        raise SetupError(f"device {device_id}: {reason}")
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
COMPILE_NOTICE_S = 1.0  # a kernel load that takes longer than this prints one line on stderr
COLD_LOAD_S = 0.25  # a first load slower than this means a cold kernel cache (warmup then compiles in threads)
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
                options=kernel_options(),
                name_expressions=[name],
            )
            fn = mod.get_function(name)
    finally:
        notice.cancel()
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
