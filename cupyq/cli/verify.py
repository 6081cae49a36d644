"""``cupyq verify``: every quantized layer through cupyq.gemm against the float32 NumPy reference."""

from __future__ import annotations

import math
import sys
import tempfile
import time
import warnings

from cupyq.cli.arguments import _flat_lists
from cupyq.cli.common import EXIT_FAIL, EXIT_OK, UsageError, _checkpoint_paths, _gpu_unavailable_reason, _open
from cupyq.cli.inspect import _bits_text, _zero_point_warnings
from cupyq.cli.output import Progress, _emit, format_table

# Relative Frobenius error allowed between the GPU kernel (fp16 in, fp16 out, fp32 accumulation)
# and the float32 reference. Rounding the output to fp16 alone costs up to 2**-11 ~ 4.9e-4 per
# element, rounding dequantised weights to fp16 about as much per weight (averaging down over the
# K-term dot products); a correct kernel lands near 1e-3 or below (upstream's fp16-accumulating
# kernel measures ~1e-3). A wrong group, zero point, bit offset or permutation row gives errors of
# order 0.1 to 1, so 1e-2 keeps a 10x margin over rounding and still cannot pass a real bug.
DEFAULT_TOLERANCE = 1e-2
DEFAULT_MS = (1, 7, 64)


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
        n = min(y.shape[-1], ref.shape[-1])  # EXL2: the matrix may have the true width, the stored tensors more
        y, ref = y[..., :n], ref[..., :n]
        results.append({"m": m, "error": _relative_error(y, ref), "us": us})
    return info, results


def _open_distinct(paths, is_sample):
    """``{label: Checkpoint}`` of ``paths``, each checkpoint once, in order.

    A path that opens the same directory and files as an earlier one (a directory given twice, through a link,
    or beside its only ``.safetensors`` file) is skipped with a note on stderr. label: the path as given, or
    the sample's name for the built-in sample.
    """
    opened, seen = {}, {}
    for path in paths:
        ckpt = _open(path)
        key = (ckpt.path.resolve(), frozenset(f.resolve() for f in ckpt.files))
        if key in seen:
            print(f"cupyq verify: {path} is the same checkpoint as {seen[key]}; verified once", file=sys.stderr)
            continue
        seen[key] = path
        opened[ckpt.path.name if is_sample else str(path)] = ckpt
    return opened


def cmd_verify(args):
    import numpy as np

    ms = _flat_lists(args.m) or list(DEFAULT_MS)
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
        checkpoints = _open_distinct(paths, is_sample)
        jobs = [(label, c, n) for label, c in checkpoints.items() for n in c.quantized_layers]
        if not jobs:
            raise UsageError("no GPTQ or EXL2 layers to verify in " + ", ".join(str(p) for p in paths))
        rng = np.random.default_rng(args.seed)
        rows, failed = [], 0
        with Progress(len(jobs), "verify") as bar:
            for label, ckpt, name in jobs:
                info, results = _verify_layer(ckpt, name, ms, rng, on_gpu, args.reps)
                worst = max(r["error"] for r in results)
                ok = worst <= args.tolerance
                failed += not ok
                rows.append({
                    "checkpoint": label,
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
    for label in checkpoints:
        sub = [dict(r, **{f"{k}_m{res['m']}": res[k] for res in r["results"] for k in ("error", "us")})
               for r in rows if r["checkpoint"] == label]
        if sub:
            lines.append(("sample " if is_sample else "") + label)
            lines.append(format_table(sub, cols))
            lines.append("")
    warnings_ = [w for ckpt in checkpoints.values() for w in _zero_point_warnings(ckpt)]
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
