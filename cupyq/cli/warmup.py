"""``cupyq warmup``: compile and load every kernel a checkpoint needs, so that later calls never compile."""

from __future__ import annotations

import sys
import tempfile
import time

from cupyq.cli.common import EXIT_OK, UsageError, _checkpoint_paths, _open, _require_gpu
from cupyq.cli.output import Progress, _emit


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
