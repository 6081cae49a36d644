"""``cupyq compile``: compile the CUDA sources with NVRTC for given architectures (no GPU needed); with
``--check-resources`` also the ptxas check that no kernel needs a stack frame or spills."""

from __future__ import annotations

import dataclasses
import sys
import time

from cupyq.cli.common import EXIT_FAIL, EXIT_OK
from cupyq.cli.output import _emit, format_table


def cmd_compile(args):
    from cupyq import nvrtc
    from cupyq.device import require_cupy
    from cupyq.sources import list_cuda_sources

    require_cupy("cupyq compile (NVRTC)")  # before announcing the compiles

    archs = args.arch or ["sm_80", "sm_90"]
    sources = args.source or None
    n_jobs = len(archs) * len(sources or list_cuda_sources())
    start = time.perf_counter()
    print(f"cupyq compile: {n_jobs} NVRTC compile(s) for {', '.join(archs)} in parallel threads "
          "(each takes tens of seconds)...", file=sys.stderr)

    def report(r):
        print(f"  compiled {r.source} for {r.arch} in {r.seconds:.1f} s", file=sys.stderr, flush=True)

    try:
        reports = nvrtc.compile_sources(archs, sources=sources, progress=report, resources=args.check_resources)
    except nvrtc.CompileError as exc:
        print(f"cupyq compile: kernel compilation failed:\n{exc}", file=sys.stderr)
        _emit(args, {"ok": False, "error": str(exc), "reports": []}, "compilation failed")
        return EXIT_FAIL
    rows = [
        {"source": r.source, "arch": r.arch, "seconds": r.seconds, "cubin_bytes": r.cubin_bytes, "kernels": len(r.kernels)}
        for r in reports
    ]
    text = format_table(rows, [("source", "source"), ("arch", "arch"), ("seconds", "seconds"),
                               ("cubin bytes", "cubin_bytes"), ("kernels", "kernels")])
    text += f"\ncompiled {len(rows)} module(s) in {time.perf_counter() - start:.2f} s (in parallel threads)"
    payload = {"ok": True, "reports": [dict(r, kernel_names=[k if isinstance(k, str) else k[0] for k in rep.kernels])
                                       for r, rep in zip(rows, reports)]}
    if not args.check_resources:
        _emit(args, payload, text)
        return EXIT_OK
    return _check_resources(args, reports, payload, text)


def _check_resources(args, reports, payload, text):
    """Fail, naming each one, when a kernel needs local memory (a stack frame or spills) per ptxas."""
    for entry, rep in zip(payload["reports"], reports):
        entry["resources"] = [dataclasses.asdict(k) for k in rep.resources]
    found = [k for rep in reports for k in rep.resources]
    bad = [k for k in found if k.uses_local_memory]
    payload["ok"] = not bad
    payload["local_memory_kernels"] = [k.describe() for k in bad]
    if bad:
        text += f"\nptxas: {len(bad)} of {len(found)} kernels use local memory (a stack frame or spills):"
        text += "".join(f"\n  {k.describe()}" for k in bad)
    else:
        most = max((k.registers for k in found), default=0)
        text += f"\nptxas: {len(found)} kernels, none with a stack frame or spills (at most {most} registers)"
    _emit(args, payload, text)
    return EXIT_FAIL if bad else EXIT_OK
