"""NVRTC: the option set every kernel is compiled with, the offline compile check of every CUDA source for any
architecture (in threads, no GPU needed) and the register / spill report ptxas gives for one kernel.

The same options reach NVRTC through ``cupy.RawModule`` at run time (:mod:`cupyq.runtime`), so what the compile
check builds is what runs, and the option set keys CuPy's on-disk kernel cache.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import os
import re
import time

from cupyq import kernels
from cupyq.device import MIN_COMPUTE_CAPABILITY, SUPPORTED_GPUS, require_cupy
from cupyq.sources import cuda_source_dir, read_cuda_source

# CUPYQ_NVRTC_OPTIONS adds compiler options (e.g. -D tuning macros of cuda_src) for experiments.
NVRTC_OPTIONS = ("--std=c++17",) + tuple(os.environ.get("CUPYQ_NVRTC_OPTIONS", "").split())


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
    :func:`nvrtc_options`): ``NVRTC_OPTIONS``, the shared constants of ``kernels.NVRTC_DEFINES`` as
    ``-DNAME=value`` and the include path of ``cuda_src``. CuPy keys its kernel cache with these options, so a
    changed constant compiles afresh."""
    defines = tuple(f"-D{name}={value}" for name, value in sorted(kernels.NVRTC_DEFINES.items()))
    return NVRTC_OPTIONS + defines + (f"-I{cuda_source_dir()}",)


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


def loaded_library_path() -> str:
    """The file of the libnvrtc CuPy loaded (NVRTC program handles are only valid in that library), read from
    the process's mappings; loads it first. RuntimeError when no libnvrtc is mapped (not Linux, or CuPy failed
    to load it)."""
    from cupy_backends.cuda.libs import nvrtc

    nvrtc.getVersion()  # CuPy loads the library on first use
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if os.path.basename(path).startswith("libnvrtc.so"):
                    return path
    except OSError:
        pass
    raise RuntimeError("cupyq: CuPy's NVRTC library is not mapped in this process")


@functools.cache
def load_builtins() -> None:
    """Load libnvrtc-builtins from beside the libnvrtc CuPy loaded, once per process, before any compile.

    NVRTC opens its builtins library by its bare name, and the nvidia-cuda-nvrtc 13.0 wheel sets no search
    path for it, so a compile fails with "failed to open libnvrtc-builtins.so.13.0" unless something loaded
    that library first. cuda-pathfinder does so only when it loads libnvrtc itself from a path it found, not
    when it finds libnvrtc already loaded or loads it through the system's search path. Does nothing where the
    library is not beside libnvrtc (other platforms, or a toolkit whose own search path serves).
    """
    from cupy_backends.cuda.libs import nvrtc

    major, minor = nvrtc.getVersion()
    try:
        path = os.path.realpath(loaded_library_path())
    except RuntimeError:
        return
    sibling = os.path.join(os.path.dirname(path), f"libnvrtc-builtins.so.{major}.{minor}")
    if os.path.isfile(sibling):
        ctypes.CDLL(sibling, mode=os.RTLD_NOW | os.RTLD_GLOBAL)


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
    load_builtins()  # before the threads, so that none of them is the first to load NVRTC
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
    """Compile every kernel instantiation of one source for one architecture (the source's own target for it,
    :func:`cupyq.kernels.target_arch`), with the run time's options (and ``-Xptxas -v`` for the ptxas report of
    each kernel when ``resources``)."""
    from cupy_backends.cuda.libs import nvrtc

    load_builtins()
    code = read_cuda_source(name)
    exprs = kernels.kernel_names(name)
    arch = kernels.target_arch(name, arch)
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
    load_builtins()
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
