"""``cupyq info``: GPUs, library versions and the kernel cache."""

from __future__ import annotations

from cupyq.cli.common import EXIT_OK
from cupyq.cli.output import _emit, _human_bytes, format_table


def cmd_info(args):
    import cupyq
    from cupyq import device, runtime

    summary = device.device_summary()
    cache_dir = runtime.kernel_cache_dir()
    files = runtime.cached_kernel_files()
    reason = device.gpu_unavailable_reason()
    has_cupy = "cupy" in summary
    gpus = summary.get("gpus") or []
    for g in gpus:
        major, minor = (int(v) for v in str(g.get("compute_capability", "0.0")).split("."))
        g["supported"] = (major, minor) >= device.MIN_COMPUTE_CAPABILITY
    mismatch = device.cuda_mismatch_message()
    payload = {
        "cupyq": cupyq.__version__,
        "gpu_available": bool(gpus),
        "gpu_unavailable_reason": reason,
        "can_compile": has_cupy,
        "supported_gpus": device.SUPPORTED_GPUS,
        "cuda_majors": device.cuda_majors(),
        "warnings": [mismatch] if mismatch else [],
        "device_summary": summary,
        "kernel_cache_dir": str(cache_dir),
        "cached_kernel_files": [{"name": p.name, "bytes": p.stat().st_size} for p in files],
    }
    lines = [f"cupyq {cupyq.__version__}"]
    if gpus:
        rows = [
            {
                "index": g.get("index"),
                "name": g.get("name"),
                "cc": g.get("compute_capability"),
                "sms": g.get("sms", ""),
                "memory": _human_bytes(g["memory_bytes"]) if "memory_bytes" in g else "",
                "supported": g["supported"],
            }
            for g in gpus
        ]
        lines.append(format_table(rows, [("GPU", "index"), ("name", "name"), ("compute capability", "cc"), ("SMs", "sms"),
                                         ("memory", "memory"), ("supported", "supported")]))
        for g in gpus:
            if not g["supported"]:
                lines.append(f"warning: GPU {g['index']} ({g['name']}) has compute capability {g['compute_capability']}; "
                             f"the kernels need {device.SUPPORTED_GPUS}")
    elif has_cupy:
        lines.append(f"GPU: none found ({reason}). The GPU kernels cannot run here; the NumPy reference path and "
                     "`cupyq compile` can.")
    else:
        lines.append(f"GPU: not usable: {reason}. Only the NumPy reference path runs here; the GPU kernels and "
                     "`cupyq compile` need CuPy.")
    lines.append(f"supported GPUs: {device.SUPPORTED_GPUS}")
    if mismatch:
        lines.append("warning: " + mismatch.removeprefix("cupyq: "))
    libs = [("CuPy", "cupy"), ("CUDA runtime", "cuda_runtime"), ("CUDA driver", "cuda_driver"), ("NVRTC", "nvrtc"), ("torch", "torch"), ("torch CUDA", "torch_cuda")]
    shown = dict(summary)
    for key in ("cuda_runtime", "cuda_driver"):  # CUDA's integers (13020) as versions (13.2)
        if isinstance(shown.get(key), int):
            shown[key] = device.cuda_version_text(shown[key])
    lines.append("libraries: " + ", ".join(f"{label} {shown.get(key) if shown.get(key) is not None else 'n/a'}" for label, key in libs))
    for key, value in summary.items():
        if key not in {k for _, k in libs} | {"gpus"}:
            lines.append(f"{key}: {value}")
    total = sum(f["bytes"] for f in payload["cached_kernel_files"])
    lines.append(f"kernel cache: {cache_dir} ({len(files)} file(s), {_human_bytes(total)})")
    for f in payload["cached_kernel_files"][:10]:
        lines.append(f"  {f['name']}  {_human_bytes(f['bytes'])}")
    if len(files) > 10:
        lines.append(f"  ... and {len(files) - 10} more")
    _emit(args, payload, "\n".join(lines))
    return EXIT_OK
