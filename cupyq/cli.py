"""The ``cupyq`` command line: info, inspect, verify, bench, warmup, compile.

Exit status: 0 success, 1 verification (or kernel compilation) failure, 2 usage or input error.
Every command takes ``--json`` (a JSON report on stdout instead of the table; errors too, as ``{"error": ...}``)
and ``--json-out FILE`` / ``-o FILE`` (the table on stdout, the JSON report written to FILE; an existing FILE is
replaced only when it is a report cupyq wrote). Reports carry a ``cupyq_report`` key naming the command.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

__all__ = ["main", "DEFAULT_TOLERANCE", "DEFAULT_MS"]

# Relative Frobenius error allowed between the GPU kernel (fp16 in, fp16 out, fp32 accumulation)
# and the float32 reference. Rounding the output to fp16 alone costs up to 2**-11 ~ 4.9e-4 per
# element, rounding dequantised weights to fp16 about as much per weight (averaging down over the
# K-term dot products); a correct kernel lands near 1e-3 or below (upstream's fp16-accumulating
# kernel measures ~1e-3). A wrong group, zero point, bit offset or permutation row gives errors of
# order 0.1 to 1, so 1e-2 keeps a 10x margin over rounding and still cannot pass a real bug.
DEFAULT_TOLERANCE = 1e-2
DEFAULT_MS = (1, 7, 64)

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
COMMANDS = ("info", "inspect", "verify", "bench", "warmup", "compile")


class UsageError(Exception):
    """Bad input that is not a verification failure: reported on stderr, exit status 2."""


# ------------------------------------------------------------------------------------------------
# output helpers
# ------------------------------------------------------------------------------------------------


def format_table(rows, columns) -> str:
    """Plain-text table. columns: list of (header, key); numbers are right-aligned."""
    cells = [[h for h, _ in columns]]
    numeric = [True] * len(columns)
    for row in rows:
        line = []
        for i, (_, key) in enumerate(columns):
            v = row.get(key, "")
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                numeric[i] = numeric[i] and v in ("", "-")
            line.append(_fmt(v))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]

    def render(line):
        return "  ".join(c.rjust(w) if numeric[i] else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))).rstrip()

    out = [render(cells[0]), "  ".join("-" * w for w in widths)]
    out += [render(line) for line in cells[1:]]
    return "\n".join(out)


def _fmt(v):
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v == 0 or not math.isfinite(v):
            return str(v)
        if abs(v) < 1e-2 or abs(v) >= 1e6:
            return f"{v:.2e}"
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)


def _human_bytes(n) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


class Progress:
    """A one-line progress bar on stderr, drawn only on a terminal and only once a step has taken
    more than ``delay`` seconds (quick commands print nothing)."""

    def __init__(self, total, label, *, stream=None, delay=0.5):
        self.total, self.label, self.done = total, label, 0
        self.stream = sys.stderr if stream is None else stream
        self.start = time.perf_counter()
        self.delay = delay
        self.drawn = False
        self.enabled = getattr(self.stream, "isatty", lambda: False)()

    def update(self, note=""):
        self.done += 1
        if not self.enabled or time.perf_counter() - self.start < self.delay:
            return
        width = 24
        filled = int(width * self.done / max(self.total, 1))
        bar = "#" * filled + "." * (width - filled)
        text = f"\r{self.label} [{bar}] {self.done}/{self.total} {note}"[:120]
        self.stream.write(text.ljust(self._last_len()) if self.drawn else text)
        self.stream.flush()
        self.drawn = True
        self._len = len(text)

    def _last_len(self):
        return getattr(self, "_len", 0)

    def close(self):
        if self.drawn:
            self.stream.write("\r" + " " * self._last_len() + "\r")
            self.stream.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


REPORT_KEY = "cupyq_report"  # marks a JSON report written by cupyq; only such files are ever overwritten


def _json_safe(value):
    """``value`` with non-finite floats as None (JSON has no Infinity/NaN) and tuples as lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _report_json(command, payload) -> str:
    """The JSON text of a report: ``payload`` with the ``cupyq_report`` marker first; always valid JSON."""
    import cupyq

    marked = {REPORT_KEY: {"command": command, "version": cupyq.__version__}, **payload}
    return json.dumps(_json_safe(marked), indent=2, default=str, allow_nan=False)


def _check_json_out(path) -> Path:
    """``path`` as a Path when a report may be written there; UsageError for a directory, a missing parent
    folder, or an existing file that is not a cupyq JSON report (it is never replaced)."""
    target = Path(path)
    if str(path) in ("", "-"):
        raise UsageError(f"--json-out: expected a file name, got {str(path)!r} (use --json for stdout)")
    if target.is_dir():
        raise UsageError(f"--json-out: {target} is a directory; expected a file name for the JSON report")
    if not target.parent.is_dir():
        raise UsageError(f"--json-out: folder {target.parent} does not exist")
    if target.exists() or target.is_symlink():
        try:
            previous = json.loads(target.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            previous = None
        if not (isinstance(previous, dict) and REPORT_KEY in previous):
            raise UsageError(
                f"--json-out: {target} exists and is not a JSON report written by cupyq; refusing to overwrite "
                f"it (remove it or choose another file name)"
            )
    return target


def _write_report(path, blob: str):
    """Write ``blob`` to ``path`` (checked by :func:`_check_json_out`) through a temporary file and a rename,
    so a reader never sees half a report."""
    target = _check_json_out(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(blob + "\n")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _emit(args, payload, text):
    """Print ``text`` or, with ``--json``, the JSON report of ``payload``; with ``--json-out`` also write it."""
    blob = _report_json(args.command, payload)
    if getattr(args, "json", False):
        print(blob)
    else:
        print(text)
    target = getattr(args, "json_out", None)
    if target:
        _write_report(target, blob)
        print(f"wrote {target}", file=sys.stderr)


def _gpu_available():
    from cupyq import runtime

    return runtime.gpu_available()


def _gpu_unavailable_reason():
    from cupyq import runtime

    return runtime.gpu_unavailable_reason()


def _require_gpu(command):
    """UsageError naming why ``command`` cannot run here when no GPU is usable."""
    reason = _gpu_unavailable_reason()
    if reason is not None:
        raise UsageError(f"{command} needs an NVIDIA GPU with CuPy, and none was found: {reason} (see `cupyq info`)")


def _checkpoint_paths(paths, tmp):
    """The checkpoint directories to work on: the given ones, or the built-in sample made in ``tmp``."""
    if paths:
        for p in paths:
            if str(p).isdigit() and not Path(p).exists():
                raise UsageError(f"{p}: no such checkpoint directory; several row counts are written --m 1,{p} "
                                 f"(or --m 1 --m {p})")
        return [Path(p) for p in paths], False
    from cupyq.sample import make_sample

    return list(make_sample(tmp).values()), True


def _open(path):
    from cupyq.checkpoint import open_checkpoint

    return open_checkpoint(path)


# ------------------------------------------------------------------------------------------------
# info
# ------------------------------------------------------------------------------------------------


def cmd_info(args):
    import cupyq
    from cupyq import runtime

    summary = runtime.device_summary()
    cache_dir = runtime.kernel_cache_dir()
    files = runtime.cached_kernel_files()
    reason = runtime.gpu_unavailable_reason()
    has_cupy = "cupy" in summary
    gpus = summary.get("gpus") or []
    for g in gpus:
        major, minor = (int(v) for v in str(g.get("compute_capability", "0.0")).split("."))
        g["supported"] = (major, minor) >= runtime.MIN_COMPUTE_CAPABILITY
    mismatch = runtime.cuda_mismatch_message()
    payload = {
        "cupyq": cupyq.__version__,
        "gpu_available": bool(gpus),
        "gpu_unavailable_reason": reason,
        "can_compile": has_cupy,
        "supported_gpus": runtime.SUPPORTED_GPUS,
        "cuda_majors": runtime.cuda_majors(),
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
                             f"the kernels need {runtime.SUPPORTED_GPUS}")
    elif has_cupy:
        lines.append(f"GPU: none found ({reason}). The GPU kernels cannot run here; the NumPy reference path and "
                     "`cupyq compile` can.")
    else:
        lines.append(f"GPU: not usable: {reason}. Only the NumPy reference path runs here; the GPU kernels and "
                     "`cupyq compile` need CuPy.")
    lines.append(f"supported GPUs: {runtime.SUPPORTED_GPUS}")
    if mismatch:
        lines.append("warning: " + mismatch.removeprefix("cupyq: "))
    libs = [("CuPy", "cupy"), ("CUDA runtime", "cuda_runtime"), ("CUDA driver", "cuda_driver"), ("NVRTC", "nvrtc"), ("torch", "torch"), ("torch CUDA", "torch_cuda")]
    lines.append("libraries: " + ", ".join(f"{label} {summary.get(key) if summary.get(key) is not None else 'n/a'}" for label, key in libs))
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


# ------------------------------------------------------------------------------------------------
# inspect
# ------------------------------------------------------------------------------------------------


def _bits_text(info):
    if info.format == "exl2" and info.bit_mix:
        total = sum(r for _, r in info.bit_mix)
        return " ".join(f"{b}:{100 * r / total:.0f}%" for b, r in info.bit_mix)
    return "/".join(str(b) for b in info.bits) if info.bits else "-"


def _layer_payload(info):
    return {
        "name": info.name,
        "format": info.format,
        "bits": list(info.bits) if info.bits else None,
        "bit_mix": [list(x) for x in info.bit_mix] if info.bit_mix else None,
        "bits_per_weight": info.bits_per_weight,
        "group_size": info.group_size,
        "act_order": info.act_order,
        "checkpoint_format": info.checkpoint_format,
        "in_features": info.in_features,
        "out_features": info.out_features,
        "bytes": info.nbytes,
    }


def _quant_config_payload(qc):
    if qc is None:
        return None
    return {
        "quant_method": qc.quant_method,
        "source": str(qc.source),
        "bits": qc.bits,
        "group_size": qc.group_size,
        "desc_act": qc.desc_act,
        "sym": qc.sym,
        "checkpoint_format": qc.checkpoint_format if qc.quant_method == "gptq" else None,
        "ignored_hints": sorted(qc.hints),
        "awq_version": qc.version,
        "modules_to_not_convert": list(qc.modules_to_not_convert),
    }


def cmd_inspect(args):
    ckpt = _open(args.path)
    infos = [ckpt.layer_info(n) for n in ckpt.layers]
    rows = []
    for info in infos:
        rows.append(
            {
                "name": info.name,
                "format": info.format,
                "bits": _bits_text(info),
                "bpw": info.bits_per_weight,
                "group": "-" if info.group_size is None else info.group_size,
                "act": "-" if info.act_order is None else info.act_order,
                "shape": f"{info.in_features} x {info.out_features}",
                "bytes": _human_bytes(info.nbytes),
            }
        )
    quant = [i for i in infos if i.quantized]
    weights = sum(i.in_features * i.out_features for i in quant)
    totals = {
        "layers": len(infos),
        "quantized_layers": len(quant),
        "by_format": {f: sum(1 for i in infos if i.format == f) for f in sorted({i.format for i in infos})},
        "quantized_weights": weights,
        "mean_bits_per_weight": (sum(i.bits_per_weight * i.in_features * i.out_features for i in quant) / weights) if weights else None,
        "layer_bytes": sum(i.nbytes for i in infos),
        "file_bytes": sum(f.stat().st_size for f in ckpt.files),
        "files": len(ckpt.files),
    }
    qc = ckpt.quant_config
    lines = [f"{ckpt.path}: {len(ckpt.files)} safetensors file(s), {len(ckpt.tensors)} tensors"]
    if qc is not None:
        desc = f"{qc.quant_method} (from {qc.source.name}): bits {qc.bits}"
        if qc.quant_method == "gptq":
            desc += f", group_size {qc.group_size}, desc_act {qc.desc_act}, sym {qc.sym}, format {qc.checkpoint_format}"
        elif qc.quant_method == "awq":
            desc += f", group_size {qc.group_size}, zero_point {not qc.sym}, version {qc.version}"
            if qc.modules_to_not_convert:
                desc += f", modules_to_not_convert {', '.join(qc.modules_to_not_convert)}"
        if qc.hints:
            desc += f"; ignored loading hints: {', '.join(sorted(qc.hints))}"
        lines.append("quantization config: " + desc)
    else:
        lines.append("quantization config: none")
    cols = [("layer", "name"), ("format", "format"), ("bits", "bits"), ("bits/weight", "bpw"), ("group", "group"),
            ("act-order", "act"), ("in x out", "shape"), ("bytes", "bytes")]
    lines.append(format_table(rows, cols))
    by_format = ", ".join(f"{v} {k}" for k, v in totals["by_format"].items())
    mean = totals["mean_bits_per_weight"]
    lines.append(
        f"total: {totals['layers']} layers ({by_format}); {weights:,} quantized weights"
        + (f" at {mean:.3f} bits/weight" if mean else "")
        + f"; {_human_bytes(totals['layer_bytes'])} in layers, {_human_bytes(totals['file_bytes'])} on disk"
    )
    warnings_ = _zero_point_warnings(ckpt)
    lines += [f"warning: {w}" for w in warnings_]
    payload = {"path": str(ckpt.path), "quantization_config": _quant_config_payload(qc),
               "layers": [_layer_payload(i) for i in infos], "totals": totals, "warnings": warnings_}
    _emit(args, payload, "\n".join(lines))
    return EXIT_OK


def _zero_point_warnings(ckpt):
    from cupyq.checkpoint import zero_point_warnings

    return [m for msgs in zero_point_warnings(ckpt).values() for m in msgs]


# ------------------------------------------------------------------------------------------------
# verify
# ------------------------------------------------------------------------------------------------


def _relative_error(y, ref):
    import numpy as np

    y = np.asarray(y, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if not np.all(np.isfinite(y)):
        return math.inf
    denom = float(np.linalg.norm(ref))
    diff = float(np.linalg.norm(y - ref))
    return diff / denom if denom else diff


def _time_gpu(fn, reps):
    import cupy

    fn()  # first call compiles / loads the kernels
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    for _ in range(reps):
        fn()
    stop.record()
    stop.synchronize()
    return cupy.cuda.get_elapsed_time(start, stop) * 1e3 / reps


def _verify_layer(ckpt, name, ms, rng, on_gpu, reps):
    import numpy as np

    from cupyq import gemm, reference

    info = ckpt.layer_info(name)
    tensors = ckpt.load_layer(name)
    w_ref = ckpt.dequantize(name)
    bias = tensors.get("bias")
    qm = ckpt.qmatrix(name, device=0 if on_gpu else None)
    results = []
    for m in ms:
        x = rng.standard_normal((m, info.in_features)).astype(np.float16)
        ref = reference.matmul(x, w_ref, bias)
        if on_gpu:
            import cupy

            xd = cupy.asarray(x)
            y = cupy.asnumpy(gemm(xd, qm))
            us = _time_gpu(lambda: gemm(xd, qm), reps)
        else:
            # The reference path is slow and its time says little: one call, timed.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                start = time.perf_counter()
                y = np.asarray(gemm(x, qm))
                us = (time.perf_counter() - start) * 1e6
        if y.shape[-1] != ref.shape[-1]:
            y = y[..., : ref.shape[-1]]
        results.append({"m": m, "error": _relative_error(y, ref), "us": us})
    return info, results


def cmd_verify(args):
    import numpy as np

    ms = _flat_ms(args.m) or list(DEFAULT_MS)
    if args.cpu and args.require_gpu:
        raise UsageError("--cpu and --require-gpu contradict each other")
    reason = None if args.cpu else _gpu_unavailable_reason()
    on_gpu = reason is None and not args.cpu
    if args.require_gpu and not on_gpu:
        print(f"cupyq verify: no GPU kernel can run ({reason}); failing as --require-gpu asks", file=sys.stderr)
        payload = {"gpu": False, "gpu_unavailable_reason": reason, "mode": "none", "tolerance": args.tolerance,
                   "ms": ms, "sample": not args.paths, "passed": False, "layers": [],
                   "error": f"--require-gpu: no GPU kernel can run: {reason}"}
        _emit(args, payload, f"FAILED: --require-gpu given and no GPU kernel can run: {reason}")
        return EXIT_FAIL
    with tempfile.TemporaryDirectory(prefix="cupyq-sample-") as tmp:
        paths, is_sample = _checkpoint_paths(args.paths, tmp)
        checkpoints = [_open(p) for p in paths]
        jobs = [(c, n) for c in checkpoints for n in c.quantized_layers]
        if not jobs:
            raise UsageError("no GPTQ or EXL2 layers to verify in " + ", ".join(str(p) for p in paths))
        rng = np.random.default_rng(args.seed)
        rows, failed = [], 0
        with Progress(len(jobs), "verify") as bar:
            for ckpt, name in jobs:
                info, results = _verify_layer(ckpt, name, ms, rng, on_gpu, args.reps)
                worst = max(r["error"] for r in results)
                ok = worst <= args.tolerance
                failed += not ok
                rows.append({
                    "checkpoint": ckpt.path.name if is_sample else str(ckpt.path),
                    "layer": name,
                    "format": info.format,
                    "bits": _bits_text(info),
                    "shape": f"{info.in_features} x {info.out_features}",
                    "max_rel_error": worst,
                    "finite": all(math.isfinite(r["error"]) for r in results),
                    "ok": ok,
                    "results": results,
                })
                bar.update(name)
    mode = (
        "GPU kernels (cupyq.gemm on CuPy arrays, fp16) against the float32 NumPy reference"
        if on_gpu
        else "NO GPU KERNEL RAN: checked the CPU path (cupyq.gemm on NumPy arrays, the float32 reference) "
        + ("because --cpu was given" if args.cpu else f"because no GPU can be used: {reason}")
    )
    cols = [("layer", "layer"), ("format", "format"), ("bits", "bits"), ("in x out", "shape")]
    cols += [(f"rel err m={m}", f"error_m{m}") for m in ms]
    cols += [(f"us m={m}", f"us_m{m}") for m in ms]
    cols += [("ok", "ok")]
    lines = []
    for ckpt in checkpoints:
        key = ckpt.path.name if is_sample else str(ckpt.path)
        sub = [dict(r, **{f"{k}_m{res['m']}": res[k] for res in r["results"] for k in ("error", "us")})
               for r in rows if r["checkpoint"] == key]
        if sub:
            lines.append(("sample " if is_sample else "") + key)
            lines.append(format_table(sub, cols))
            lines.append("")
    warnings_ = [w for ckpt in checkpoints for w in _zero_point_warnings(ckpt)]
    lines += [f"warning: {w}" for w in warnings_]
    lines.append(f"mode: {mode}")
    lines.append(
        f"tolerance: relative error <= {args.tolerance:g}; "
        + (f"{failed} of {len(rows)} layers FAILED" if failed else f"all {len(rows)} layers passed")
    )
    payload = {
        "gpu": on_gpu,
        "gpu_unavailable_reason": reason,
        "mode": "gpu" if on_gpu else "cpu",
        "mode_text": mode,
        "tolerance": args.tolerance,
        "ms": ms,
        "sample": is_sample,
        "passed": not failed,
        "layers": rows,
        "warnings": warnings_,
    }
    _emit(args, payload, "\n".join(lines))
    return EXIT_FAIL if failed else EXIT_OK


# ------------------------------------------------------------------------------------------------
# bench
# ------------------------------------------------------------------------------------------------


def _speedup_rows(rows):
    """Pivot run_benchmark rows into one row per (K, N, m) with a time per impl and speed-ups over fp16."""
    table = {}
    impls = []
    for r in rows:
        if r.get("m") is None or r.get("us") is None:  # an implementation that could not run
            continue
        key = (r["K"], r["N"], r["m"])
        table.setdefault(key, {"K": r["K"], "N": r["N"], "m": r["m"]})[r["impl"]] = r["us"]
        if r["impl"] not in impls:
            impls.append(r["impl"])
    out = []
    for key in sorted(table):
        row = table[key]
        base = row.get("fp16")
        for impl in impls:
            if impl != "fp16" and base and row.get(impl):
                row[f"x_{impl}"] = base / row[impl]
        out.append(row)
    return out, impls


def _plot(rows, impls, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    shapes = sorted({(r["K"], r["N"]) for r in rows})
    for impl in impls:
        if impl == "fp16":
            continue
        for k, n in shapes:
            pts = [(r["m"], r[f"x_{impl}"]) for r in rows if (r["K"], r["N"]) == (k, n) and f"x_{impl}" in r]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", label=f"{impl} {k}x{n}")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("m (rows of x)")
    ax.set_ylabel("speed-up over fp16 matmul")
    ax.set_title("cupyq quantized GEMM vs fp16")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_bench(args):
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--plot needs matplotlib, which is not installed (pip install matplotlib)") from None
    _require_gpu("bench")
    from cupyq import bench

    ms = _flat_ms(args.m)

    shapes, formats = None, args.formats
    if args.path:
        ckpt = _open(args.path)
        infos = [ckpt.layers[n] for n in ckpt.quantized_layers]
        if not infos:
            raise UsageError(f"{args.path}: no GPTQ or EXL2 layers")
        shapes = sorted({(i.in_features, i.out_features) for i in infos})
        if not formats:
            # AWQ layers run the kernels of GPTQ without act-order.
            kinds = {"gptq_act" if (i.format == "gptq" and i.act_order) else "gptq" if i.format == "awq" else i.format
                     for i in infos}
            formats = [f for f in ("gptq", "gptq_act", "exl2") if f in kinds]
    kwargs = {"shapes": shapes, "ms": ms, "iters": args.iters, "repeats": args.repeats}
    if formats:
        kwargs["formats"] = tuple(formats)
    n_shapes = len(bench.SHAPES if shapes is None else shapes)
    n_ms = len(bench.MS if ms is None else ms)
    n_impls = len(formats or ("gptq", "gptq_act", "exl2")) + 2
    print(f"benchmarking {n_shapes} shape(s) x {n_ms} m value(s)...", file=sys.stderr)
    with Progress(n_shapes * n_ms * n_impls, "bench", delay=0.0) as bar:
        kwargs["progress"] = lambda row: bar.update(f"{row['impl']} {row['K']}x{row['N']} m={row['m']}")
        rows = bench.run_benchmark(**kwargs)
    table, impls = _speedup_rows(rows)
    cols = [("K", "K"), ("N", "N"), ("m", "m")] + [(f"{i} us", i) for i in impls]
    cols += [(f"{i} speed-up", f"x_{i}") for i in impls if i != "fp16" and any(f"x_{i}" in r for r in table)]
    text = format_table(table, cols)
    for r in rows:
        if r.get("error"):
            text += f"\n{r['impl']} {r['K']}x{r['N']} did not run: {r['error']}"
    if args.plot:
        _plot(table, impls, args.plot)
        text += f"\nwrote plot {args.plot}"
    _emit(args, {"rows": rows, "table": table}, text)
    return EXIT_OK


# ------------------------------------------------------------------------------------------------
# warmup
# ------------------------------------------------------------------------------------------------


def cmd_warmup(args):
    _require_gpu("warmup (it compiles kernels for this machine's GPU)")
    from cupyq import runtime

    before = {p.name for p in runtime.cached_kernel_files()}
    with tempfile.TemporaryDirectory(prefix="cupyq-sample-") as tmp:
        paths, _ = _checkpoint_paths([args.path] if args.path else [], tmp)
        checkpoints = [_open(p) for p in paths]
        jobs = [(c, n) for c in checkpoints for n in c.quantized_layers]
        if not jobs:
            raise UsageError("no GPTQ or EXL2 layers in " + ", ".join(str(p) for p in paths))
        qms = []
        load_start = time.perf_counter()
        with Progress(len(jobs), "loading") as bar:
            for ckpt, name in jobs:
                qms.append(ckpt.qmatrix(name, device=args.device))
                bar.update(name)
        load_s = time.perf_counter() - load_start
        print(f"warmup: compiling and loading the kernels of {len(qms)} layer(s) for m <= {args.max_m} "
              "(the first run compiles with NVRTC and can take a minute; later runs read the kernel cache)",
              file=sys.stderr)
        with Progress(len(qms), "warmup", delay=0.0) as bar:
            seconds = runtime.warmup(qms, max_m=args.max_m, progress=lambda i, qm: bar.update(jobs[i][1]))
    after = runtime.cached_kernel_files()
    new = [p.name for p in after if p.name not in before]
    payload = {"layers": len(qms), "load_seconds": load_s, "warmup_seconds": seconds, "max_m": args.max_m,
               "new_cache_files": new, "kernel_cache_dir": str(runtime.kernel_cache_dir())}
    text = (
        f"warmed up {len(qms)} layer(s) on GPU {args.device} for m <= {args.max_m}: {seconds:.2f} s "
        f"(loading took {load_s:.2f} s); {len(new)} new file(s) in the kernel cache {runtime.kernel_cache_dir()}"
    )
    _emit(args, payload, text)
    return EXIT_OK


# ------------------------------------------------------------------------------------------------
# compile
# ------------------------------------------------------------------------------------------------


def cmd_compile(args):
    from cupyq import runtime
    from cupyq.sources import list_cuda_sources

    archs = args.arch or ["sm_80", "sm_90"]
    sources = args.source or None
    n_jobs = len(archs) * len(sources or list_cuda_sources())
    start = time.perf_counter()
    print(f"cupyq compile: {n_jobs} NVRTC compile(s) for {', '.join(archs)} in parallel threads "
          "(each takes tens of seconds)...", file=sys.stderr)

    def report(r):
        print(f"  compiled {r.source} for {r.arch} in {r.seconds:.1f} s", file=sys.stderr, flush=True)

    try:
        reports = runtime.compile_sources(archs, sources=sources, progress=report)
    except runtime.CompileError as exc:
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
    _emit(args, payload, text)
    return EXIT_OK


# ------------------------------------------------------------------------------------------------
# argument parsing
# ------------------------------------------------------------------------------------------------


def _positive_float(text):
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not v > 0 or not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return v


def _positive_int(text):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return v


def _row_counts(text):
    """``--m`` value: one positive integer or a comma-separated list of them (``1,7,64``)."""
    parts = [t.strip() for t in str(text).split(",")]
    if not all(parts):
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, such as 1,7,64; got {text!r}")
    try:
        return [_positive_int(t) for t in parts]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected positive integers separated by commas, such as 1,7,64; got {text!r}") from None


def _flat_ms(values):
    """The row counts of every ``--m`` given, in order, without repeats; None when there was none."""
    if not values:
        return None
    out = []
    for group in values:
        out += [m for m in group if m not in out]
    return out


def _arch(text):
    from cupyq.runtime import _normalise_arch

    try:
        _normalise_arch(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("arch: ")) from None
    return text


def _cuda_source_name(text):
    from cupyq.sources import list_cuda_sources

    available = [p.name for p in list_cuda_sources()]
    if text not in available:
        raise argparse.ArgumentTypeError(
            f"expected the file name of a CUDA source of the package ({', '.join(available)}), got {text!r}")
    return text


class _ArgumentError(Exception):
    """A command-line usage error (raised instead of argparse's exit so that --json can report it)."""

    def __init__(self, parser, message):
        super().__init__(message)
        self.parser = parser


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise _ArgumentError(self, message)


def build_parser() -> argparse.ArgumentParser:
    import cupyq

    parser = _Parser(
        prog="cupyq",
        description="GPTQ and EXL2 quantized linear layers on NVIDIA GPUs (CUDA C kernels compiled at run time by NVRTC).",
        epilog="Exit status: 0 success, 1 verification or compilation failure, 2 usage or input error.",
    )
    parser.add_argument("--version", action="version", version=f"cupyq {cupyq.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true",
                        help="print a JSON report on stdout instead of the table (errors too, as {\"error\": ...})")
    common.add_argument("--json-out", "-o", metavar="FILE",
                        help="also write the JSON report to FILE, keeping the table on stdout; an existing FILE is "
                             "replaced only when it is a JSON report written by cupyq")

    p = sub.add_parser("info", parents=[common], help="GPUs, library versions and the kernel cache",
                       description="Show GPUs (compute capability, SMs, memory), CuPy/CUDA/NVRTC/torch versions and "
                                   "the kernel cache directory with what it holds. Works without a GPU.")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("inspect", parents=[common], help="list the layers of a checkpoint",
                       description="Per layer of a GPTQ / EXL2 / AWQ / mixed checkpoint directory: format, bits (EXL2: the "
                                   "mix of widths), bits per weight, group size, act-order, shape and bytes; totals.")
    p.add_argument("path", help="checkpoint directory (or a single .safetensors file)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("verify", parents=[common], help="check the GPU kernels against the float32 reference",
                       description="Build every quantized layer, run cupyq.gemm on random fp16 inputs for a few m and "
                                   "compare with the float32 NumPy reference (relative Frobenius error). Without a "
                                   "path the built-in sample (GPTQ 4-bit act-order, GPTQ 3-bit v2, EXL2 mixed, AWQ 4-bit) is "
                                   "made in a temporary directory. Without a GPU the CPU reference path is checked, "
                                   "the output says that no GPU kernel ran and the exit status is still 0 unless "
                                   "--require-gpu is given. Exit status 1 when a layer fails.")
    p.add_argument("paths", nargs="*", metavar="PATH", help="checkpoint directories (default: the built-in sample)")
    p.add_argument("--m", type=_row_counts, action="append", metavar="M[,M...]",
                   help=f"rows of x to test: a comma-separated list or the option repeated, --m 1,7 or --m 1 --m 7 "
                        f"(default: {','.join(map(str, DEFAULT_MS))})")
    p.add_argument("--tolerance", type=_positive_float, default=DEFAULT_TOLERANCE,
                   help=f"largest relative error allowed (default {DEFAULT_TOLERANCE:g}: fp16 rounding gives ~1e-3, "
                        "real bugs give 0.1 or more)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    p.add_argument("--reps", type=_positive_int, default=20, help="timed repetitions per m (default 20)")
    p.add_argument("--cpu", action="store_true", help="check the CPU reference path even when a GPU is present")
    p.add_argument("--require-gpu", action="store_true",
                   help="exit with status 1 when no GPU kernel can run (without it, a machine without a GPU checks "
                        "the CPU path and exits 0)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("bench", parents=[common], help="benchmark the kernels against fp16 (needs a GPU)",
                       description="Run cupyq.bench.run_benchmark on the checkpoint's layer shapes (or the six standard "
                                   "shapes) and print microseconds per call and the speed-up over an fp16 matmul.")
    p.add_argument("path", nargs="?", help="checkpoint directory whose layer shapes to use (default: standard shapes)")
    p.add_argument("--m", type=_row_counts, action="append", metavar="M[,M...]",
                   help="rows of x: a comma-separated list or the option repeated (default: the benchmark's own list)")
    p.add_argument("--formats", nargs="+", choices=("gptq", "gptq_act", "exl2"),
                   help="formats to run (default: those in the checkpoint, or all)")
    p.add_argument("--iters", type=_positive_int, default=40, help="calls per timing (default 40)")
    p.add_argument("--repeats", type=_positive_int, default=5,
                   help="CUDA-graph replays per point for graph_us, the median is kept (default 5)")
    p.add_argument("--plot", metavar="FILE", help="write a PNG of the speed-up over fp16 against m (needs matplotlib)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("warmup", parents=[common], help="compile every kernel a checkpoint needs (needs a GPU)",
                       description="Load every quantized layer of the checkpoint (default: the built-in sample) on the "
                                   "GPU and compile / load every kernel it needs, so that later calls (and CUDA-graph "
                                   "capture) never compile. Reports the time taken.")
    p.add_argument("path", nargs="?", help="checkpoint directory (default: the built-in sample)")
    p.add_argument("--device", type=int, default=0, help="CUDA device index (default 0)")
    p.add_argument("--max-m", type=_positive_int, default=64, help="largest m to prepare kernels for (default 64)")
    p.set_defaults(func=cmd_warmup)

    p = sub.add_parser("compile", parents=[common], help="compile the CUDA sources with NVRTC (no GPU needed)",
                       description="Compile every cuda_src/*.cu for each architecture with NVRTC and report time and "
                                   "cubin size. Exit status 1 with the compiler log on any error or warning.")
    p.add_argument("--arch", action="append", metavar="ARCH", type=_arch,
                   help="target such as sm_80, 90 or sm_90a, sm_80 or newer; repeatable (default: sm_80 and sm_90)")
    p.add_argument("--source", action="append", metavar="FILE", type=_cuda_source_name,
                   help="only this .cu file of the package (a bare name such as qgemm.cu); repeatable (default: all)")
    p.set_defaults(func=cmd_compile)
    return parser


def _report_error(args, argv, message):
    """An error under --json / --json-out: ``{"error": ...}`` on stdout and in the file (when it may be written)."""
    words = list(sys.argv[1:] if argv is None else argv)
    wants_json = bool(getattr(args, "json", False)) if args is not None else "--json" in words
    command = getattr(args, "command", None) or next((w for w in words if w in COMMANDS), None)
    blob = _report_json(command, {"error": message})
    if wants_json:
        print(blob)
    target = getattr(args, "json_out", None)
    if target:
        try:
            _write_report(target, blob)
        except (UsageError, OSError):
            pass  # the error is already on stderr; a file that may not be replaced stays as it is


def main(argv=None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 verification failure, 2 usage/input error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    except _ArgumentError as exc:
        exc.parser.print_usage(sys.stderr)
        print(f"{exc.parser.prog}: error: {exc}", file=sys.stderr)
        _report_error(None, argv, str(exc))
        return EXIT_USAGE
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    from cupyq.checkpoint import CheckpointError
    from cupyq.runtime import SetupError

    try:
        if getattr(args, "json_out", None):
            _check_json_out(args.json_out)  # before any work: a refused file name fails at once
        return args.func(args)
    except (UsageError, CheckpointError, SetupError, FileNotFoundError, FileExistsError, NotADirectoryError,
            IsADirectoryError, PermissionError) as exc:
        print(f"cupyq {args.command}: error: {exc}", file=sys.stderr)
        _report_error(args, argv, str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"cupyq {args.command}: interrupted", file=sys.stderr)
        from cupyq import runtime

        if argv is None and runtime.compile_threads_running():
            # Run as the program (argv from sys.argv) while NVRTC is still compiling in daemon threads: a normal
            # interpreter exit would unload the library under them and crash, so leave at once (nothing is
            # left to save). Called from Python with an argv, return as usual.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
